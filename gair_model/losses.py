"""GAIR contrastive losses and the FIFO coordinate queue.

All embeddings are L2-normalised and logits use a fixed temperature of 0.07.

* INCL: symmetric InfoNCE between SV and the localised RS embedding, in-batch negatives.
* SECL: one-directional InfoNCE SV -> location and localised RS -> location against a FIFO queue of recent
  coordinates re-encoded by the current location encoder. ``location_negatives="queue"`` is the authors' MoCo-style
  form (positive = the sample's own location, negatives = the queue only); ``"batch+queue"`` adds the batch's other
  locations as negatives (GeoCLIP style, this project's earlier behaviour).
* total = (sum of the four cross-entropy terms) / 2, plus an optional cosine distillation term.

With ``gather_with_grad=True`` in a multi-rank job the SV <-> RS term uses every rank's embeddings as keys (open_clip's
``gather_with_grad`` with ``local_loss``), so the negatives are the global batch, not only the local one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from gair_model.distributed import all_gather_with_grad

TEMPERATURE = 0.07

#: Values of ``location_negatives`` (see :func:`location_info_nce`).
LOCATION_NEGATIVES: tuple[str, ...] = ("queue", "batch+queue")


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


def location_info_nce(
    query: torch.Tensor,
    loc: torch.Tensor,
    loc_queue: torch.Tensor | None = None,
    *,
    negatives: str = "queue",
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """One-directional InfoNCE from a query modality to the location embeddings.

    * ``"queue"`` (the authors' MoCo-style SECL): for each row ``i`` the logits are
      ``[sim(query_i, loc_i), sim(query_i, queue_0), ..., sim(query_i, queue_{K-1})] / T`` and the target is index 0:
      the batch's other locations are *not* negatives (no false negative when a batch repeats a coordinate). With an
      empty or ``None`` queue there would be no negative at all (loss identically 0), so it falls back to in-batch
      negatives (the ``"batch+queue"`` form with ``K = 0``).
    * ``"batch+queue"`` (GeoCLIP style, this project's earlier choice): keys ``[loc; queue]``, target ``i``: ``B - 1``
      extra in-batch negatives per row.

    Args:
        query: ``B x E`` SV or localised RS embeddings.
        loc: ``B x E`` location embeddings of the batch's own coordinates (row ``i`` is the positive of query ``i``).
        loc_queue: ``K x E`` location embeddings of the queued coordinates, or ``None``.
        negatives: ``"queue"`` or ``"batch+queue"``.
        temperature: Softmax temperature.

    Returns:
        Scalar mean cross-entropy.

    Raises:
        ValueError: For an unknown ``negatives``.
    """
    if negatives not in LOCATION_NEGATIVES:
        raise ValueError(f"location_negatives must be one of {LOCATION_NEGATIVES}, got {negatives!r}")
    if loc_queue is None or loc_queue.shape[0] == 0:
        return info_nce(query, loc, temperature=temperature)
    if negatives == "batch+queue":
        return info_nce(query, torch.cat([loc, loc_queue], dim=0), temperature=temperature)
    q = _normalise(query)
    pos = (q * _normalise(loc)).sum(dim=-1, keepdim=True)  # B x 1
    neg = q @ _normalise(loc_queue).t()  # B x K
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def _global_symmetric_info_nce(
    a: torch.Tensor, b: torch.Tensor, *, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of local rows against every rank's keys (gathered with gradients)."""
    a_n, b_n = _normalise(a), _normalise(b)
    a_all, b_all = all_gather_with_grad(a_n), all_gather_with_grad(b_n)
    rank = dist.get_rank()
    targets = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    a_b = F.cross_entropy(a_n @ b_all.t() / temperature, targets)
    b_a = F.cross_entropy(b_n @ a_all.t() / temperature, targets)
    return a_b, b_a


def gair_loss(
    sv: torch.Tensor,
    rs_local: torch.Tensor,
    loc: torch.Tensor,
    loc_queue: torch.Tensor | None = None,
    *,
    temperature: float = TEMPERATURE,
    location_negatives: str = "batch+queue",
    gather_with_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """The four GAIR cross-entropy terms and their total.

    Args:
        sv: ``B x E`` street-view embeddings.
        rs_local: ``B x E`` localised RS embeddings.
        loc: ``B x E`` location embeddings of the batch's own coordinates (the positives).
        loc_queue: ``K x E`` location embeddings of the queued coordinates (negatives), or ``None``.
        temperature: Softmax temperature (0.07).
        location_negatives: Negatives of the two location terms, see :func:`location_info_nce`: ``"queue"`` (the
            authors') or ``"batch+queue"``. The function default keeps the earlier behaviour for direct callers;
            :class:`gair_model.models.gair.GAIRModel` passes its config's value (``"queue"`` unless a preset says
            otherwise).
        gather_with_grad: In a multi-rank job, compute the SV <-> RS terms of the local rows against the keys of
            every rank, all-gathered with gradients (targets ``arange(B) + rank * B``); every rank must have the same
            ``B``. With DDP's gradient averaging this gives exactly the gradient of the single-process loss over the
            global batch. A no-op in a single process. The location terms stay per rank (the queue is already
            shared).

    Returns:
        Dict with ``sv_rs``, ``rs_sv``, ``sv_loc``, ``rs_loc`` and ``loss`` (= sum / 2).
    """
    # Logits in float32 even under bf16 autocast (normalised dot products / 0.07 need the precision).
    with torch.autocast(device_type=sv.device.type, enabled=False):
        if gather_with_grad and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sv_rs, rs_sv = _global_symmetric_info_nce(sv, rs_local, temperature=temperature)
        else:
            sv_rs, rs_sv = symmetric_info_nce(sv, rs_local, temperature=temperature)
        sv_loc = location_info_nce(sv, loc, loc_queue, negatives=location_negatives, temperature=temperature)
        rs_loc = location_info_nce(rs_local, loc, loc_queue, negatives=location_negatives, temperature=temperature)
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
        # Host-side copies of ptr/count: reading the buffers would wait for the device on every step.
        self._ptr = 0
        self._filled = 0

    @property
    def filled(self) -> int:
        """Number of valid entries (a host-side count: no device synchronisation)."""
        return self._filled

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
        p = self._ptr
        end = p + n
        if end <= self.size:
            self.queue[p:end] = x
        else:
            first = self.size - p
            self.queue[p:] = x[:first]
            self.queue[: n - first] = x[first:]
        self._ptr, self._filled = end % self.size, min(self.size, self._filled + n)
        self.ptr.fill_(self._ptr)
        self.count.fill_(self._filled)

    def state(self) -> dict[str, torch.Tensor]:
        """Serializable state (``queue``, ``ptr``, ``count``)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore from :meth:`state`."""
        self.load_state_dict(dict(state))
        self._ptr, self._filled = int(self.ptr), int(self.count)
