"""Load a trained GAIR model (or the same architecture with random weights) and embed shard sets for evaluation.

A training run's folder (``--out-dir`` of :mod:`gair_model.train`) holds ``config.json`` (the train and model
configuration, including the ``rs_stats`` file used for the RS normalisation) and ``checkpoints/`` with
safetensors weights whose header carries the model configuration. :func:`load_trained` accepts the run folder,
the checkpoint folder, ``latest.json``, a ``.safetensors`` file, or the URL prefix of a checkpoint published to
object storage (``s3://...``, downloaded first, see :func:`gair_model.checkpoint.fetch_checkpoint`).
:func:`random_model` builds the same architecture with random weights: the "untrained" baseline of every evaluation.

:func:`iter_eval_batches` reads shards in a fixed order, without augmentation (the evaluation view of the one
loader), and :func:`embed_shards` returns every embedding the model produces for those samples.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from gair_dataset import object_store
from gair_model import checkpoint as ckpt
from gair_model.loader import build_loader, resolve_shards
from gair_model.models.gair import GAIRConfig, GAIRModel

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A checkpoint or run folder cannot be turned into a model (missing file, no model configuration)."""


@dataclass
class LoadedModel:
    """A model ready for evaluation and where it came from.

    Attributes:
        model: The model, in eval mode.
        config: Its configuration.
        checkpoint: The safetensors file it was loaded from (``None``: random weights).
        step: The optimiser step of the checkpoint, when known.
        rs_stats: Per-band RS statistics used in training (``{"mean", "std"}``), or ``None`` (loader defaults).
        label: Short name for reports (``trained``, ``random``, ...).
        train_config: The trainer configuration of the run, when known.
        rs_stats_source: Where ``rs_stats`` came from (checkpoint header, run config, given, loader defaults).
        run_dir: The training run folder of the checkpoint, when it is inside one.
        preprocessing: The loader's resize options the model was trained with (``rs_resize``, ``sv_resize``);
            evaluation reads its inputs the same way.
    """

    model: GAIRModel
    config: GAIRConfig
    checkpoint: str | None = None
    step: int | None = None
    rs_stats: dict[str, list[float]] | None = None
    label: str = "trained"
    train_config: dict[str, Any] = field(default_factory=dict)
    rs_stats_source: str = "given"
    run_dir: str | None = None
    preprocessing: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """The device the model's parameters are on."""
        return next(self.model.parameters()).device


def _checkpoint_record(path: Path) -> tuple[Path, Path | None]:
    """``(safetensors file, run folder or None)`` for a run folder, checkpoint folder, latest.json or file."""
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        rec = ckpt.find_latest(ckpt_dir)
        if rec is None:
            raise ModelLoadError(f"{path}: no checkpoint found (expected checkpoints/latest.json or "
                                 "step_*.safetensors)")
        model_path = Path(rec["model"])
    elif path.name == ckpt.LATEST:
        try:
            model_path = Path(json.loads(path.read_text())["model"])
        except (ValueError, KeyError) as exn:
            raise ModelLoadError(f"{path}: not a checkpoint record ({exn})") from None
    elif path.suffix == ".safetensors":
        model_path = path
    else:
        raise ModelLoadError(f"{path}: give a training run folder, a checkpoint folder, latest.json or .safetensors")
    if not model_path.is_file():
        raise ModelLoadError(f"checkpoint file missing: {model_path}")
    run_dir = model_path.parent.parent if model_path.parent.name == "checkpoints" else None
    return model_path, run_dir


def read_checkpoint_header(model_path: str | Path) -> dict[str, str]:
    """The string metadata of a GAIR checkpoint's safetensors header (``step``, ``model_config``, ``rs_stats``)."""
    with safe_open(str(model_path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def read_checkpoint_config(model_path: str | Path) -> tuple[GAIRConfig, int | None]:
    """The model configuration (and step) stored in a GAIR checkpoint's safetensors header."""
    meta = read_checkpoint_header(model_path)
    if "model_config" not in meta:
        raise ModelLoadError(f"{model_path}: no model_config in the safetensors header (not a GAIR checkpoint?)")
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    return GAIRConfig.from_dict(json.loads(meta["model_config"])), step


def _training_rs_stats(model_path: Path, run_dir: Path | None,
                       train_cfg: dict[str, Any]) -> tuple[dict[str, list[float]] | None, str]:
    """The RS statistics the checkpoint was trained with, and where they came from.

    The checkpoint header carries them (current trainer); older checkpoints name a file in the run's
    ``config.json`` (resolved against the run folder when relative). A run that used statistics that can no
    longer be found is an error: evaluating with other statistics would silently shift every RS input.
    """
    header = read_checkpoint_header(model_path)
    if "rs_stats" in header:
        stats = json.loads(header["rs_stats"])
        return (stats, "checkpoint header") if stats else (None, "loader defaults (training used none)")
    named = train_cfg.get("rs_stats")
    if not named:
        if run_dir is None:
            log.warning("%s: no RS statistics in the checkpoint header and no run folder to name them: using the "
                        "loader's Sentinel-2 defaults (pass rs_stats if training used others)", model_path)
            return None, "unknown: loader defaults"
        return None, "loader defaults (training used none)"
    stats_path = Path(named)
    if not stats_path.is_absolute() and run_dir is not None:
        stats_path = run_dir / stats_path
    if not stats_path.is_file():
        raise ModelLoadError(f"{model_path}: training used RS statistics from {named}, which no longer exists; "
                             "pass rs_stats explicitly")
    return json.loads(stats_path.read_text()), f"file {stats_path.name} named in the run's config.json"


#: Loader options a checkpoint records so that evaluation resizes its inputs as training did.
EVAL_PREPROCESSING_KEYS = ("rs_resize", "sv_resize")


def _training_preprocessing(model_path: Path, train_cfg: dict[str, Any]) -> dict[str, str]:
    """The resize options of training: the checkpoint header, else the run's config.json, else the defaults."""
    header = read_checkpoint_header(model_path)
    if "preprocessing" in header:
        recorded = json.loads(header["preprocessing"])
    else:
        recorded = {k: train_cfg[k] for k in EVAL_PREPROCESSING_KEYS if k in train_cfg}
    return {k: str(v) for k, v in recorded.items() if k in EVAL_PREPROCESSING_KEYS}


def load_trained(path: str | Path, *, device: str | torch.device = "cpu",
                 rs_stats: dict[str, list[float]] | None = None, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load a trained GAIR model for evaluation.

    Args:
        path: Run folder, checkpoint folder, ``latest.json`` or ``.safetensors`` file, or the URL prefix of a
            published checkpoint (``s3://bucket/runs/x/``: downloaded into ``cache_dir`` first).
        device: Where to put the model.
        rs_stats: RS band statistics; default: those the checkpoint was trained with (from its header, or for
            older checkpoints the file named in the run's ``config.json``).
        cache_dir: Download folder for a URL (default :func:`gair_model.checkpoint.default_cache_dir`).

    Returns:
        The model in eval mode with its provenance.

    Raises:
        ModelLoadError: When no checkpoint, model configuration or training RS statistics can be found.
    """
    if object_store.is_url(str(path)):
        path = ckpt.fetch_checkpoint(str(path), cache_dir)
    model_path, run_dir = _checkpoint_record(Path(path))
    config, step = read_checkpoint_config(model_path)
    train_cfg: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "config.json").is_file():
        train_cfg = json.loads((run_dir / "config.json").read_text()).get("train", {})
    source = "given"
    if rs_stats is None:
        rs_stats, source = _training_rs_stats(model_path, run_dir, train_cfg)
    # Local weight files named in the config were already folded into the checkpoint.
    config.rs_weights = config.sv_weights = None
    model = GAIRModel(config)
    ckpt.load_model(model, model_path)
    model.to(device).eval()
    return LoadedModel(model, config, str(model_path.resolve()), step, rs_stats, "trained", train_cfg,
                       rs_stats_source=source, run_dir=str(run_dir.resolve()) if run_dir else None,
                       preprocessing=_training_preprocessing(model_path, train_cfg))


def random_model(config: GAIRConfig, *, seed: int = 0, device: str | torch.device = "cpu",
                 rs_stats: dict[str, list[float]] | None = None,
                 preprocessing: dict[str, str] | None = None) -> LoadedModel:
    """The same architecture with random weights (seeded): the untrained baseline (fed like ``preprocessing``)."""
    config = GAIRConfig.from_dict(config.to_dict())
    config.rs_weights = config.sv_weights = None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GAIRModel(config)
    model.to(device).eval()
    return LoadedModel(model, config, None, None, rs_stats, "random", {},
                       rs_stats_source="given" if rs_stats is not None else "loader defaults",
                       preprocessing=dict(preprocessing or {}))


def iter_eval_batches(loaded: LoadedModel, shards: str | os.PathLike[str] | Sequence[str], *,
                      splits: Sequence[str] | None = ("test",), batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """Batches of a shard set in a fixed order, without augmentation, sized for ``loaded``'s encoders.

    Args:
        loaded: The model whose input sizes, RS statistics and resize options apply.
        shards: Shard specification (see :func:`gair_model.loader.resolve_shards`).
        splits: Keep only these splits (``None``: all).
        batch_size: Samples per batch (the last batch may be smaller).

    Yields:
        Loader batches (``rs``, ``sv``, ``lonlat``, ``rel_xy``, ``key``, ``meta``).
    """
    cfg = loaded.config
    spec = str(shards) if isinstance(shards, str | os.PathLike) else [str(s) for s in shards]
    loader = build_loader(resolve_shards(spec),
                          batch_size=batch_size, rs_size=cfg.rs_img_size, sv_size=cfg.sv_img_size,
                          rs_bands=cfg.rs_bands, resampled=False, shuffle_buffer=0, num_workers=0,
                          splits=tuple(splits) if splits is not None else None, rs_stats=loaded.rs_stats,
                          split_by_node=False, rs_resize=loaded.preprocessing.get("rs_resize", "bilinear"),
                          sv_resize=loaded.preprocessing.get("sv_resize", "crop"))
    yield from loader


@dataclass
class ShardEmbeddings:
    """Every embedding of a set of samples (row ``i`` of each array is sample ``i``).

    Attributes:
        keys: Sample keys.
        meta: Sample JSON records.
        lonlat: ``N x 2`` (lon, lat) degrees.
        rel_xy: ``N x 2`` position inside the tile, from the top-left, in [0, 1].
        sv: ``N x E`` projected SV embeddings.
        rs_local: ``N x E`` localised RS embeddings at the SV position.
        rs_global: ``N x D`` mean-token RS embeddings.
        loc: ``N x E`` location embeddings.
        rs_grid: ``N x D x Hg x Wg`` token grids (only when asked for).
    """

    keys: list[str]
    meta: list[dict[str, Any]]
    lonlat: np.ndarray
    rel_xy: np.ndarray
    sv: np.ndarray
    rs_local: np.ndarray
    rs_global: np.ndarray
    loc: np.ndarray
    rs_grid: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)


@torch.no_grad()
def embed_batch(loaded: LoadedModel, batch: dict[str, Any], *, keep_grid: bool = False) -> dict[str, torch.Tensor]:
    """Embed one loader batch: ``sv``, ``rs_local``, ``rs_global``, ``loc`` (and ``rs_grid``), on the CPU."""
    model, device = loaded.model, loaded.device
    rs_out = model.encode_rs(batch["rs"].to(device), batch["rel_xy"].to(device))
    out = {
        "sv": model.encode_sv(batch["sv"].to(device)),
        "rs_local": rs_out["rs_local"],
        "rs_global": rs_out["rs_global"],
        "loc": model.encode_location(batch["lonlat"].to(device, torch.float64)),
    }
    if keep_grid:
        out["rs_grid"] = rs_out["rs_grid"]
    return {k: v.float().cpu() for k, v in out.items()}


def embed_shards(loaded: LoadedModel, shards: str | os.PathLike[str] | Sequence[str], *,
                 splits: Sequence[str] | None = ("test",), batch_size: int = 64, keep_grid: bool = False,
                 max_samples: int | None = None) -> ShardEmbeddings:
    """Embed every sample of a shard set (in shard order) with ``loaded``.

    Args:
        loaded: The model.
        shards: Shard specification.
        splits: Keep only these splits (``None``: all).
        batch_size: Samples per forward pass.
        keep_grid: Also keep the RS token grids (needed for in-tile localisation).
        max_samples: Stop after this many samples.

    Returns:
        The embeddings; empty arrays when no sample matched.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    keys: list[str] = []
    meta: list[dict[str, Any]] = []
    lonlat: list[torch.Tensor] = []
    rel_xy: list[torch.Tensor] = []
    for batch in iter_eval_batches(loaded, shards, splits=splits, batch_size=batch_size):
        emb = embed_batch(loaded, batch, keep_grid=keep_grid)
        for k, v in emb.items():
            parts.setdefault(k, []).append(v)
        keys += batch["key"]
        meta += batch["meta"]
        lonlat.append(batch["lonlat"].double())
        rel_xy.append(batch["rel_xy"].double())
        if max_samples is not None and len(keys) >= max_samples:
            break
    n = len(keys) if max_samples is None else min(len(keys), max_samples)
    e, d = loaded.config.embed_dim, loaded.model.rs_encoder.embed_dim

    def cat(name: str, width: int) -> np.ndarray:
        if name not in parts:
            return np.zeros((0, width), dtype=np.float32)
        return torch.cat(parts[name])[:n].numpy()

    grid = None
    if keep_grid:
        hg, wg = loaded.model.rs_encoder.grid_size
        grid = torch.cat(parts["rs_grid"])[:n].numpy() if "rs_grid" in parts else np.zeros((0, d, hg, wg), np.float32)
    return ShardEmbeddings(
        keys=keys[:n], meta=meta[:n],
        lonlat=torch.cat(lonlat)[:n].numpy() if lonlat else np.zeros((0, 2)),
        rel_xy=torch.cat(rel_xy)[:n].numpy() if rel_xy else np.zeros((0, 2)),
        sv=cat("sv", e), rs_local=cat("rs_local", e), rs_global=cat("rs_global", d), loc=cat("loc", e), rs_grid=grid,
    )
