"""Pre-cut tiles: every STAC item (one raster, e.g. a user's GeoTIFF tile) is its own tile (``kind: item``).

A tile of kind ``item`` has the item's own pixel grid: ``tile_crs`` is the raster's CRS, ``tile_minx..tile_maxy``
its bounds in that CRS and ``tile_width, tile_height`` its size in pixels, so the chip of the tile is the raster
itself. The grid comes from the item's projection fields (``proj:code``/``proj:epsg``, ``proj:shape`` and
``proj:transform`` or ``proj:bbox``, on the item or on an asset) or, when they are absent, from the raster of its
first GeoTIFF asset. Item tiles may overlap or leave gaps; the pairing joins them spatially
(``sql/pair_item_tiles.sql``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import shapely
from shapely.geometry import box

from gair_dataset.geo import MERC_HALF, reproject, transformer

#: Characters a tile id may not hold (tile ids become WebDataset keys: ``[A-Za-z0-9_-]``).
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")
#: Absolute tolerance on a transform coefficient treated as zero (a rotated/sheared raster is refused).
_ROTATION_TOL = 1e-12


@dataclass(frozen=True)
class ItemGrid:
    """The pixel grid of one item's raster.

    Attributes:
        crs: the raster's CRS (``"EPSG:4326"``, or any string pyproj/GDAL reads).
        bounds: ``(minx, miny, maxx, maxy)`` in ``crs``.
        width: pixels per row.
        height: rows.
    """

    crs: str
    bounds: tuple[float, float, float, float]
    width: int
    height: int


def item_tile_id(item_id: str) -> str:
    """The tile id of an item tile: the item id with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``."""
    tile_id = _NOT_ID.sub("_", str(item_id))
    if not tile_id:
        raise ValueError(f"item id {item_id!r} gives an empty tile id")
    return tile_id


def _crs_of(src: Mapping[str, Any]) -> str | None:
    code = src.get("proj:code")
    if isinstance(code, str) and code:
        return code
    if src.get("proj:epsg") is not None:
        return f"EPSG:{int(src['proj:epsg'])}"
    wkt = src.get("proj:wkt2")
    return str(wkt) if wkt else None


def _grid_from_fields(item_id: str, src: Mapping[str, Any], crs: str) -> ItemGrid | None:
    """The grid from ``proj:shape`` with ``proj:transform`` (preferred) or ``proj:bbox``; None without them."""
    shape = src.get("proj:shape")
    if not shape:
        return None
    height, width = (int(v) for v in shape)
    transform = src.get("proj:transform")
    if transform:
        a, b, c, d, e, f = (float(v) for v in list(transform)[:6])
        if abs(b) > _ROTATION_TOL or abs(d) > _ROTATION_TOL:
            raise ValueError(f"item {item_id}: its raster is rotated or sheared (proj:transform {transform}); "
                             f"an item tile must be north-up")
        xs, ys = (c, c + a * width), (f, f + e * height)
        bounds = (min(xs), min(ys), max(xs), max(ys))
    elif src.get("proj:bbox"):
        x0, y0, x1, y1 = (float(v) for v in list(src["proj:bbox"])[:4])
        bounds = (x0, y0, x1, y1)
    else:
        return None
    return ItemGrid(crs, bounds, width, height)


def _grid_from_raster(item: Mapping[str, Any]) -> ItemGrid | None:
    """The grid read from the raster of the item's first GeoTIFF asset (header only)."""
    import rasterio

    from gair_dataset.chips import to_gdal_path

    for asset in item.get("assets", {}).values():
        href = str(asset.get("href", ""))
        if "tiff" in str(asset.get("type", "")).lower() or href.lower().endswith((".tif", ".tiff")):
            with rasterio.open(to_gdal_path(href)) as ds:
                if ds.crs is None:
                    return None
                t = ds.transform
                if abs(t.b) > _ROTATION_TOL or abs(t.d) > _ROTATION_TOL:
                    raise ValueError(f"item {item.get('id')}: raster {href} is rotated or sheared; an item tile "
                                     f"must be north-up")
                epsg = ds.crs.to_epsg()
                crs = f"EPSG:{epsg}" if epsg else ds.crs.to_wkt()
                return ItemGrid(crs, tuple(float(v) for v in ds.bounds), ds.width, ds.height)  # type: ignore[arg-type]
    return None


def item_grid(item: Mapping[str, Any]) -> ItemGrid:
    """The pixel grid of an item's raster (its tile of kind ``item``).

    Read from the item's projection fields, else from the first asset that has them, else from the raster of its
    first GeoTIFF asset.

    Raises:
        ValueError: no grid can be found, the raster is rotated, or its size or bounds are degenerate; the
            message names the item.
    """
    item_id = str(item.get("id"))
    props = item.get("properties", {})
    grid = None
    crs = _crs_of(props)
    if crs:
        grid = _grid_from_fields(item_id, props, crs)
    for asset in item.get("assets", {}).values():
        if grid is not None:
            break
        asset_crs = _crs_of(asset) or crs
        if asset_crs:
            grid = _grid_from_fields(item_id, asset, asset_crs)
    if grid is None:
        try:
            grid = _grid_from_raster(item)
        except OSError as exc:  # rasterio's RasterioIOError is an OSError
            raise ValueError(f"item {item_id}: no projection fields (proj:shape with proj:transform or proj:bbox) "
                             f"and its raster cannot be opened: {exc}") from exc
    if grid is None:
        raise ValueError(f"item {item_id}: no pixel grid (needs proj:code or proj:epsg, and proj:shape with "
                         f"proj:transform or proj:bbox, or a GeoTIFF asset with a CRS)")
    x0, y0, x1, y1 = grid.bounds
    if grid.width < 1 or grid.height < 1 or not all(math.isfinite(v) for v in grid.bounds) or x0 >= x1 or y0 >= y1:
        raise ValueError(f"item {item_id}: degenerate raster grid {grid.width}x{grid.height} px, bounds "
                         f"{grid.bounds} in {grid.crs}")
    return grid


def _block_id(poly_lonlat: shapely.Geometry, block_tiles: int) -> str:
    """Spatial-split block of an item tile: the Web-Mercator XYZ cell holding its centre.

    The cell's zoom is the one whose cell is at least ``block_tiles`` tile sides wide, so tiles of one size share
    blocks of about ``block_tiles`` x ``block_tiles``; a block does not depend on the other tiles, so it is stable
    across refreshes.
    """
    x0, y0, x1, y1 = reproject(poly_lonlat, 4326, 3857).bounds
    side = max(x1 - x0, y1 - y0, 1e-9)
    zoom = int(min(max(math.floor(math.log2(2 * MERC_HALF / (block_tiles * side))), 0), 24))
    cx, cy = transformer(4326, 3857).transform(*poly_lonlat.centroid.coords[0])
    size = 2 * MERC_HALF / 2**zoom
    bx, by = int((cx + MERC_HALF) // size), int((MERC_HALF - cy) // size)
    return f"item-z{zoom}-{bx}-{by}"


MAX_ITEM_TILE_PX = 4096
"""Largest side (pixels) of an item tile: each sample reads its tile whole, so a full scene (a 10980 px Sentinel-2
tile) as one tile would read ~2.4 GB per sample; such items belong on a ``utm`` or ``xyz`` grid."""


def item_tile_rows(items: gpd.GeoDataFrame, item_dicts: Mapping[str, Mapping[str, Any]],
                   region: shapely.Geometry, block_tiles: int,
                   max_px: int = MAX_ITEM_TILE_PX) -> list[dict[str, Any]]:
    """One tile row per item whose raster intersects the region (``TILE_COLUMNS`` less ``split``).

    Args:
        items: the items table (``items_to_geodataframe``), item ids unique.
        item_dicts: the items' STAC JSON by item id (the projection fields live there).
        region: the region polygon (EPSG:4326).
        block_tiles: the split's block size in tiles.
        max_px: the largest tile side in pixels (:data:`MAX_ITEM_TILE_PX`).

    Raises:
        ValueError: an item has no JSON or no usable grid, a raster larger than ``max_px``, or two item ids give one
            tile id.
    """
    rows: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for row in items.itertuples(index=False):
        item_id = str(row.item_id)
        if item_id not in item_dicts:
            raise ValueError(f"item {item_id} is in items.parquet but not in items.json (a stale STAC stage?)")
        grid = item_grid(item_dicts[item_id])
        if max(grid.width, grid.height) > max_px:
            raise ValueError(f"item {item_id}: its raster is {grid.width}x{grid.height} px, and an item tile is read "
                             f"whole for every sample (at most {max_px} px per side): cut it into tiles first, or "
                             f"use tile_grid kind utm or xyz for whole scenes")
        tile_id = item_tile_id(item_id)
        if tile_id in owner:
            raise ValueError(f"items {owner[tile_id]!r} and {item_id!r} give the same tile id {tile_id!r} "
                             f"(characters outside [A-Za-z0-9_-] become '_'); rename one")
        owner[tile_id] = item_id
        x0, y0, x1, y1 = grid.bounds
        poly = box(x0, y0, x1, y1)
        if grid.crs.upper() not in ("EPSG:4326", "OGC:CRS84"):
            poly = reproject(poly.segmentize(max(x1 - x0, y1 - y0) / 8), grid.crs, 4326)
        if not poly.intersects(region):
            continue
        lon0, lat0, lon1, lat1 = poly.bounds
        rows.append({"tile_id": tile_id, "grid": "item", "tile_crs": grid.crs, "tile_minx": x0, "tile_miny": y0,
                     "tile_maxx": x1, "tile_maxy": y1, "tile_width": grid.width, "tile_height": grid.height,
                     "lon_min": lon0, "lat_max": lat1, "lon_max": lon1, "lat_min": lat0, "item_ids": [item_id],
                     "n_items": 1, "collection": row.collection, "block_id": _block_id(poly, block_tiles),
                     "geometry": poly})
    return rows


__all__ = ["MAX_ITEM_TILE_PX", "ItemGrid", "item_grid", "item_tile_id", "item_tile_rows"]
