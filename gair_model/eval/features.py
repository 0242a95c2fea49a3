"""Frozen-encoder features of a downstream task for one *method*.

The methods:

* ``gair`` / ``random_init`` (or any name mapped to a :class:`~gair_model.eval.loading.LoadedModel`): the GAIR
  encoder that matches the task (``encode_location``, ``encode_sv`` or the RS mean token
  ``rs_encoder.forward_global``);
* ``raw_lonlat_rad`` (location tasks only): (lon, lat) in radians, the coordinate baseline;
* ``geoclip_pretrained`` (location tasks only): the pretrained GeoCLIP location encoder
  (:mod:`gair_model.eval.geoclip_baseline`).

Images are decoded once per task (:func:`decode_images`, at every input size the methods need) and reused by
every method. SV images are resized (shorter side) and centre-cropped to ``config.sv_img_size`` and normalised
with the ImageNet statistics, without augmentation. RS scene datasets are RGB JPEGs, while the RS encoder takes
the 10 Sentinel-2 bands; :data:`RGB_TO_S2_NOTE` documents the mapping (:func:`rgb_to_s2`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gair_model.eval.geoclip_baseline import GeoCLIPLocation, geoclip_embed
from gair_model.eval.loading import LoadedModel
from gair_model.eval.tasks import TaskData
from gair_model.loader import IMAGENET_MEAN, IMAGENET_STD, decode_sv

Log = Callable[[str], None] | None

RAW_LONLAT = "raw_lonlat_rad"
GEOCLIP = "geoclip_pretrained"
#: Methods that need no model and apply to location tasks only.
LOCATION_ONLY_METHODS = (RAW_LONLAT, GEOCLIP)

#: The 10 Sentinel-2 bands of the RS encoder, in input order.
S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
#: RGB channel feeding each visible band (0 = R, 1 = G, 2 = B); every other band gets the RGB mean.
RGB_SOURCE = {"B02": 2, "B03": 1, "B04": 0}
RGB_TO_S2_NOTE = (
    "RGB JPEG -> 10 Sentinel-2 bands: B04 = R/255, B03 = G/255, B02 = B/255; the 7 bands without an RGB "
    "counterpart (B05, B06, B07, B08, B8A, B11, B12) = mean(R, G, B)/255, so that every input band keeps the "
    "scene's spatial texture instead of a constant that carries no information (no real spectral information "
    "exists for them either way)."
)
#: One-line form of :data:`RGB_TO_S2_NOTE` for result rows.
RGB_TO_S2_SHORT = "RS input from RGB: B04=R, B03=G, B02=B, other 7 S2 bands = mean(R, G, B), all /255"

DEFAULT_BATCH = 128
_LOG_EVERY = 500


def rgb_to_s2(images: np.ndarray) -> np.ndarray:
    """Map ``N x S x S x 3`` uint8 RGB images onto the 10 RS-encoder bands (see :data:`RGB_TO_S2_NOTE`).

    Args:
        images: RGB images.

    Returns:
        ``N x 10 x S x S`` float32 in [0, 1].
    """
    rgb = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    grey = rgb.mean(axis=1)
    bands = [rgb[:, RGB_SOURCE[b]] if b in RGB_SOURCE else grey for b in S2_BANDS]
    return np.stack(bands, axis=1)


@dataclass
class DecodedImages:
    """A task's images decoded once, at each input size the methods need.

    Attributes:
        arrays: Size -> ``K x S x S x 3`` uint8 images (the rows in ``keep``).
        keep: Indices (into the task's rows) of the images that decoded at every size.
        n_failed: Images that could not be read or decoded.
        failed: Up to 5 examples ``"path: reason"``.
        wall_s: Seconds spent decoding.
    """

    arrays: dict[int, np.ndarray]
    keep: np.ndarray
    n_failed: int = 0
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def decode_images(paths: list[Path], sizes: Iterable[int], *, log: Log = None, name: str = "") -> DecodedImages:
    """Read and decode every image at every size (shorter-side resize + centre crop); skip unreadable ones.

    Args:
        paths: Image files.
        sizes: Output side lengths.
        log: Progress callback.
        name: Task name for log lines.

    Returns:
        The decoded images and which rows they are.
    """
    t0 = time.perf_counter()
    sizes = sorted(set(sizes))
    out: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
    keep: list[int] = []
    failed: list[str] = []
    n_failed = 0
    for i, path in enumerate(paths):
        try:
            data = Path(path).read_bytes()
            decoded = {s: decode_sv(data, s) for s in sizes}
        except Exception as exn:  # noqa: BLE001 - any unreadable image is skipped and counted
            n_failed += 1
            if len(failed) < 5:
                failed.append(f"{path}: {exn}")
            continue
        for s, img in decoded.items():
            out[s].append(img)
        keep.append(i)
        if log and (i + 1) % _LOG_EVERY == 0:
            log(f"[{name}] decoded {i + 1}/{len(paths)} images")
    arrays = {s: np.stack(v) if v else np.zeros((0, s, s, 3), np.uint8) for s, v in out.items()}
    wall = time.perf_counter() - t0
    if log:
        log(f"[{name}] decoded {len(keep)} images at {sizes} px in {wall:.1f}s ({n_failed} unreadable)")
    return DecodedImages(arrays, np.asarray(keep, dtype=np.int64), n_failed, failed, wall)


def input_size(encoder: str, loaded: LoadedModel) -> int | None:
    """Image side length a model needs for an encoder (``None`` for the location encoder)."""
    if encoder == "sv":
        return loaded.config.sv_img_size
    if encoder == "rs":
        return loaded.config.rs_img_size
    return None


def method_applies(method: str, encoder: str) -> bool:
    """Whether a method can embed the inputs of an encoder's tasks (coordinate baselines: location only)."""
    return encoder == "location" if method in LOCATION_ONLY_METHODS else True


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    return (slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


@torch.no_grad()
def location_features(loaded: LoadedModel, lonlat: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """GAIR location embeddings of ``N x 2`` (lon, lat) degrees (``N x embed_dim`` float32)."""
    model, device = loaded.model.eval(), loaded.device
    pts = torch.as_tensor(np.asarray(lonlat, dtype=np.float64))
    out = [model.encode_location(pts[s].to(device)).float().cpu() for s in _batches(len(pts), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, loaded.config.embed_dim), np.float32)


@torch.no_grad()
def sv_features(loaded: LoadedModel, images: np.ndarray, *, batch_size: int = DEFAULT_BATCH,
                log: Log = None, name: str = "") -> np.ndarray:
    """Projected SV embeddings of ``N x S x S x 3`` uint8 images (ImageNet normalisation, no augmentation)."""
    model, device = loaded.model.eval(), loaded.device
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for s in _batches(len(images), batch_size):
        x = torch.from_numpy(images[s]).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - mean) / std
        out.append(model.encode_sv(x.to(device)).float().cpu())
        if log and s.stop % (batch_size * 8) == 0:
            log(f"[{name}] sv features {s.stop}/{len(images)}")
    return torch.cat(out).numpy() if out else np.zeros((0, loaded.config.embed_dim), np.float32)


@torch.no_grad()
def rs_features(loaded: LoadedModel, images: np.ndarray, *, batch_size: int = DEFAULT_BATCH,
                log: Log = None, name: str = "") -> np.ndarray:
    """Global (mean-token) RS embeddings of ``N x S x S x 3`` uint8 RGB images mapped with :func:`rgb_to_s2`."""
    model, device = loaded.model.eval(), loaded.device
    if loaded.config.rs_bands != len(S2_BANDS):
        raise ValueError(f"RGB scenes map onto {len(S2_BANDS)} bands; the model takes {loaded.config.rs_bands}")
    out = []
    for s in _batches(len(images), batch_size):
        x = torch.from_numpy(rgb_to_s2(images[s]))
        out.append(model.rs_encoder.forward_global(x.to(device)).float().cpu())
        if log and s.stop % (batch_size * 8) == 0:
            log(f"[{name}] rs features {s.stop}/{len(images)}")
    width = loaded.model.rs_encoder.embed_dim
    return torch.cat(out).numpy() if out else np.zeros((0, width), np.float32)


def extract_features(data: TaskData, method: str, loaded: LoadedModel | None, *,
                     images: DecodedImages | None = None, geoclip: GeoCLIPLocation | None = None,
                     batch_size: int = DEFAULT_BATCH, log: Log = None) -> np.ndarray:
    """Features of a task's rows for one method.

    Args:
        data: The task's rows.
        method: ``raw_lonlat_rad``, ``geoclip_pretrained`` or the name of a model method.
        loaded: The model for a model method (ignored by the coordinate baselines).
        images: Decoded images for an image task (rows ``images.keep`` of ``data``); the features follow
            that order.
        geoclip: A loaded GeoCLIP encoder to reuse (default: load it).
        batch_size: Images per forward pass.
        log: Progress callback.

    Returns:
        ``N x D`` float32 features (``N = len(images.keep)`` for image tasks, ``len(data)`` otherwise).

    Raises:
        ValueError: The method does not apply to the task, or a needed input is missing.
    """
    spec = data.spec
    if not method_applies(method, spec.encoder):
        raise ValueError(f"method {method!r} applies to location tasks only, not {spec.name!r} ({spec.encoder})")
    if spec.encoder == "location":
        if data.lonlat is None:
            raise ValueError(f"task {spec.name!r} has no coordinates")
        if method == RAW_LONLAT:
            return np.deg2rad(data.lonlat).astype(np.float32)
        if method == GEOCLIP:
            return geoclip_embed(data.lonlat, model=geoclip)
        if loaded is None:
            raise ValueError(f"method {method!r} needs a model")
        return location_features(loaded, data.lonlat)
    if loaded is None:
        raise ValueError(f"method {method!r} needs a model")
    if images is None:
        raise ValueError(f"task {spec.name!r}: decode the images first (decode_images)")
    size = input_size(spec.encoder, loaded)
    if size not in images.arrays:
        raise ValueError(f"task {spec.name!r}: images were not decoded at {size} px (have {sorted(images.arrays)})")
    fn = sv_features if spec.encoder == "sv" else rs_features
    return fn(loaded, images.arrays[size], batch_size=batch_size, log=log, name=f"{spec.name}/{method}")
