"""Tile footprints for a region: Web-Mercator XYZ tiles, N x N pixel tiles in each item's UTM grid, or pre-cut tiles.

``xyz`` / ``utm``: a tile is kept when at least one item's footprint covers it entirely; its items are ordered
least cloud first (then newest), and up to ``items_per_tile`` are kept so several dates per tile are possible.
``item``: every item is its own tile, at its own size and CRS (a user's pre-cut GeoTIFF tiles;
``gair_dataset.item_tiles``). Tiles are grouped into square blocks for the spatial train/val/test split.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS
from pyproj.exceptions import CRSError
from shapely import STRtree
from shapely.geometry import box

from gair_dataset.geo import (
    UtmGrid,
    check_bbox,
    reproject,
    xyz_tile_id,
    xyz_tile_lonlat_bounds,
    xyz_tile_merc_bounds,
    xyz_tile_of,
)
from gair_dataset.item_tiles import item_tile_rows

#: Tile grid kinds (``tile_grid.kind`` of a region).
GRID_KINDS = ("xyz", "utm", "item")

TILE_COLUMNS = ["tile_id", "grid", "tile_crs", "tile_minx", "tile_miny", "tile_maxx", "tile_maxy", "tile_width",
                "tile_height", "lon_min", "lat_max", "lon_max", "lat_min", "item_ids", "n_items", "collection",
                "block_id", "split", "geometry"]


@dataclass(frozen=True)
class GridConfig:
    """How tiles are cut.

    Attributes:
        kind: ``"xyz"`` (Web-Mercator tiles, the paper uses zoom 14, ~2 km), ``"utm"`` (N x N pixels in
            the item's UTM grid) or ``"item"`` (each item is its own tile: pre-cut tiles, one raster per item,
            at the raster's own size and CRS; ``zoom``, ``tile_px`` and ``resolution`` do not apply).
        zoom: XYZ zoom level.
        tile_px: pixels per tile side (XYZ: the tile's own pixel grid; UTM: N).
        resolution: UTM pixel size in metres.
        items_per_tile: how many items (dates) to keep per tile, least cloud first (``item``: always one).
    """

    kind: str = "xyz"
    zoom: int = 14
    tile_px: int = 256
    resolution: float = 10.0
    items_per_tile: int = 3

    def __post_init__(self) -> None:
        if self.kind not in GRID_KINDS:
            raise ValueError(f"tile grid kind must be one of {', '.join(GRID_KINDS)}, got {self.kind!r}")
        if not 0 <= self.zoom <= 22:
            raise ValueError(f"zoom must be within 0..22, got {self.zoom}")
        if self.tile_px < 1 or self.resolution <= 0 or self.items_per_tile < 1:
            raise ValueError("tile_px, resolution and items_per_tile must be positive")

    @property
    def chip_px(self) -> int | None:
        """Side of the RS chip the shards read: ``tile_px``, or None (the tile's own size) for ``item`` tiles."""
        return None if self.kind == "item" else self.tile_px


@dataclass(frozen=True)
class SplitConfig:
    """Spatial split: tiles are grouped in ``block_tiles x block_tiles`` blocks; each block gets one split."""

    block_tiles: int = 4
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def split_of(self, block_id: str) -> str:
        """Deterministic split of a block (hash of seed + block id)."""
        h = hashlib.sha1(f"{self.seed}:{block_id}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        if u < self.test_fraction:
            return "test"
        if u < self.test_fraction + self.val_fraction:
            return "val"
        return "train"


def _order_items(items: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    cc = items["cloud_cover"].fillna(100.0)
    return items.assign(_cc=cc).sort_values(["_cc", "datetime", "item_id"], ascending=[True, False, True])


def _assign_items(tile_polys: list, items: gpd.GeoDataFrame, per_tile: int) -> list[list[str]]:
    ordered = _order_items(items).reset_index(drop=True)
    tree = STRtree(list(ordered.geometry))
    out = []
    for poly in tile_polys:
        idx = sorted(int(i) for i in tree.query(poly, predicate="covered_by"))
        # tree.query(poly, 'covered_by') tests poly covered_by footprint; idx is in preference order.
        out.append([ordered.at[i, "item_id"] for i in idx][:per_tile])
    return out


def check_unique_item_ids(items: pd.DataFrame) -> None:
    """Refuse an items table that holds one item id twice (a catalog listing an item twice, or two files of one name).

    Raises:
        ValueError: naming the duplicated ids and how often each appears.
    """
    counts = items["item_id"].value_counts()
    dups = counts[counts > 1]
    if len(dups):
        shown = ", ".join(f"{k!r} ({int(v)}x)" for k, v in dups.sort_index().head(10).items())
        raise ValueError(f"{len(dups)} item id(s) appear more than once among the {len(items)} items: {shown}; "
                         f"an item id must be unique (remove or rename the duplicates in the catalog)")


@functools.lru_cache(maxsize=128)
def crs_is_utm(epsg: int) -> bool:
    """Whether an EPSG code is a projected UTM CRS (any datum: WGS 84 326xx/327xx, NAD83 269xx, ETRS89 258xx...)."""
    try:
        return CRS.from_epsg(epsg).utm_zone is not None
    except CRSError:
        return False


def check_utm_items(items: pd.DataFrame) -> None:
    """Refuse items that are not in a UTM CRS for a ``utm`` grid (its tiles are cut in each item's UTM zone).

    Raises:
        ValueError: naming the items and their CRS, and what to use instead.
    """
    epsg = pd.to_numeric(items["epsg"], errors="coerce")
    bad = items[[not (pd.notna(e) and crs_is_utm(int(e))) for e in epsg]]
    if len(bad):
        shown = ", ".join(f"{r.item_id} (EPSG:{int(e)})" if pd.notna(e) else f"{r.item_id} (no EPSG)"
                          for r, e in zip(bad.head(5).itertuples(), epsg[bad.index][:5], strict=False))
        raise ValueError(f"tile_grid kind 'utm' cuts tiles in each item's UTM zone, but {len(bad)} of {len(items)} "
                         f"items are not in a UTM CRS: {shown}. For pre-cut tiles (one raster per tile, any CRS) "
                         f"use tile_grid: {{kind: item}}; for Web-Mercator tiles use kind: xyz")


def build_tiles(items: gpd.GeoDataFrame, region, grid: GridConfig, split: SplitConfig, *,
                item_dicts: Sequence[Mapping[str, Any]] | None = None) -> gpd.GeoDataFrame:
    """Cut the region into tiles covered by at least one item (``item``: one tile per item).

    Args:
        items: the items table (``items_to_geodataframe``).
        region: ``[west, south, east, north]`` of the region, or its shapely (Multi)Polygon (EPSG:4326); only
            tiles that intersect it are kept.
        grid: how tiles are cut.
        split: the spatial split.
        item_dicts: the items' STAC JSON (``items.json``); required by ``kind: item`` (each tile is its item's
            raster grid, from the projection fields), not read otherwise.

    Returns:
        A GeoDataFrame with the columns of ``TILE_COLUMNS`` (tile polygons in EPSG:4326), sorted by tile_id.

    Raises:
        ValueError: an item id appears twice; a ``utm`` grid over items not in a UTM CRS; a ``kind: item`` grid
            without ``item_dicts`` or over an item without a usable raster grid.
    """
    region = region if isinstance(region, shapely.Geometry) else box(*check_bbox(region))
    west, south, east, north = region.bounds
    rows: list[dict] = []
    if items.empty:
        return gpd.GeoDataFrame(columns=TILE_COLUMNS, geometry="geometry", crs="EPSG:4326")
    check_unique_item_ids(items)
    if grid.kind == "item":
        if item_dicts is None:
            raise ValueError("tile_grid kind 'item' needs the items' STAC JSON (items.json) for their raster grids: "
                             "pass item_dicts")
        rows = [{**r, "split": split.split_of(r["block_id"])}
                for r in item_tile_rows(items, {str(d.get("id")): d for d in item_dicts}, region, split.block_tiles)]
    elif grid.kind == "xyz":
        (tx0, tx1), (ty1, ty0) = (xyz_tile_of(np.array([west, east]), np.array([north, south]), grid.zoom))
        cands = [(tx, ty) for tx in range(int(tx0), int(tx1) + 1) for ty in range(int(ty1), int(ty0) + 1)]
        polys = [box(*xyz_tile_lonlat_bounds(tx, ty, grid.zoom)) for tx, ty in cands]
        # Only tiles of the region itself (a polygon region can be far smaller than its bbox).
        keep = shapely.intersects(np.array(polys, dtype=object), region)
        cands = [c for c, k in zip(cands, keep, strict=True) if k]
        polys = [p for p, k in zip(polys, keep, strict=True) if k]
        assigned = _assign_items(polys, items, grid.items_per_tile)
        for (tx, ty), poly, ids in zip(cands, polys, assigned, strict=True):
            if not ids:
                continue
            lon0, lat0, lon1, lat1 = poly.bounds
            bx, by = tx // split.block_tiles, ty // split.block_tiles
            rows.append(_row(xyz_tile_id(tx, ty, grid.zoom), "xyz", "EPSG:3857",
                             xyz_tile_merc_bounds(tx, ty, grid.zoom), grid.tile_px, (lon0, lat0, lon1, lat1), ids,
                             f"z{grid.zoom}-b{split.block_tiles}-{bx}-{by}", split, items, poly))
    else:
        check_utm_items(items)
        for epsg, group in items.groupby("epsg"):
            ug = UtmGrid(int(epsg), grid.tile_px, grid.resolution)
            region_utm = reproject(region.segmentize(0.01), 4326, int(epsg))
            rx0, ry0, rx1, ry1 = region_utm.bounds
            (ix0, ix1), (iy0, iy1) = ug.tile_of(np.array([rx0, rx1]), np.array([ry1, ry0]))
            cands = [(ix, iy) for ix in range(int(ix0), int(ix1) + 1) for iy in range(int(iy0), int(iy1) + 1)]
            # Drop cells far from a polygon region before reprojecting each (the exact test follows below).
            near = region_utm.buffer(ug.tile_size / 8)
            cands = [c for c in cands if near.intersects(box(*ug.bounds(*c)))]
            polys = [reproject(box(*ug.bounds(ix, iy)).segmentize(ug.tile_size / 8), int(epsg), 4326)
                     for ix, iy in cands]
            assigned = _assign_items(polys, group, grid.items_per_tile)
            for (ix, iy), poly, ids in zip(cands, polys, assigned, strict=True):
                if not ids or not poly.intersects(region):
                    continue
                bx, by = ix // split.block_tiles, iy // split.block_tiles
                rows.append(_row(ug.tile_id(ix, iy), "utm", f"EPSG:{int(epsg)}", ug.bounds(ix, iy), grid.tile_px,
                                 poly.bounds, ids, f"utm{int(epsg)}-b{split.block_tiles}-{bx}-{by}", split, items,
                                 poly))
    df = gpd.GeoDataFrame(rows, columns=TILE_COLUMNS, geometry="geometry", crs="EPSG:4326")
    return df.sort_values("tile_id").reset_index(drop=True)


def _row(tile_id, kind, crs, bounds, px, ll_bounds, ids, block_id, split: SplitConfig, items, poly) -> dict:
    lon0, lat0, lon1, lat1 = ll_bounds
    collection = items.set_index("item_id").loc[ids[0], "collection"]
    return {"tile_id": tile_id, "grid": kind, "tile_crs": crs, "tile_minx": bounds[0], "tile_miny": bounds[1],
            "tile_maxx": bounds[2], "tile_maxy": bounds[3], "tile_width": px, "tile_height": px,
            "lon_min": lon0, "lat_max": lat1, "lon_max": lon1, "lat_min": lat0, "item_ids": list(ids),
            "n_items": len(ids), "collection": collection, "block_id": block_id,
            "split": split.split_of(block_id), "geometry": poly}


def tiles_summary(tiles: pd.DataFrame) -> dict:
    """Counts for logs and metadata."""
    return {"tiles": int(len(tiles)), "splits": {k: int(v) for k, v in tiles["split"].value_counts().items()},
            "items_per_tile_mean": float(tiles["n_items"].mean()) if len(tiles) else 0.0}
