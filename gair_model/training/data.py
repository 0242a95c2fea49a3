"""The data plan of a run: epoch arithmetic, the per-epoch loaders, and the coordinate queue's pre-fill.

Epoch arithmetic (resampled shards): one optimiser step consumes ``batch_size * world_size * accum_steps``
samples. With an epoch size ``E`` (``--epoch-samples``, else ``n_samples`` of the shard set's ``shards.json``),
``steps_per_epoch = ceil(E / samples_per_step)`` and each rank's loader is built per epoch with
``epoch_samples = steps_per_epoch * accum_steps * batch_size`` (the loader splits that over its workers) and the
seed ``seed + epoch`` (the loader mixes in rank and worker). On resume the stream is either drawn afresh with a
seed that depends on the resumed step (``--resume-data reseed``, the default: nothing is decoded twice) or replayed
up to the checkpoint (``skip``: exact, but every skipped sample is decoded again).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gair_model import distributed as gdist
from gair_model.losses import CoordinateQueue
from gair_model.models.gair import GAIRConfig
from gair_model.training.config import TrainConfig


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


def _remote_counts(shard_urls: Sequence[str]) -> dict[str, int] | None:
    """Samples per shard URL, from the ``shards.json`` of each published set they belong to (None if unknown)."""
    from gair_dataset import object_store

    counts: dict[str, int] = {}
    for set_url in dict.fromkeys(u.rsplit("/", 1)[0] for u in shard_urls):
        try:
            for entry in object_store.read_shards_json(set_url)["shards"]:
                counts[object_store.join(set_url, str(entry["path"]))] = int(entry["n_samples"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return counts


def epoch_size_from_shards(shard_paths: Sequence[str]) -> int | None:
    """Number of samples in the given shard files, from their shard sets' ``shards.json`` (``None`` if unknown).

    Local files and object-storage URLs (``s3://...``: the published set's ``shards.json``) alike.
    """
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
    urls = [p for p in shard_paths if "://" in p]
    if urls:
        remote = _remote_counts(urls)
        if remote is None:
            return None
        counts.update(remote)
    try:
        return sum(counts[p if "://" in p else str(Path(p).resolve())] for p in shard_paths)
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


def prefill_queue(
    queue: CoordinateQueue, cfg: TrainConfig, stream: BatchStream, info: gdist.DistInfo, device: torch.device
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


class DataPlan:
    """Step / epoch arithmetic of a run."""

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


class BatchStream:
    """Per-epoch loaders (seeded by epoch) yielding micro-batches; optional skipping for an exact resume."""

    def __init__(
        self, cfg: TrainConfig, mcfg: GAIRConfig, plan: DataPlan, rs_stats: dict | None, shard_paths: list[str]
    ) -> None:
        self.cfg, self.mcfg, self.plan, self.rs_stats = cfg, mcfg, plan, rs_stats
        self.shard_paths = shard_paths
        self.epoch = -1
        self._it: Iterator[dict] | None = None
        self._loader: Any = None
        self.seed_offset = 0

    def make_loader(self, seed: int, epoch_samples: int | None) -> Any:
        """A training loader over the run's shards (resampled, shuffled, augmented)."""
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
            **loader_preprocessing(cfg),
        )

    def start_epoch(self, epoch: int, skip_micro: int = 0) -> None:
        """Build the loader of ``epoch`` (its seed shifted by :attr:`seed_offset`), skipping ``skip_micro`` batches."""
        self.close()
        self.epoch = epoch
        per_rank = self.plan.micro_per_epoch * self.cfg.batch_size if self.plan.micro_per_epoch else None
        self._loader = self.make_loader(self.cfg.seed + epoch + self.seed_offset, per_rank)
        self._it = iter(self._loader)
        for _ in range(skip_micro):
            next(self._it)

    def next(self) -> dict:
        """The next micro-batch."""
        assert self._it is not None
        try:
            return next(self._it)
        except StopIteration:  # should not happen: the loader yields >= micro_per_epoch batches
            self.start_epoch(self.epoch)
            return next(self._it)

    def close(self) -> None:
        """Drop the current loader."""
        self._it = None
        self._loader = None


def loader_preprocessing(cfg: TrainConfig) -> dict[str, Any]:
    """The loader's preprocessing options of a run (training and validation read alike)."""
    return {"rs_resize": cfg.rs_resize, "rs_jitter": cfg.rs_jitter, "rs_jitter_p": cfg.rs_jitter_p,
            "sv_resize": cfg.sv_resize}


def start_stream(stream: BatchStream, plan: DataPlan, cfg: TrainConfig, start_step: int) -> None:
    """Position ``stream`` at optimiser step ``start_step`` (0 for a fresh run), per ``cfg.resume_data``."""
    epoch, done_in_epoch = plan.epoch_of(start_step)
    if start_step > 0 and cfg.resume_data == "reseed":
        stream.seed_offset = 1_000_003 * start_step
        stream.start_epoch(epoch)
    else:
        stream.start_epoch(epoch, skip_micro=done_in_epoch * cfg.accum_steps)
