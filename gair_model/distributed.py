"""Small ``torch.distributed`` helpers for the trainer (``torchrun`` environment variables, gloo/nccl)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one rank is active."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0


def init_distributed(device: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group from ``torchrun`` env vars (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    Uses nccl on CUDA and gloo on CPU. Without ``WORLD_SIZE > 1`` nothing is initialised (single process).

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        timeout_s: Collective timeout.

    Returns:
        A :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    initialized_here = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
        initialized_here = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=initialized_here)


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a multi-rank process group is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (identity in a single process)."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, differentiably (open_clip's ``gather_with_grad``).

    Uses ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients that every rank's loss
    sends to a rank's slice and routes them back to that rank (reduce-scatter on NCCL, all-to-all on gloo). So when
    each rank computes a loss of its local rows against the gathered keys and DDP averages the parameter gradients,
    the result is the gradient of the mean of the ranks' losses, i.e. of the single-process loss over the global
    batch. Every rank must pass a tensor of the same shape. Identity in a single process.

    Args:
        x: ``B x ...`` local tensor.

    Returns:
        ``(world_size * B) x ...``, rank ``r``'s rows at ``[r * B, (r + 1) * B)``.
    """
    if not active():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Barrier across ranks (no-op in a single process)."""
    if active():
        dist.barrier()
