"""GAIR contrastive losses and the FIFO coordinate queue.

All embeddings are L2-normalised and logits use a fixed temperature of 0.07.

* INCL: symmetric InfoNCE between SV and the localised RS embedding, in-batch negatives.
* SECL: one-directional InfoNCE SV -> location and localised RS -> location, where the negatives are the batch's
  locations plus a FIFO queue of recent coordinates re-encoded by the current location encoder (GeoCLIP).
* total = (sum of the four cross-entropy terms) / 2, plus an optional cosine distillation term.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

TEMPERATURE = 0.07


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    *,
    temperature: float = TEMPERATURE,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-directional InfoNCE: row ``i`` of ``query`` must match row ``targets[i]`` of ``keys``.

    Args:
        query: ``B x E`` embeddings (normalised here).
        keys: ``K x E`` embeddings (``K >= B``; extra rows are negatives), normalised here.
        temperature: Softmax temperature.
        targets: Index of the positive key per query (default ``arange(B)``).

    Returns:
        Scalar mean cross-entropy.
    """
    logits = _normalise(query) @ _normalise(keys).t() / temperature
    if targets is None:
        targets = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, targets)


def symmetric_info_nce(
    a: torch.Tensor, b: torch.Tensor, *, temperature: float = TEMPERATURE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE with in-batch negatives; returns ``(loss a->b, loss b->a)``."""
    logits = _normalise(a) @ _normalise(b).t() / temperature
    targets = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, targets), F.cross_entropy(logits.t(), targets)


def cosine_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos(student, teacher)``; the teacher is detached."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)).mean()


def gair_loss(
    sv: torch.Tensor,
    rs_local: torch.Tensor,
    loc: torch.Tensor,
    loc_queue: torch.Tensor | None = None,
    *,
    temperature: float = TEMPERATURE,
) -> dict[str, torch.Tensor]:
    """The four GAIR cross-entropy terms and their total.

    Args:
        sv: ``B x E`` street-view embeddings.
        rs_local: ``B x E`` localised RS embeddings.
        loc: ``B x E`` location embeddings of the batch's own coordinates (the positives).
        loc_queue: ``K x E`` location embeddings of the queued coordinates (extra negatives), or ``None``.
        temperature: Softmax temperature (0.07).

    Returns:
        Dict with ``sv_rs``, ``rs_sv``, ``sv_loc``, ``rs_loc`` and ``loss`` (= sum / 2).
    """
    # Logits in float32 even under bf16 autocast (normalised dot products / 0.07 need the precision).
    with torch.autocast(device_type=sv.device.type, enabled=False):
        sv_rs, rs_sv = symmetric_info_nce(sv, rs_local, temperature=temperature)
        keys = loc if loc_queue is None or loc_queue.shape[0] == 0 else torch.cat([loc, loc_queue], dim=0)
        sv_loc = info_nce(sv, keys, temperature=temperature)
        rs_loc = info_nce(rs_local, keys, temperature=temperature)
    total = (sv_rs + rs_sv + sv_loc + rs_loc) / 2.0
    return {"loss": total, "sv_rs": sv_rs, "rs_sv": rs_sv, "sv_loc": sv_loc, "rs_loc": rs_loc}


def _all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class CoordinateQueue(nn.Module):
    """FIFO queue of recent (lon, lat) coordinates used as location negatives (GeoCLIP).

    The queue stores raw coordinates (not embeddings): they are re-encoded by the current location encoder every
    step. It never hands out unfilled slots: :meth:`coords` returns only the filled part, so negatives are always
    real coordinates. When ``torch.distributed`` is initialised, :meth:`enqueue` all-gathers the coordinates of
    every rank so all ranks hold the same queue.

    Args:
        size: Capacity (4096 by default).
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int = 4096) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer("queue", torch.zeros(self.size, 2, dtype=torch.float64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @property
    def filled(self) -> int:
        """Number of valid entries."""
        return int(self.count)

    @property
    def is_full(self) -> bool:
        """Whether every slot holds a real coordinate."""
        return self.filled >= self.size

    def coords(self) -> torch.Tensor:
        """The valid queued coordinates (``filled x 2``, float64, lon/lat degrees)."""
        if self.is_full:
            return self.queue
        return self.queue[: self.filled]

    @torch.no_grad()
    def enqueue(self, lonlat: torch.Tensor, *, gather: bool = True) -> None:
        """Append coordinates (all-gathered across ranks when distributed), overwriting the oldest.

        Args:
            lonlat: ``B x 2`` (lon, lat) degrees.
            gather: All-gather across ranks first (a collective: every rank must call it).
        """
        if self.size == 0:
            return
        x = lonlat.detach().to(self.queue.device, torch.float64)
        if gather:
            x = _all_gather_no_grad(x)
        if x.shape[0] >= self.size:
            x = x[-self.size :]
        n = x.shape[0]
        p = int(self.ptr)
        end = p + n
        if end <= self.size:
            self.queue[p:end] = x
        else:
            first = self.size - p
            self.queue[p:] = x[:first]
            self.queue[: n - first] = x[first:]
        self.ptr.fill_(end % self.size)
        self.count.fill_(min(self.size, self.filled + n))

    def state(self) -> dict[str, torch.Tensor]:
        """Serializable state (``queue``, ``ptr``, ``count``)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore from :meth:`state`."""
        self.load_state_dict(dict(state))
