"""EPSG:4326 pre-cut tiles warped from a real Sentinel-2 patch (../shared/data/rasters), on dyadic degree bounds.

The tile side is 1/256 degree and the corners are multiples of it, so every offset of the tests is exact in binary
floating point and can be computed by hand. Tiles: a 2 x 2 block ``a`` (north-west), ``b`` (north-east), ``c``
(south-west), ``d`` (south-east), and ``e`` of the same size centred on the block's middle corner (it overlaps all
four).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import Resampling, reproject, transform_bounds

from tests.conftest import shared_path

#: The real patch the tiles are warped from (12 bands uint16, UTM 34S, South Africa).
PATCH = ("rasters", "s2_l2a_patches", "images", "patch_252161.tif")
SIDE = 1 / 256  # degrees
PX = 64  # pixels per tile side
#: Tile name -> (column, row) of its north-west corner in tile sides from the origin (east, south).
LAYOUT = {"a": (0.0, 0.0), "b": (1.0, 0.0), "c": (0.0, 1.0), "d": (1.0, 1.0), "e": (0.5, 0.5)}


def origin(src: Path) -> tuple[float, float]:
    """North-west corner of tile ``a``: a multiple of SIDE inside the patch."""
    with rasterio.open(src) as ds:
        west, _south, _east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    return math.ceil((west + 0.002) / SIDE) * SIDE, math.floor((north - 0.002) / SIDE) * SIDE


def write_tiles(folder: Path, *, bands: list[int] | None = None, names: dict[str, str] | None = None,
                descriptions: list[str] | None = None) -> dict[str, tuple[float, float, float, float]]:
    """Warp the real patch into the EPSG:4326 tiles of LAYOUT under ``folder``.

    Args:
        folder: where the GeoTIFFs go (created).
        bands: 1-based bands of the patch to keep (default: all 12).
        names: tile name -> file stem (default ``s2tile_<name>_20230601``).
        descriptions: band descriptions written into the files.

    Returns:
        File stem -> bounds ``(west, south, east, north)``.
    """
    src = shared_path(*PATCH)
    folder.mkdir(parents=True, exist_ok=True)
    lon0, lat0 = origin(src)
    out = {}
    with rasterio.open(src) as ds:
        idx = bands or list(range(1, ds.count + 1))
        data = ds.read(idx)
        for name, (col, row) in LAYOUT.items():
            west, north = lon0 + col * SIDE, lat0 - row * SIDE
            transform = from_origin(west, north, SIDE / PX, SIDE / PX)
            dst = np.zeros((len(idx), PX, PX), dtype=data.dtype)
            reproject(data, dst, src_transform=ds.transform, src_crs=ds.crs, dst_transform=transform,
                      dst_crs="EPSG:4326", resampling=Resampling.bilinear)
            stem = (names or {}).get(name, f"s2tile_{name}_20230601")
            with rasterio.open(folder / f"{stem}.tif", "w", driver="GTiff", width=PX, height=PX, count=len(idx),
                               dtype=dst.dtype, crs="EPSG:4326", transform=transform) as out_ds:
                out_ds.write(dst)
                for i, d in enumerate(descriptions or [], start=1):
                    out_ds.set_band_description(i, d)
            out[stem] = (west, north - SIDE, west + SIDE, north)
    return out
