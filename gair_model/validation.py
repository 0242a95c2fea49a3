"""Validation during training: the GAIR loss terms on a fixed set of held-out batches.

The trainer (:mod:`gair_model.train`) builds one :class:`Validator` and calls :meth:`Validator.run` every
``--val-every`` optimiser steps and once at the end. A validation:

* reads the ``--val-splits`` samples (default ``val``) with the one loader in evaluation mode: one pass, no
  augmentation, no shuffling (``resampled=False``), and keeps the first ``--val-batches`` batches, so every
  validation sees the same samples (the decoded batches are cached in memory when they fit in
  :data:`CACHE_BYTES`);
* puts the model in eval mode under ``torch.no_grad`` and computes all loss terms (``loss``, ``sv_rs``,
  ``rs_sv``, ``sv_loc``, ``rs_loc``) with the current coordinate queue as location negatives, without enqueuing
  anything. The queue is encoded once per validation (the model does not change during it);
* restores the model's train mode and every RNG state, so a run with validation trains exactly like one
  without.

The reported value of a term is its sample-weighted mean over the batches (each batch's contrastive terms use
in-batch negatives, as in training). In DDP each rank reads its own share of the shards (the loader's
``split_by_node``) and takes ``ceil(val_batches / world_size)`` batches; the sums are all-reduced and only
rank 0 writes.

The test split is never read by training or model selection: :func:`check_val_splits` rejects ``test`` (or
"every split") in ``--val-splits`` unless ``--val-allow-test true`` is given.

Outputs (rank 0): ``val_metrics.csv`` (:data:`VAL_CSV_FIELDS`, one row per validation), a stdout line
``GAIR_VAL {json}`` per validation, TensorBoard scalars ``val/*`` when a writer is given, and
:meth:`Validator.summary` fields for ``summary.json``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gair_model import distributed as gdist
from gair_model.losses import CoordinateQueue, gair_loss

if TYPE_CHECKING:
    from gair_model.models.gair import GAIRModel

log = logging.getLogger("gair_model.validation")

VAL_PREFIX = "GAIR_VAL "
VAL_LOSS_KEYS = ("loss", "sv_rs", "rs_sv", "sv_loc", "rs_loc")
VAL_CSV_FIELDS = ("step", *(f"val_{k}" for k in VAL_LOSS_KEYS), "n_samples")
VAL_CSV = "val_metrics.csv"
HELD_OUT_SPLIT = "test"
#: Decoded validation batches are kept in memory (per rank) when they take at most this many bytes.
CACHE_BYTES = 1 << 30
_TENSORS = ("rs", "sv", "lonlat", "rel_xy")


def check_val_splits(val_splits: Sequence[str] | None, *, allow_test: bool = False) -> None:
    """Refuse validation splits that would let the test split into model selection.

    Args:
        val_splits: Splits read by validation (``None``: every split).
        allow_test: Explicitly allow the test split (``--val-allow-test true``).

    Raises:
        ValueError: If ``val_splits`` is empty, or reads the test split without ``allow_test``.
    """
    if val_splits is not None and not val_splits:
        raise ValueError("--val-splits is empty")
    if not allow_test and (val_splits is None or HELD_OUT_SPLIT in val_splits):
        raise ValueError(
            f"--val-splits {list(val_splits) if val_splits is not None else 'none'} reads the '{HELD_OUT_SPLIT}' "
            "split, which is held out from training and model selection; use 'val' (or pass --val-allow-test true)"
        )


def _batch_bytes(batch: dict[str, Any]) -> int:
    return sum(batch[k].numel() * batch[k].element_size() for k in _TENSORS)


class _FixedBatches:
    """The first ``n_batches`` evaluation batches of some shards, re-read or served from memory."""

    def __init__(self, make_loader: Callable[[], Any], n_batches: int, cache_bytes: int = CACHE_BYTES) -> None:
        self.make_loader, self.n_batches, self.cache_bytes = make_loader, n_batches, cache_bytes
        self._cache: list[dict[str, Any]] | None = None

    def __iter__(self):
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[dict[str, Any]] | None = []
        size = 0
        for i, batch in enumerate(self.make_loader()):
            if i >= self.n_batches:
                break
            slim = {k: batch[k] for k in _TENSORS}
            if kept is not None:
                size += _batch_bytes(slim)
                if size <= self.cache_bytes:
                    kept.append(slim)
                else:
                    kept = None  # too large to keep: re-read next time
            yield slim
        self._cache = kept


class Validator:
    """Periodic validation of a training run (see the module docstring).

    Args:
        model: The (unwrapped, not DDP) model being trained.
        queue: The training coordinate queue (read, never written).
        make_loader: Builds a fresh evaluation loader of the validation splits (one pass, fixed order).
        every: Validate every this many optimiser steps (0: never, not even at the end).
        batches: Batches per validation over all ranks.
        device: The model's device.
        out_dir: Where rank 0 writes ``val_metrics.csv`` (``None``: no file).
        autocast: Context manager factory used around the forward pass (the trainer's precision).
        is_main: Whether this process writes (rank 0).
        world_size: Number of ranks (each takes ``ceil(batches / world_size)`` of its own batches).
        start_step: The step a resumed run starts from (earlier CSV rows are kept, later ones dropped).
        tb: Optional TensorBoard ``SummaryWriter``.
    """

    def __init__(self, model: GAIRModel, queue: CoordinateQueue, make_loader: Callable[[], Any], *, every: int,
                 batches: int, device: torch.device, out_dir: str | Path | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 is_main: bool = True, world_size: int = 1, start_step: int = 0, tb: Any = None) -> None:
        if every < 0 or batches < 1:
            raise ValueError("val_every must be >= 0 and val_batches >= 1")
        self.model, self.queue, self.device, self.autocast = model, queue, device, autocast
        self.every, self.is_main, self.tb = every, is_main, tb
        self.batches = _FixedBatches(make_loader, math.ceil(batches / max(1, world_size)))
        self.records: list[dict[str, Any]] = []
        self.last_step: int | None = None
        self.seconds = 0.0
        self._warned_empty = False
        self._csv = Path(out_dir) / VAL_CSV if (out_dir is not None and is_main and self.enabled) else None
        if self._csv is not None:
            self.records = self._restart_csv(self._csv, start_step)

    @property
    def enabled(self) -> bool:
        """Whether validation runs at all."""
        return self.every > 0

    def due(self, step: int) -> bool:
        """Whether a validation is due after optimiser step ``step``."""
        return self.enabled and step % self.every == 0

    def finish(self, step: int) -> dict[str, Any] | None:
        """The end-of-run validation (skipped when disabled or when ``step`` was just validated)."""
        if not self.enabled or self.last_step == step:
            return None
        return self.run(step)

    def run(self, step: int) -> dict[str, Any] | None:
        """Validate now (a collective in DDP: every rank calls it at the same step).

        Args:
            step: The optimiser step just completed.

        Returns:
            The record (``step``, ``val_*`` terms, ``n_samples``, ``seconds``), or ``None`` when the validation
            splits hold no sample.
        """
        t0 = time.time()
        sums, n = self._compute()
        self.last_step = step
        self.seconds += time.time() - t0
        if n == 0:
            if not self._warned_empty:
                log.warning("validation at step %d: no sample in the validation splits", step)
                self._warned_empty = True
            return None
        record = {"step": step, **{f"val_{k}": round(float(v) / n, 6) for k, v in zip(VAL_LOSS_KEYS, sums,
                                                                                      strict=True)},
                  "n_samples": n, "seconds": round(time.time() - t0, 3)}
        self.records.append(record)
        if self.is_main:
            self._write(record)
        return record

    def summary(self) -> dict[str, Any]:
        """Fields for ``summary.json``: ``final_val_loss``, ``final_val_losses``, ``best_val_loss``/``_step``."""
        if not self.records:
            return {"final_val_loss": None, "final_val_losses": None, "best_val_loss": None, "best_val_step": None,
                    "val_seconds": round(self.seconds, 3)}
        last = self.records[-1]
        best = min(self.records, key=lambda r: (r["val_loss"], r["step"]))
        return {
            "final_val_loss": last["val_loss"],
            "final_val_losses": {k: last[f"val_{k}"] for k in VAL_LOSS_KEYS},
            "best_val_loss": best["val_loss"],
            "best_val_step": best["step"],
            "val_n_samples": last["n_samples"],
            "val_seconds": round(self.seconds, 3),
        }

    # ----------------------------------------------------------------------------------------------------------
    def _compute(self) -> tuple[list[float], int]:
        """Sample-weighted sums of the loss terms and the sample count, over all ranks."""
        was_training = self.model.training
        sums = torch.zeros(len(VAL_LOSS_KEYS) + 1, dtype=torch.float64, device=self.device)
        with _preserved_rng(self.device), torch.no_grad():
            self.model.eval()
            try:
                q = self.queue.coords() if self.queue.filled > 0 else None
                with self.autocast():
                    loc_queue = self.model.encode_location(q) if q is not None else None
                for batch in self.batches:
                    sums += self._batch_sums(batch, loc_queue)
            finally:
                self.model.train(was_training)
        total = (gdist.all_reduce_mean(sums) * _world_size()).tolist()
        return total[:-1], int(round(total[-1]))

    def _batch_sums(self, batch: dict[str, Any], loc_queue: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        rs = batch["rs"].to(self.device, non_blocking=True)
        sv = batch["sv"].to(self.device, non_blocking=True)
        lonlat = batch["lonlat"].to(self.device, torch.float64)
        rel_xy = batch["rel_xy"].to(self.device)
        with self.autocast():
            rs_local = m.encode_rs(rs, rel_xy)["rs_local"]
            losses = gair_loss(m.encode_sv(sv), rs_local, m.encode_location(lonlat), loc_queue,
                               temperature=m.config.temperature,
                               location_negatives=m.config.location_negatives)
        b = float(lonlat.shape[0])
        return torch.tensor([float(losses[k]) * b for k in VAL_LOSS_KEYS] + [b], dtype=torch.float64,
                            device=self.device)

    @staticmethod
    def _restart_csv(path: Path, start_step: int) -> list[dict[str, Any]]:
        """(Re)write ``val_metrics.csv`` at ``path`` keeping the rows up to ``start_step``; return them as records."""
        rows: list[dict[str, Any]] = []
        if start_step > 0 and path.exists():
            with open(path, newline="") as fh:
                for r in csv.DictReader(fh):
                    if r.get("step") and int(r["step"]) <= start_step:
                        rows.append({"step": int(r["step"]), "n_samples": int(r["n_samples"]),
                                     **{f"val_{k}": float(r[f"val_{k}"]) for k in VAL_LOSS_KEYS}})
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=VAL_CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        return rows

    def _write(self, record: dict[str, Any]) -> None:
        if self._csv is not None:
            with open(self._csv, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=VAL_CSV_FIELDS, extrasaction="ignore").writerow(record)
        if self.tb is not None:
            for k in VAL_LOSS_KEYS:
                self.tb.add_scalar(f"val/{k}", record[f"val_{k}"], record["step"])
        print(VAL_PREFIX + json.dumps(record), flush=True)
        log.info("validation at step %d: loss %.4f on %d samples (%.2f s)", record["step"], record["val_loss"],
                 record["n_samples"], record["seconds"])


def _world_size() -> int:
    return torch.distributed.get_world_size() if gdist.active() else 1


@contextlib.contextmanager
def _preserved_rng(device: torch.device):
    """Restore the Python, NumPy and torch (CPU and ``device``) RNG states on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def build_validator(cfg: Any, model: GAIRModel, queue: CoordinateQueue, shard_paths: Sequence[str], *,
                    rs_stats: dict | None, device: torch.device, out_dir: Path, is_main: bool, world_size: int,
                    start_step: int = 0,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    tb: Any = None) -> Validator:
    """The :class:`Validator` of a trainer configuration (``gair_model.training.config.TrainConfig``).

    Args:
        cfg: The trainer configuration (``val_every``, ``val_splits``, ``val_batches``, ``val_batch_size``,
            ``batch_size``, the preprocessing options and the model sizes through ``cfg.gair_config()``).
        model: The unwrapped model.
        queue: The training coordinate queue.
        shard_paths: The resolved shard paths of the run.
        rs_stats: Per-band RS statistics of the run (or ``None``).
        device: The model's device.
        out_dir: The run folder.
        is_main: Rank 0.
        world_size: Number of ranks.
        start_step: Step a resumed run starts from.
        autocast: The trainer's autocast factory (default: none).
        tb: Optional TensorBoard writer.

    Returns:
        The validator (disabled when ``cfg.val_every == 0``).

    Raises:
        ValueError: If the validation splits include the test split without ``cfg.val_allow_test``.
    """
    from gair_model.loader import build_loader
    from gair_model.training.data import loader_preprocessing

    mcfg = cfg.gair_config()
    splits = tuple(cfg.val_splits) if cfg.val_splits is not None else None
    if cfg.val_every > 0:
        check_val_splits(splits, allow_test=cfg.val_allow_test)
        if is_main and (cfg.splits is None or splits is None or set(cfg.splits) & set(splits)):
            log.warning("validation splits %s overlap the training splits %s: the validation loss is not held out",
                        cfg.val_splits, cfg.splits)

    def make_loader() -> Any:
        return build_loader(list(shard_paths), batch_size=cfg.val_batch_size or cfg.batch_size,
                            rs_size=mcfg.rs_img_size, sv_size=mcfg.sv_img_size, rs_bands=mcfg.rs_bands,
                            resampled=False, shuffle_buffer=0, num_workers=0, seed=0, splits=splits,
                            rs_stats=rs_stats, sv_train_aug=False, rs_train_aug=False,
                            **loader_preprocessing(cfg))

    return Validator(model, queue, make_loader, every=cfg.val_every, batches=cfg.val_batches, device=device,
                     out_dir=out_dir, autocast=autocast, is_main=is_main, world_size=world_size,
                     start_step=start_step, tb=tb)
