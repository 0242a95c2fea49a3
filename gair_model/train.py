"""GAIR trainer: ``python -m gair_model.train`` or ``torchrun --nproc_per_node=N -m gair_model.train``.

Reads WebDataset shards through :func:`gair_model.loader.build_loader` (the only loader), trains
:class:`gair_model.models.gair.GAIRModel` with DDP (gloo on CPU, nccl on GPU), bf16 autocast on GPU only, gradient
accumulation, AdamW (0.9, 0.95) with ``lr = blr * effective_batch / 256`` and warm-up + cosine.

Configuration: command-line flags, or a JSON/YAML file (``--config``; keys are the flag names with ``_`` or
``-``) whose values the flags override.

Epoch arithmetic (resampled shards): one optimiser step consumes ``batch_size * world_size * accum_steps``
samples. With an epoch size ``E`` (``--epoch-samples``, else ``n_samples`` of the shard set's ``shards.json``),
``steps_per_epoch = ceil(E / samples_per_step)`` and each rank's loader is built per epoch with
``epoch_samples = steps_per_epoch * accum_steps * batch_size`` (the loader splits that over its workers) and the
seed ``seed + epoch`` (the loader mixes in rank and worker). Resume (``--resume auto``) restores the model,
optimiser, scheduler, RNG and queue state and either replays the data stream up to the checkpoint
(``--resume-data skip``, exact) or starts a fresh random stream (``--resume-data reseed``, cheap).

Validation (``--val-every N``, off by default): every N optimiser steps and at the end, the loss terms on the
first ``--val-batches`` batches of the ``--val-splits`` (default ``val``; never ``test`` unless forced), without
changing the training state; see :mod:`gair_model.validation`.

Outputs in ``--out-dir``: ``config.json``, ``metrics.csv`` (one row per optimiser step), ``val_metrics.csv``
(one row per validation), ``checkpoints/`` (``step_XXXXXXXX.safetensors`` + ``step_XXXXXXXX.state.pt`` +
``latest.json``), ``summary.json`` and, if the ``tensorboard`` package is installed, ``tb/``. Every
``--log-every`` steps rank 0 prints one line ``GAIR_METRICS {json}``, after each validation ``GAIR_VAL {json}``;
at the end ``GAIR_SUMMARY {json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gair_model import checkpoint as ckpt
from gair_model import distributed as gdist
from gair_model.loader import resolve_shards
from gair_model.losses import CoordinateQueue
from gair_model.models.encoders import RSEncoder, SVEncoder
from gair_model.models.gair import PRESETS, GAIRConfig, GAIRModel, preset
from gair_model.optim import build_optimizer, build_scheduler, scaled_lr
from gair_model.validation import build_validator, check_val_splits

log = logging.getLogger("gair_model.train")

METRICS_PREFIX = "GAIR_METRICS "
SUMMARY_PREFIX = "GAIR_SUMMARY "
LOSS_KEYS = ("loss", "sv_rs", "rs_sv", "sv_loc", "rs_loc", "distill")
CSV_FIELDS = (
    "step",
    "epoch",
    *LOSS_KEYS,
    "lr",
    "grad_norm",
    "samples_per_s",
    "samples_seen",
    "elapsed_s",
    "queue_filled",
)


@dataclass
class TrainConfig:
    """Trainer configuration (every field is also a ``--flag``; ``None`` model fields keep the preset's value)."""

    shards: list[str] = field(default_factory=list)
    out_dir: str = "runs/gair"
    # model
    preset: str = "tiny"
    embed_dim: int | None = None
    rs_arch: str | None = None
    sv_arch: str | None = None
    rs_size: int | None = None
    sv_size: int | None = None
    rs_patch: int | None = None
    sv_patch: int | None = None
    rs_bands: int | None = None
    localizer: str | None = None
    location_encoder: str | None = None
    loc_hidden: list[int] | None = None
    rs_weights: str | None = None
    rs_weights_prefix: str | None = None
    sv_weights: str | None = None
    sv_weights_prefix: str | None = None
    # data
    splits: list[str] | None = field(default_factory=lambda: ["train"])
    allow_test_split: bool = False
    epoch_samples: int | None = None
    shuffle_buffer: int = 1000
    num_workers: int = 0
    rs_stats: str | None = None
    sv_aug: bool = True
    rs_aug: bool = True
    # validation
    val_every: int = 0
    val_splits: list[str] | None = field(default_factory=lambda: ["val"])
    val_batches: int = 20
    val_batch_size: int | None = None
    val_allow_test: bool = False
    # schedule
    batch_size: int = 32
    accum_steps: int = 1
    steps: int | None = None
    epochs: float | None = None
    blr: float = 1.5e-6
    lr: float | None = None
    min_lr_ratio: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    grad_clip: float = 0.0
    # GAIR specifics
    queue_size: int = 4096
    queue_init: str = "auto"
    distill_weight: float = 0.0
    rs_teacher_weights: str | None = None
    sv_teacher_weights: str | None = None
    # runtime
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    threads: int | None = None
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_data: str = "skip"
    overwrite: bool = False
    max_minutes: float | None = None

    def model_config(self) -> GAIRConfig:
        """The :class:`GAIRConfig` = preset + the non-``None`` model overrides."""
        mapping = {
            "embed_dim": "embed_dim",
            "rs_arch": "rs_arch",
            "sv_arch": "sv_arch",
            "rs_size": "rs_img_size",
            "sv_size": "sv_img_size",
            "rs_patch": "rs_patch_size",
            "sv_patch": "sv_patch_size",
            "rs_bands": "rs_bands",
            "localizer": "localizer",
            "location_encoder": "location_encoder",
            "loc_hidden": "loc_hidden",
            "rs_weights": "rs_weights",
            "rs_weights_prefix": "rs_weights_prefix",
            "sv_weights": "sv_weights",
            "sv_weights_prefix": "sv_weights_prefix",
        }
        overrides = {dst: getattr(self, src) for src, dst in mapping.items() if getattr(self, src) is not None}
        return preset(self.preset, **overrides)


# --------------------------------------------------------------------------------------------------------------
# configuration parsing
# --------------------------------------------------------------------------------------------------------------
_HELP = {
    "shards": "shard paths, a brace pattern, a glob or a shard-set folder",
    "out_dir": "output folder (checkpoints, metrics.csv, summary.json)",
    "preset": f"model preset: {sorted(PRESETS)}",
    "localizer": "nili | mean | centre | bilinear | bicubic",
    "location_encoder": "geoclip | sh | mlp",
    "rs_weights": "local RS ViT weights (.safetensors or torch state dict; never downloaded)",
    "rs_weights_prefix": "key prefix of the RS ViT in --rs-weights (e.g. 'rs_encoder.vit.' for a GAIR checkpoint)",
    "sv_weights": "local SV ViT weights",
    "sv_weights_prefix": "key prefix of the SV ViT in --sv-weights (e.g. 'sv_encoder.vit.')",
    "splits": "keep only these splits ('none' for all; 'test' and 'none' need --allow-test-split true)",
    "allow_test_split": "let training read the test split (it then is no held-out test set: smoke runs only)",
    "epoch_samples": "samples per epoch over all ranks (default: n_samples of shards.json)",
    "rs_stats": "JSON file {mean: [...], std: [...]} with per-band RS statistics",
    "val_every": "validate every N optimiser steps and at the end (0: no validation)",
    "val_splits": "splits read by validation (default val; 'test' is refused unless --val-allow-test true)",
    "val_batches": "batches per validation (the first ones of one unshuffled pass: the same samples every time)",
    "val_batch_size": "samples per validation batch (default: --batch-size)",
    "val_allow_test": "allow the test split in --val-splits (it then no longer is a held-out test set)",
    "batch_size": "samples per rank per micro-step",
    "accum_steps": "gradient accumulation micro-steps per optimiser step",
    "steps": "total optimiser steps (else --epochs x steps per epoch)",
    "blr": "base lr per 256 samples of effective batch",
    "lr": "absolute lr (overrides --blr scaling)",
    "warmup_steps": "warm-up optimiser steps (default 5%% of the steps)",
    "grad_clip": "max grad norm (0: no clipping)",
    "queue_init": "how to pre-fill the coordinate queue: 'auto' (the shard set's manifest.parquet if present, "
    "else 'loader'), 'manifest', 'loader' (first batches of a separate stream), 'none', or a "
    ".npy/.csv/.json/.parquet file of lon,lat",
    "precision": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32",
    "threads": "torch intra-op threads",
    "resume": "'auto' (latest in out_dir if any), or a checkpoint .safetensors/.state.pt/latest.json path",
    "resume_data": "skip (replay the data stream to the checkpoint: exact) | reseed (fresh random stream)",
    "max_minutes": "wall-clock budget; checkpoint and stop cleanly when exceeded",
    "overwrite": "start fresh in an --out-dir that holds checkpoints of an earlier run (deletes them)",
}


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v}")


def _opt_type(fn: Any) -> Any:
    def conv(v: str) -> Any:
        return None if v.lower() in ("none", "null") else fn(v)

    return conv


def build_parser() -> argparse.ArgumentParser:
    """Argument parser generated from :class:`TrainConfig` plus ``--config``."""
    parser = argparse.ArgumentParser(prog="python -m gair_model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="JSON or YAML file of defaults (flags override it)")
    hints = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, f in hints.items():
        flag = "--" + name.replace("_", "-")
        t = str(f.type)
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _HELP.get(name)}
        if t.startswith("list[int]"):
            kw.update(nargs="+", type=int)
        elif t.startswith("list[str]"):
            kw.update(nargs="+", type=str)
        elif t == "bool":
            kw.update(type=_str2bool, metavar="BOOL")
        elif t.startswith("int"):
            kw.update(type=_opt_type(int) if "None" in t else int)
        elif t.startswith("float"):
            kw.update(type=_opt_type(float) if "None" in t else float)
        else:
            kw.update(type=_opt_type(str) if "None" in t else str)
        parser.add_argument(flag, **kw)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``argv`` (and an optional ``--config`` file) into a :class:`TrainConfig`."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(_read_config_file(config_file))
    values.update(args)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    if isinstance(values.get("shards"), str):
        values["shards"] = [values["shards"]]
    for key in ("splits", "val_splits"):
        if values.get(key) is not None and [s.lower() for s in values[key]] == ["none"]:
            values[key] = None
    cfg = TrainConfig(**values)
    if cfg.val_every > 0:
        check_val_splits(cfg.val_splits, allow_test=cfg.val_allow_test)
    if not cfg.allow_test_split and (cfg.splits is None or "test" in cfg.splits):
        raise ValueError(f"--splits {cfg.splits or 'none'} trains on the 'test' split, which is held out for "
                         "evaluation; train on 'train' (or pass --allow-test-split true for a smoke run)")
    if not cfg.shards:
        raise ValueError("--shards is required")
    if cfg.resume_data not in ("skip", "reseed"):
        raise ValueError("--resume-data must be skip or reseed")
    if cfg.overwrite and cfg.resume:
        raise ValueError("--overwrite and --resume contradict each other")
    if cfg.batch_size < 1 or cfg.accum_steps < 1:
        raise ValueError("batch size and accumulation steps must be >= 1")
    return cfg


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _shard_set_dirs(shard_paths: Sequence[str]) -> list[Path]:
    """Distinct local folders holding the given shard files (where ``shards.json`` / ``manifest.parquet`` live)."""
    dirs: list[Path] = []
    for p in shard_paths:
        if "://" in p:
            continue
        d = Path(p).parent
        if d not in dirs:
            dirs.append(d)
    return dirs


def epoch_size_from_shards(shard_paths: Sequence[str]) -> int | None:
    """Number of samples in the given shard files, from their shard sets' ``shards.json`` (``None`` if unknown)."""
    counts: dict[str, int] = {}
    for d in _shard_set_dirs(shard_paths):
        sj = d / "shards.json"
        if not sj.is_file():
            return None
        try:
            for entry in json.loads(sj.read_text())["shards"]:
                counts[str((d / entry["path"]).resolve())] = int(entry["n_samples"])
        except (ValueError, KeyError, TypeError):
            return None
    try:
        return sum(counts[str(Path(p).resolve())] for p in shard_paths)
    except KeyError:
        return None


def manifest_paths(shard_paths: Sequence[str]) -> list[Path]:
    """The ``manifest.parquet`` of every shard set the given shard files belong to (empty if any is missing)."""
    paths = [d / "manifest.parquet" for d in _shard_set_dirs(shard_paths)]
    return paths if paths and all(p.is_file() for p in paths) else []


def manifest_coordinates(paths: Sequence[str | Path], splits: Sequence[str] | None) -> torch.Tensor:
    """(lon, lat) of the manifests' samples in ``splits`` (all when ``None``), ``N x 2`` float64."""
    import pyarrow.parquet as pq

    parts = []
    for path in paths:
        table = pq.read_table(path, columns=["lon", "lat", "split"])
        arr = np.stack([table["lon"].to_numpy(), table["lat"].to_numpy()], axis=1).astype(np.float64)
        if splits:
            arr = arr[np.isin(np.asarray(table["split"].to_pylist(), dtype=object), list(splits))]
        parts.append(arr[np.isfinite(arr).all(axis=1)])
    coords = np.concatenate(parts) if parts else np.zeros((0, 2))
    if len(coords) == 0:
        raise ValueError(f"{list(paths)}: no coordinates for splits {splits}")
    return torch.from_numpy(coords)


def load_coordinates(path: str) -> torch.Tensor:
    """Read a coordinate sample (``N x 2`` lon, lat degrees) from ``.npy``, ``.csv``, ``.json`` or ``.parquet``."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p, columns=["lon", "lat"])
        arr = np.stack([table["lon"].to_numpy(), table["lat"].to_numpy()], axis=1)
    elif p.suffix == ".json":
        data = json.loads(p.read_text())
        arr = np.array([[d["lon"], d["lat"]] for d in data]) if data and isinstance(data[0], dict) else np.array(data)
    else:
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
        arr = np.array([[float(r["lon"]), float(r["lat"])] for r in rows])
    arr = np.asarray(arr, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(arr).all() or len(arr) == 0:
        raise ValueError(f"{path}: no valid coordinates")
    return torch.from_numpy(arr)


class _Teacher(nn.Module):
    """Frozen teacher wrapper returning the global RS feature or the SV CLS token."""

    def __init__(self, encoder: RSEncoder | SVEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.kind = "rs" if isinstance(encoder, RSEncoder) else "sv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.encoder, RSEncoder):
            return self.encoder.forward_global(x)
        return self.encoder.forward_cls(x)


def build_model(cfg: TrainConfig) -> GAIRModel:
    """The model (with frozen teachers when distillation is on)."""
    mcfg = cfg.model_config()
    rs_teacher = sv_teacher = None
    if cfg.distill_weight > 0:
        if not (cfg.rs_teacher_weights or cfg.sv_teacher_weights):
            raise ValueError("--distill-weight needs --rs-teacher-weights and/or --sv-teacher-weights")
        if cfg.rs_teacher_weights:
            rs_enc = RSEncoder(
                mcfg.rs_arch,
                img_size=mcfg.rs_img_size,
                patch_size=mcfg.rs_patch_size,
                in_chans=mcfg.rs_bands,
                weights=cfg.rs_teacher_weights,
            )
            rs_teacher = _Teacher(rs_enc)
        if cfg.sv_teacher_weights:
            sv_enc = SVEncoder(
                mcfg.sv_arch, img_size=mcfg.sv_img_size, patch_size=mcfg.sv_patch_size, weights=cfg.sv_teacher_weights
            )
            sv_teacher = _Teacher(sv_enc)
    return GAIRModel(mcfg, rs_teacher=rs_teacher, sv_teacher=sv_teacher)


def param_checksum(model: nn.Module) -> str:
    """SHA-256 over all parameters and buffers (to check that ranks agree)."""
    h = hashlib.sha256()
    for name, t in ckpt.unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def prefill_queue(
    queue: CoordinateQueue, cfg: TrainConfig, stream: _BatchStream, info: gdist.DistInfo, device: torch.device
) -> None:
    """Fill the coordinate queue with real coordinates before the first step (identical on every rank).

    ``auto`` uses the shard set's ``manifest.parquet`` when present (no decoding), else the first batches of a
    separate loader stream (all-gathered across ranks); a file path samples that coordinate file.
    """
    mode = cfg.queue_init
    manifests = manifest_paths(stream.shard_paths)
    if mode == "auto":
        mode = "manifest" if manifests else "loader"
    if mode == "loader":
        n_batches = math.ceil(cfg.queue_size / (cfg.batch_size * info.world_size))
        prefill = stream.make_loader(cfg.seed + 7_777_777, None)
        it = iter(prefill)
        for _ in range(n_batches):
            queue.enqueue(next(it)["lonlat"].to(device))
        del it, prefill
        return
    if mode == "manifest":
        if not manifests:
            raise FileNotFoundError("--queue-init manifest: no manifest.parquet next to the shards")
        coords = manifest_coordinates(manifests, cfg.splits)
    else:
        coords = load_coordinates(mode)
    gen = torch.Generator().manual_seed(cfg.seed)  # same draw on every rank
    if len(coords) >= cfg.queue_size:
        idx = torch.randperm(len(coords), generator=gen)[: cfg.queue_size]
    else:
        idx = torch.randint(len(coords), (cfg.queue_size,), generator=gen)
    queue.enqueue(coords[idx].to(device), gather=False)


class _Plan:
    """Step / epoch arithmetic."""

    def __init__(self, cfg: TrainConfig, world: int, shard_paths: Sequence[str]) -> None:
        self.samples_per_step = cfg.batch_size * world * cfg.accum_steps
        self.effective_batch = self.samples_per_step
        epoch = cfg.epoch_samples or epoch_size_from_shards(shard_paths)
        self.epoch_samples = epoch
        self.steps_per_epoch = math.ceil(epoch / self.samples_per_step) if epoch else None
        if cfg.steps is not None:
            self.total_steps = int(cfg.steps)
        elif cfg.epochs is not None and self.steps_per_epoch:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        else:
            raise ValueError("give --steps, or --epochs with a known epoch size (--epoch-samples or shards.json)")
        self.micro_per_epoch = self.steps_per_epoch * cfg.accum_steps if self.steps_per_epoch else None

    def epoch_of(self, step: int) -> tuple[int, int]:
        """``(epoch, steps already done in that epoch)`` for a global step count."""
        if not self.steps_per_epoch:
            return 0, step
        return step // self.steps_per_epoch, step % self.steps_per_epoch


class _BatchStream:
    """Per-epoch loaders (seeded by epoch) yielding micro-batches; optional skipping for an exact resume."""

    def __init__(
        self, cfg: TrainConfig, mcfg: GAIRConfig, plan: _Plan, rs_stats: dict | None, shard_paths: list[str]
    ) -> None:
        self.cfg, self.mcfg, self.plan, self.rs_stats = cfg, mcfg, plan, rs_stats
        self.shard_paths = shard_paths
        self.epoch = -1
        self._it: Iterator[dict] | None = None
        self._loader: Any = None
        self.seed_offset = 0

    def make_loader(self, seed: int, epoch_samples: int | None) -> Any:
        from gair_model.loader import build_loader

        cfg, mcfg = self.cfg, self.mcfg
        return build_loader(
            list(self.shard_paths),
            batch_size=cfg.batch_size,
            rs_size=mcfg.rs_img_size,
            sv_size=mcfg.sv_img_size,
            rs_bands=mcfg.rs_bands,
            resampled=True,
            shuffle_buffer=cfg.shuffle_buffer,
            num_workers=cfg.num_workers,
            seed=seed,
            splits=tuple(cfg.splits) if cfg.splits else None,
            epoch_samples=epoch_samples,
            rs_stats=self.rs_stats,
            sv_train_aug=cfg.sv_aug,
            rs_train_aug=cfg.rs_aug,
        )

    def start_epoch(self, epoch: int, skip_micro: int = 0) -> None:
        self.close()
        self.epoch = epoch
        per_rank = self.plan.micro_per_epoch * self.cfg.batch_size if self.plan.micro_per_epoch else None
        self._loader = self.make_loader(self.cfg.seed + epoch + self.seed_offset, per_rank)
        self._it = iter(self._loader)
        for _ in range(skip_micro):
            next(self._it)

    def next(self) -> dict:
        assert self._it is not None
        try:
            return next(self._it)
        except StopIteration:  # should not happen: the loader yields >= micro_per_epoch batches
            self.start_epoch(self.epoch)
            return next(self._it)

    def close(self) -> None:
        self._it = None
        self._loader = None


def _metrics_writer(path: Path, resume_step: int) -> tuple[TextIO, csv.DictWriter]:
    """Open ``metrics.csv`` for appending; on resume drop rows after the resumed step."""
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


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: CSV + stdout only
        return None
    return SummaryWriter(str(path))


def _resolve_resume(cfg: TrainConfig, ckpt_dir: Path) -> dict | None:
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


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    if cfg.precision == "bf16" and device.type != "cuda":
        log.warning("bf16 autocast is only used on GPU; running fp32 on %s", device)
    if use_bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training with ``cfg``; returns the summary dict (also written to ``<out_dir>/summary.json``)."""
    t_start = time.time()
    info = gdist.init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = info.device
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            ckpt.remove_checkpoints(ckpt_dir)
    gdist.barrier()
    try:
        return _train(cfg, info, device, out_dir, ckpt_dir, t_start)
    finally:
        gdist.cleanup(info)


def _train(  # noqa: C901 -- the trainer loop is due for a split (separate issue)
    cfg: TrainConfig, info: gdist.DistInfo, device: torch.device, out_dir: Path, ckpt_dir: Path, t_start: float
) -> dict[str, Any]:
    shard_paths = resolve_shards(cfg.shards)
    plan = _Plan(cfg, info.world_size, shard_paths)
    mcfg = cfg.model_config()

    # Same seed on every rank for the model init (DDP also broadcasts rank 0's weights).
    seed_everything(cfg.seed)
    model = build_model(cfg)
    model.to(device)
    model.teachers_to(device)
    queue = CoordinateQueue(cfg.queue_size).to(device)

    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, plan.effective_batch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * plan.total_steps)
    resume = _resolve_resume(cfg, ckpt_dir)
    if resume is None and not cfg.resume and ckpt.list_checkpoints(ckpt_dir):
        raise FileExistsError(
            f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue, --overwrite true to start "
            "over, or use a fresh --out-dir"
        )
    start_step = 0
    state: dict[str, Any] | None = None
    if resume is not None:
        ckpt.load_model(model, resume["model"])
        state = ckpt.load_train_state(resume["state"])
        start_step = int(state["step"])
        queue.load_state(state["queue"])

    ddp: DDP | None = None
    if info.distributed:
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp_model: nn.Module = ddp if ddp is not None else model
    optimizer = build_optimizer(model, lr, weight_decay=cfg.weight_decay, fused=True if device.type == "cuda" else None)
    scheduler = build_scheduler(
        optimizer, warmup_steps=warmup, total_steps=plan.total_steps, min_ratio=cfg.min_lr_ratio
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    # Per-rank RNG for anything stochastic in the step (drop-path); restored exactly on resume.
    seed_everything(cfg.seed * 1000 + info.rank + 1)
    if state is not None and state.get("rng") and len(state["rng"]) == info.world_size:
        ckpt.set_rng_state(state["rng"][info.rank])

    rs_stats = json.loads(Path(cfg.rs_stats).read_text()) if cfg.rs_stats else None
    stream = _BatchStream(cfg, mcfg, plan, rs_stats, shard_paths)

    # Coordinate queue: filled with real coordinates before the first step (restored on resume).
    if state is None and cfg.queue_size > 0 and cfg.queue_init != "none":
        prefill_queue(queue, cfg, stream, info, device)

    epoch, done_in_epoch = plan.epoch_of(start_step)
    if start_step > 0 and cfg.resume_data == "reseed":
        stream.seed_offset = 1_000_003 * start_step
        stream.start_epoch(epoch)
    else:
        stream.start_epoch(epoch, skip_micro=done_in_epoch * cfg.accum_steps)

    csv_fh: TextIO | None = None
    writer: csv.DictWriter | None = None
    tb: Any = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(
            out_dir / "config.json",
            json.dumps(
                {
                    "train": dataclasses.asdict(cfg),
                    "model": mcfg.to_dict(),
                    "world_size": info.world_size,
                    "effective_batch": plan.effective_batch,
                    "lr": lr,
                    "total_steps": plan.total_steps,
                    "steps_per_epoch": plan.steps_per_epoch,
                    "epoch_samples": plan.epoch_samples,
                    "n_shards": len(shard_paths),
                },
                indent=2,
            ),
        )
        csv_fh, writer = _metrics_writer(out_dir / "metrics.csv", start_step)
        tb = _tensorboard(out_dir / "tb")
    validator = build_validator(cfg, model, queue, shard_paths, rs_stats=rs_stats, device=device, out_dir=out_dir,
                                is_main=info.is_main, world_size=info.world_size, start_step=start_step,
                                autocast=lambda: _autocast(cfg, device), tb=tb)

    def train_state(step: int) -> dict[str, Any]:
        rngs = gdist.all_gather_object(ckpt.rng_state())
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "queue": queue.state(),
            "rng": rngs,
            "epoch": plan.epoch_of(step)[0],
            "world_size": info.world_size,
            "train_config": json.dumps(dataclasses.asdict(cfg)),
            "model_config": json.dumps(mcfg.to_dict()),
            "losses": dict(last_losses),
        }

    last_record: dict[str, Any] | None = None
    last_saved = -1
    last_losses: dict[str, float] = {}
    if resume is not None and state is not None:
        last_record = {k: str(Path(resume[k]).resolve()) for k in ("model", "state")}
        last_saved = start_step
        last_losses = {k: float(v) for k, v in state.get("losses", {}).items()}

    def save(step: int) -> None:
        nonlocal last_record, last_saved
        st = train_state(step)  # collective: every rank
        if info.is_main:
            last_record = ckpt.save_checkpoint(
                ckpt_dir,
                step,
                model,
                st,
                keep=cfg.keep_checkpoints,
                metadata={"step": str(step), "model_config": json.dumps(mcfg.to_dict()),
                          # the RS normalisation travels with the weights (evaluation needs the same)
                          "rs_stats": json.dumps(rs_stats) if rs_stats is not None else "null"},
            )
        last_saved = step
        gdist.barrier()

    step = start_step
    samples_seen = start_step * plan.samples_per_step
    status = "completed"
    interval_t0, interval_samples = time.time(), 0
    model.train()
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes else None
    params = [p for p in model.parameters() if p.requires_grad]

    while step < plan.total_steps:
        cur_epoch = plan.epoch_of(step)[0]
        if cur_epoch != stream.epoch:
            stream.start_epoch(cur_epoch)
        t0 = time.time()
        sums = torch.zeros(len(LOSS_KEYS), device=device)
        for micro in range(cfg.accum_steps):
            batch = stream.next()
            rs = batch["rs"].to(device, non_blocking=True)
            sv = batch["sv"].to(device, non_blocking=True)
            lonlat = batch["lonlat"].to(device, torch.float64)
            rel_xy = batch["rel_xy"].to(device)
            q = queue.coords() if queue.filled > 0 else None
            last_micro = micro == cfg.accum_steps - 1
            sync = contextlib.nullcontext() if (last_micro or ddp is None) else ddp.no_sync()
            with sync:
                with _autocast(cfg, device):
                    out = ddp_model(rs, sv, lonlat, rel_xy, queue_lonlat=q, distill_weight=cfg.distill_weight)
                losses = out["losses"]
                (losses["loss"] / cfg.accum_steps).backward()
            queue.enqueue(lonlat)  # all-gathered: identical queues on every rank
            sums += torch.stack([losses.get(k, torch.zeros((), device=device)).detach().float() for k in LOSS_KEYS])
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        cur_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples_seen += plan.samples_per_step
        interval_samples += plan.samples_per_step

        mean = gdist.all_reduce_mean(sums / cfg.accum_steps).tolist()
        last_losses = dict(zip(LOSS_KEYS, mean, strict=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = max(time.time() - t0, 1e-9)
        row = {
            "step": step,
            "epoch": cur_epoch,
            **{k: round(v, 6) for k, v in last_losses.items()},
            "lr": cur_lr,
            "grad_norm": round(grad_norm, 6),
            "samples_per_s": round(plan.samples_per_step / dt, 3),
            "samples_seen": samples_seen,
            "elapsed_s": round(time.time() - t_start, 3),
            "queue_filled": queue.filled,
        }
        if writer is not None and csv_fh is not None:  # rank 0
            writer.writerow(row)
            csv_fh.flush()
            if tb is not None:
                for k in (*LOSS_KEYS, "lr", "grad_norm", "samples_per_s"):
                    tb.add_scalar(f"train/{k}", row[k], step)
        if info.is_main and (step % cfg.log_every == 0 or step == plan.total_steps or step == start_step + 1):
            now = time.time()
            line = dict(row, samples_per_s=round(interval_samples / max(now - interval_t0, 1e-9), 3))
            print(METRICS_PREFIX + json.dumps(line), flush=True)
            interval_t0, interval_samples = now, 0
        if validator.due(step):
            t_val = time.time()
            validator.run(step)
            interval_t0 += time.time() - t_val  # keep validation out of the logged training throughput

        out_of_time = budget_s is not None and (time.time() - t_start) > budget_s
        if gdist.any_rank(out_of_time, device) and step < plan.total_steps:
            status = "time_budget"
            save(step)
            break
        if cfg.save_every > 0 and step % cfg.save_every == 0 and step < plan.total_steps:
            save(step)

    if last_saved != step:
        save(step)
    validator.finish(step)
    stream.close()
    checksums = gdist.all_gather_object(param_checksum(model))
    wall = time.time() - t_start
    summary = {
        "status": status,
        "steps": step,
        "total_steps": plan.total_steps,
        "resumed_from_step": start_step if resume is not None else None,
        "final_loss": last_losses.get("loss"),
        "final_losses": last_losses,
        "checkpoint": last_record["model"] if last_record else None,
        "train_state": last_record["state"] if last_record else None,
        "out_dir": str(out_dir.resolve()),
        "metrics_csv": str((out_dir / "metrics.csv").resolve()),
        "world_size": info.world_size,
        "device": str(device),
        "batch_size": cfg.batch_size,
        "accum_steps": cfg.accum_steps,
        "effective_batch": plan.effective_batch,
        "lr": lr,
        "steps_per_epoch": plan.steps_per_epoch,
        "epochs": step / plan.steps_per_epoch if plan.steps_per_epoch else None,
        "samples_seen": samples_seen,
        "wall_seconds": round(wall, 3),
        "param_checksums": checksums,
        "ranks_in_sync": len(set(checksums)) == 1,
        **validator.summary(),
    }
    if info.is_main:
        if csv_fh is not None:
            csv_fh.close()
        if tb is not None:
            tb.close()
        ckpt.atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
        print(SUMMARY_PREFIX + json.dumps(summary), flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point (also callable in-process); returns the run summary."""
    logging.basicConfig(level=os.environ.get("GAIR_LOG_LEVEL", "WARNING"), stream=sys.stderr)
    return train(parse_config(argv))


if __name__ == "__main__":
    main()
