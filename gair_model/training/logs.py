"""Checkpoints and logs of a run: ``metrics.csv``, TensorBoard, the ``GAIR_*`` stdout lines, resume lookup.

The step function leaves the loss terms on the device; :class:`MetricsLog` keeps them there and reads them once
per ``--log-every`` steps (one all-reduce and one host synchronisation for the whole interval), then writes one
``metrics.csv`` row per optimiser step. ``samples_per_s`` of a row is the rate of its logging interval.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from gair_dataset import object_store
from gair_model import checkpoint as ckpt
from gair_model import distributed as gdist
from gair_model.training.config import TrainConfig
from gair_model.training.step import LOSS_KEYS

METRICS_PREFIX = "GAIR_METRICS "
SUMMARY_PREFIX = "GAIR_SUMMARY "
CSV_FIELDS = ("step", "epoch", *LOSS_KEYS, "lr", "grad_norm", "samples_per_s", "samples_seen", "elapsed_s",
              "queue_filled")


def open_metrics_csv(path: Path, resume_step: int) -> tuple[TextIO, csv.DictWriter]:
    """Open ``metrics.csv`` for writing; on resume keep the rows up to the resumed step."""
    rows: list[dict] = []
    if resume_step > 0 and path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= resume_step]
    fh = open(path, "w", newline="")  # noqa: SIM115 - kept open for the whole run
    writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    fh.flush()
    return fh, writer


def tensorboard_writer(path: Path) -> Any:
    """A TensorBoard ``SummaryWriter``, or None when the package is not installed (CSV + stdout only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class MetricsLog:
    """Per-step metrics, read from the device once per logging interval.

    Args:
        out_dir: The run folder (``metrics.csv``, ``tb/``); written by the main rank only.
        is_main: Whether this is rank 0.
        start_step: The step the run starts (or resumes) at.
        log_every: Steps per logging interval.
        total_steps: The run's last step (always logged).
        samples_per_step: Samples per optimiser step over all ranks.
        t_start: Start time of the run (``time.time()``).
    """

    def __init__(self, out_dir: Path, *, is_main: bool, start_step: int, log_every: int, total_steps: int,
                 samples_per_step: int, t_start: float) -> None:
        self.is_main, self.start_step, self.total_steps = is_main, start_step, total_steps
        self.log_every = max(1, int(log_every))
        self.samples_per_step, self.t_start = samples_per_step, t_start
        self.last_losses: dict[str, float] = {}
        self._pending: list[tuple[int, int, dict[str, Any], int]] = []
        self._interval_t0 = time.time()
        self._fh: TextIO | None = None
        self._writer: csv.DictWriter | None = None
        self.tb: Any = None
        if is_main:
            self._fh, self._writer = open_metrics_csv(out_dir / "metrics.csv", start_step)
            self.tb = tensorboard_writer(out_dir / "tb")

    def due(self, step: int) -> bool:
        """Whether ``step`` ends a logging interval."""
        return step % self.log_every == 0 or step == self.total_steps or step == self.start_step + 1

    def record(self, step: int, epoch: int, out: dict[str, Any], queue_filled: int) -> None:
        """Keep one step's output (device tensors); every rank calls it, then :meth:`flush` when due."""
        self._pending.append((step, epoch, out, queue_filled))

    def pause(self, seconds: float) -> None:
        """Keep ``seconds`` (e.g. a validation) out of the logged throughput."""
        self._interval_t0 += seconds

    def flush(self, samples_seen: int) -> None:
        """Average the pending steps over ranks, write their rows and print the last one (a collective)."""
        if not self._pending:
            return
        stacked = torch.stack([torch.cat([o["losses"].float(), o["grad_norm"].float().view(1)])
                               for _, _, o, _ in self._pending])
        values = gdist.all_reduce_mean(stacked).cpu().tolist()
        now = time.time()
        n = len(self._pending)
        rate = n * self.samples_per_step / max(now - self._interval_t0, 1e-9)
        self._interval_t0 = now
        first_seen = samples_seen - (n - 1) * self.samples_per_step
        row: dict[str, Any] = {}
        for i, ((step, epoch, out, filled), vals) in enumerate(zip(self._pending, values, strict=True)):
            self.last_losses = dict(zip(LOSS_KEYS, vals[:-1], strict=True))
            row = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in self.last_losses.items()},
                   "lr": out["lr"], "grad_norm": round(vals[-1], 6), "samples_per_s": round(rate, 3),
                   "samples_seen": first_seen + i * self.samples_per_step,
                   "elapsed_s": round(now - self.t_start, 3), "queue_filled": filled}
            if self._writer is not None:
                self._writer.writerow(row)
            if self.tb is not None:
                for k in (*LOSS_KEYS, "lr", "grad_norm", "samples_per_s"):
                    self.tb.add_scalar(f"train/{k}", row[k], step)
        self._pending.clear()
        if self._fh is not None:
            self._fh.flush()
        if self.is_main:
            print(METRICS_PREFIX + json.dumps(row), flush=True)

    def close(self) -> None:
        """Close the CSV and TensorBoard files."""
        if self._fh is not None:
            self._fh.close()
        if self.tb is not None:
            self.tb.close()


def fetch_published_state(cfg: TrainConfig, ckpt_dir: Path, out_dir: Path, info: gdist.DistInfo) -> None:
    """With ``--resume auto`` and ``--publish-to``: fetch the newest published training state when rank 0 has none.

    Rank 0's checkpoint folder decides (checkpoints are written by rank 0). When it holds no checkpoint, the first
    process of every node downloads the newest complete state under ``--publish-to`` into ``ckpt_dir`` (nodes may
    have disks of their own); only rank 0 takes the run files (``metrics.csv``: it rewrites them). A collective:
    every rank calls it, and a failure on any rank is raised on all.
    """
    if cfg.resume != "auto" or not cfg.publish_to:
        return
    if not gdist.all_gather_object(ckpt.find_latest(ckpt_dir) is None)[0]:
        return
    error, step = None, None
    if info.local_rank == 0:
        try:
            record = ckpt.fetch_train_state(cfg.publish_to, ckpt_dir, run_dir=out_dir if info.is_main else None)
            step = record["step"] if record is not None else None
        except OSError as exc:  # ObjectStoreError included; its message has no credentials
            error = f"rank {info.rank}: {exc}"
    errors = [e for e in gdist.all_gather_object(error) if e]
    if errors:
        raise RuntimeError(f"cannot fetch the training state published under "
                           f"{object_store.public_url(cfg.publish_to)}: {errors[0]}")
    if info.is_main:
        where = object_store.public_url(cfg.publish_to)
        print(f"resume: step {step} fetched from {where}" if step is not None
              else f"resume: no checkpoint in {ckpt_dir} nor under {where}: a fresh run", flush=True)


def resolve_resume(cfg: TrainConfig, ckpt_dir: Path) -> dict | None:
    """The checkpoint record (``{"model": ..., "state": ...}``) to resume from, or None for a fresh run."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        return ckpt.find_latest(ckpt_dir)
    p = Path(cfg.resume)
    if p.is_dir():
        rec = ckpt.find_latest(p)
        if rec is None:
            raise FileNotFoundError(f"no checkpoint in {p}")
        return rec
    if p.name == ckpt.LATEST:
        return json.loads(p.read_text())
    stem = p.name.removesuffix(".safetensors").removesuffix(".state.pt")
    rec = {"model": str(p.with_name(stem + ".safetensors")), "state": str(p.with_name(stem + ".state.pt"))}
    for k in ("model", "state"):
        if not Path(rec[k]).exists():
            raise FileNotFoundError(rec[k])
    return rec


def write_run_config(out_dir: Path, cfg: TrainConfig, **facts: Any) -> None:
    """``config.json``: the resolved configuration (``train``), the model part (``model``) and run facts."""
    ckpt.atomic_write_text(out_dir / "config.json", json.dumps(
        {"train": cfg.model_dump(), "model": cfg.gair_config().to_dict(), **facts}, indent=2))
