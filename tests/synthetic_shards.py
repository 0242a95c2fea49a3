"""Tiny, contract-conformant synthetic shards for tests and CPU smoke runs.

Every sample is labelled ``"synthetic": true``. Tiles are 0.01 degree cells on a small grid
near (0, 0); the split is spatial (per tile), several SV points share each tile.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from gair_dataset.bands import S2_L2A_BANDS
from gair_dataset.shards import ShardWriter, sample_key

_TILE_DEG = 0.01
_SPLIT_CYCLE = ("train",) * 8 + ("val", "test")


def _synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-120, 120, size=(3, 2)).astype(np.float32)
    img = base[None, None, :] + xx[..., None] * slope[:, 0] + yy[..., None] * slope[:, 1]
    img += rng.normal(0, 12, size=img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _synthetic_rs(rng: np.random.Generator, bands: int, size: int) -> np.ndarray:
    means = rng.uniform(300, 3500, size=(bands, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    field_ = means * (0.8 + 0.4 * xx[None]) * (0.9 + 0.2 * yy[None])
    noise = rng.normal(0, 150, size=(bands, size, size))
    return np.clip(field_ + noise, 1, 12000).astype(np.uint16)


def write_synthetic_shards(out_dir: str | os.PathLike[str], n_samples: int, *, rs_size: int = 64,
                           sv_size: int = 64, bands: int = 10, samples_per_shard: int = 64,
                           seed: int = 0, name: str = "synthetic", points_per_tile: int = 4,
                           dates: int = 1) -> list[str]:
    """Write ``n_samples`` synthetic samples as WebDataset shards (plus manifest).

    Args:
        out_dir: Output folder.
        n_samples: Number of samples.
        rs_size: RS chip height and width (pixels).
        sv_size: SV JPEG height and width (pixels).
        bands: Number of RS bands; names follow the Sentinel-2 10-band order when ``bands <= 10``.
        samples_per_shard: Maximum samples per shard.
        seed: RNG seed (same seed and arguments give byte-identical shards).
        name: Shard set name (``<name>-%06d.tar``).
        points_per_tile: SV points per tile.
        dates: Dates per sample: 1 writes ``rs.npy`` as ``bands x H x W`` (format 1 samples); ``D >= 2``
            writes ``D x bands x H x W`` and a ``dates`` list in the JSON (date ``d`` is item
            ``synthetic-item-<tile % 3>-d<d>``, date 0 matching the top-level fields).

    Returns:
        Absolute shard paths, in order.
    """
    rng = np.random.default_rng(seed)
    band_names = list(S2_L2A_BANDS[:bands]) if bands <= len(S2_L2A_BANDS) else [
        f"band{i:02d}" for i in range(1, bands + 1)
    ]
    per_row = 16
    with ShardWriter(Path(out_dir), name=name, samples_per_shard=samples_per_shard) as writer:
        # Keys are zero-padded, so generation order is key order.
        for i in range(n_samples):
            t = i // points_per_tile
            tile_id = f"synth-t{t:06d}"
            sv_id = f"sv{i:08d}"
            lon_min = (t % per_row) * _TILE_DEG
            lat_max = -(t // per_row) * _TILE_DEG + _TILE_DEG
            x, y = (float(v) for v in rng.uniform(0.0, 1.0, size=2))
            lon = lon_min + x * _TILE_DEG
            lat = lat_max - y * _TILE_DEG
            meta = {
                "sv_id": sv_id,
                "tile_id": tile_id,
                "lon": lon,
                "lat": lat,
                "x": x,
                "y": y,
                "col": int(x * rs_size),
                "row": int(y * rs_size),
                "bbox": [lon_min, lat_max, lon_min + _TILE_DEG, lat_max - _TILE_DEG],
                "crs": "EPSG:4326",
                "item_ids": [f"synthetic-item-{t % 3}"],
                "datetime": "2023-06-01T10:00:00Z",
                "collection": "synthetic",
                "platform": "synthetic",
                "bands": band_names,
                "processing_baseline": None,
                "harmonized": False,
                "split": _SPLIT_CYCLE[t % len(_SPLIT_CYCLE)],
                "synthetic": True,
            }
            rs = _synthetic_rs(rng, bands, rs_size)
            if dates > 1:
                rs = np.stack([rs, *(_synthetic_rs(rng, bands, rs_size) for _ in range(dates - 1))])
                meta["dates"] = [{"item_id": f"synthetic-item-{t % 3}" + (f"-d{d}" if d else ""),
                                  "datetime": f"{2023 - d}-06-01T10:00:00Z", "platform": "synthetic",
                                  "processing_baseline": None, "harmonized": False, "cloud_cover": None}
                                 for d in range(dates)]
            writer.write(sample_key(tile_id, sv_id), rs, _synthetic_jpeg(rng, sv_size), meta)
    return writer.info.paths
