"""One optimiser step: the function the trainer runs and the benchmark times.

:func:`train_step` runs ``accum_steps`` micro-batches (forward under autocast, the GAIR loss, backward; DDP
gradient sync only on the last micro-batch), enqueues every micro-batch's coordinates after its loss, clips,
steps AdamW and the schedule. It never waits for the device: the loss terms and the gradient norm come back as
device tensors, and the caller reads them when it logs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gair_model.losses import CoordinateQueue

#: Loss terms reported per step, in this order (``distill`` is 0 when distillation is off).
LOSS_KEYS = ("loss", "sv_rs", "rs_sv", "sv_loc", "rs_loc", "distill")


@dataclass
class StepState:
    """What one optimiser step works on.

    Attributes:
        forward: The module called for the forward pass (the model, its DDP wrapper and/or ``torch.compile``).
        model: The bare model (its parameters are clipped and stepped).
        optimizer: The optimiser.
        queue: The coordinate queue (location negatives); read before each micro-batch, fed after it.
        device: Where the batches go.
        accum_steps: Micro-batches per optimiser step.
        grad_clip: Max gradient norm (0: none; the norm is still computed and reported).
        distill_weight: Weight of the distillation term (0: off).
        gather_with_grad: SV <-> RS negatives from every rank (see :func:`gair_model.losses.gair_loss`).
        scheduler: The lr schedule, stepped once per optimiser step (optional).
        autocast: Context factory for the forward pass (bf16 autocast on GPU, a no-op otherwise).
        no_sync: Context factory that suspends DDP's gradient all-reduce (``ddp.no_sync``), or None.
        gather_queue: All-gather the enqueued coordinates across ranks (identical queues on every rank).
    """

    forward: Callable[..., dict[str, Any]]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    queue: CoordinateQueue
    device: torch.device
    accum_steps: int = 1
    grad_clip: float = 0.0
    distill_weight: float = 0.0
    gather_with_grad: bool = False
    scheduler: Any = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None
    gather_queue: bool = True
    params: list[torch.nn.Parameter] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.params:
            self.params = [p for p in self.model.parameters() if p.requires_grad]


def batch_to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(rs, sv, lonlat float64, rel_xy)`` of a loader batch on ``device`` (copies overlap when pinned)."""
    return (batch["rs"].to(device, non_blocking=True), batch["sv"].to(device, non_blocking=True),
            batch["lonlat"].to(device, torch.float64, non_blocking=True),
            batch["rel_xy"].to(device, non_blocking=True))


def train_step(state: StepState, next_batch: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One optimiser step over ``state.accum_steps`` micro-batches drawn from ``next_batch``.

    Args:
        state: Model, optimiser, queue and settings.
        next_batch: Returns the next loader batch (``rs, sv, lonlat, rel_xy``).

    Returns:
        ``{"losses": tensor of LOSS_KEYS (mean over micro-batches, this rank), "grad_norm": tensor,
        "lr": the lr this step used}``; the tensors stay on the device (no host synchronisation).
    """
    sums = torch.zeros(len(LOSS_KEYS), device=state.device)
    zero = torch.zeros((), device=state.device)
    lr = float(state.optimizer.param_groups[0]["lr"])
    for micro in range(state.accum_steps):
        rs, sv, lonlat, rel_xy = batch_to_device(next_batch(), state.device)
        queued = state.queue.coords() if state.queue.filled > 0 else None
        last = micro == state.accum_steps - 1
        sync = state.no_sync() if (state.no_sync is not None and not last) else contextlib.nullcontext()
        with sync:
            with state.autocast():
                out = state.forward(rs, sv, lonlat, rel_xy, queue_lonlat=queued, distill_weight=state.distill_weight,
                                    gather_with_grad=state.gather_with_grad)
            losses = out["losses"]
            (losses["loss"] / state.accum_steps).backward()
        state.queue.enqueue(lonlat, gather=state.gather_queue)
        sums += torch.stack([losses.get(k, zero).detach().float() for k in LOSS_KEYS])
    max_norm = state.grad_clip if state.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(state.params, max_norm)
    state.optimizer.step()
    if state.scheduler is not None:
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return {"losses": sums / state.accum_steps, "grad_norm": grad_norm.detach(), "lr": lr}
