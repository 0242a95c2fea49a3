"""Tile-grid geometry: Web-Mercator XYZ tiles and N x N pixel tiles in a UTM grid.

Both grids follow one half-open rule: a tile owns its **west** and **north** edges, so every point belongs
to exactly one tile of a grid. In pixel terms a tile holds ``0 <= col < width`` and ``0 <= row < height``
with rows counted from the top. The same rule is implemented in ``sql/pair_points.sql``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import shapely
import shapely.geometry
from pyproj import CRS, Transformer

#: Half the Web-Mercator world width in metres.
MERC_HALF = 20037508.342789244
#: Values this close (in tile units) to a grid line are snapped onto it before flooring, so that a point
#: lying exactly on an edge is not pushed across it by floating-point round-off.
EDGE_SNAP = 1e-9
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_lonlat(lon: float, lat: float) -> None:
    """Raise ``ValueError`` when a coordinate pair is not a valid WGS84 position."""
    if not (math.isfinite(lon) and math.isfinite(lat)):
        raise ValueError(f"coordinates must be finite, got lon={lon}, lat={lat}")
    if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
        raise ValueError(f"coordinates out of range: lon={lon} (needs -180..180), lat={lat} (needs -90..90)")


def check_bbox(bbox: list[float] | tuple[float, ...]) -> tuple[float, float, float, float]:
    """Validate a ``[west, south, east, north]`` bbox in EPSG:4326 and return it as a tuple."""
    if len(bbox) != 4:
        raise ValueError(f"bbox needs 4 numbers [west, south, east, north], got {bbox!r}")
    west, south, east, north = (float(v) for v in bbox)
    check_lonlat(west, south)
    check_lonlat(east, north)
    if not (west < east and south < north):
        raise ValueError(f"bbox must have west < east and south < north, got {bbox!r}")
    return west, south, east, north


def check_region_geometry(geojson: dict) -> shapely.Geometry:
    """Validate a region given as GeoJSON (EPSG:4326) and return it as a shapely (Multi)Polygon.

    Accepts a geometry, a Feature or a FeatureCollection (its features are unioned).

    Raises:
        ValueError: not polygonal, empty, invalid, or with coordinates outside -180..180 / -90..90.
    """
    if not isinstance(geojson, dict) or "type" not in geojson:
        raise ValueError(f"region geometry must be a GeoJSON object with a 'type', got {type(geojson).__name__}")
    kind = geojson["type"]
    features = {"FeatureCollection": geojson.get("features") or [], "Feature": [geojson]}.get(kind)
    if features is not None and any(not isinstance(f, dict) or not f.get("geometry") for f in features):
        raise ValueError("region geometry has a Feature without a geometry")
    try:
        parts = [shapely.geometry.shape(f["geometry"]) for f in features] if features is not None else [
            shapely.geometry.shape(geojson)]
    except (AttributeError, KeyError, TypeError, ValueError, shapely.errors.GEOSException) as exc:
        raise ValueError(f"region geometry is not valid GeoJSON: {exc!r}") from exc
    for part in parts:  # before the union, which would silently repair an invalid part
        if not part.is_valid:
            raise ValueError(f"region geometry is invalid: {shapely.is_valid_reason(part)}")
    geom = parts[0] if len(parts) == 1 else shapely.union_all(parts) if parts else shapely.Polygon()
    if geom.is_empty:
        raise ValueError("region geometry is empty")
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        raise ValueError(f"region geometry must be a Polygon or MultiPolygon, got {geom.geom_type}")
    if not geom.is_valid:
        raise ValueError(f"region geometry is invalid: {shapely.is_valid_reason(geom)}")
    west, south, east, north = geom.bounds
    check_lonlat(west, south)
    check_lonlat(east, north)
    return geom


def _snap_floor(values: np.ndarray) -> np.ndarray:
    rounded = np.round(values)
    snapped = np.where(np.abs(values - rounded) < EDGE_SNAP, rounded, values)
    return np.floor(snapped)


def lonlat_to_xyz_fraction(lon: np.ndarray, lat: np.ndarray, zoom: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous XYZ tile coordinates (tile units, y from the top) of lon/lat at ``zoom``."""
    n = 2.0**zoom
    lat_r = np.radians(np.asarray(lat, dtype=float))
    fx = (np.asarray(lon, dtype=float) + 180.0) / 360.0 * n
    fy = (1.0 - np.log(np.tan(lat_r) + 1.0 / np.cos(lat_r)) / math.pi) / 2.0 * n
    return fx, fy


def xyz_tile_of(lon: np.ndarray, lat: np.ndarray, zoom: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer XYZ tile indices of points, with the half-open edge rule."""
    fx, fy = lonlat_to_xyz_fraction(lon, lat, zoom)
    return _snap_floor(fx).astype(np.int64), _snap_floor(fy).astype(np.int64)


def xyz_tile_lonlat_bounds(tx: int, ty: int, zoom: int) -> tuple[float, float, float, float]:
    """``(lon_min, lat_min, lon_max, lat_max)`` of XYZ tile ``(tx, ty)``."""
    n = 2.0**zoom

    def lat_of(y: float) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * y / n))))

    return tx / n * 360.0 - 180.0, lat_of(ty + 1), (tx + 1) / n * 360.0 - 180.0, lat_of(ty)


def xyz_tile_merc_bounds(tx: int, ty: int, zoom: int) -> tuple[float, float, float, float]:
    """``(minx, miny, maxx, maxy)`` of XYZ tile ``(tx, ty)`` in EPSG:3857 metres."""
    size = 2 * MERC_HALF / 2.0**zoom
    return (-MERC_HALF + tx * size, MERC_HALF - (ty + 1) * size, -MERC_HALF + (tx + 1) * size,
            MERC_HALF - ty * size)


def xyz_tile_id(tx: int, ty: int, zoom: int) -> str:
    """Dot-free tile id of an XYZ tile, e.g. ``z14-8796-5137``."""
    return f"z{zoom}-{tx}-{ty}"


@dataclass(frozen=True)
class UtmGrid:
    """A grid of ``tile_px x tile_px`` pixel tiles of ``resolution`` metres, anchored at the CRS origin.

    Tiles of every item in the same CRS coincide, so items of the same zone share tiles.
    """

    epsg: int
    tile_px: int
    resolution: float

    @property
    def tile_size(self) -> float:
        """Tile edge length in metres."""
        return self.tile_px * self.resolution

    def tile_of(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer tile indices ``(ix, iy)``: ``ix`` grows east, ``iy`` grows south (rows from the top)."""
        ix = _snap_floor(np.asarray(x, dtype=float) / self.tile_size)
        iy = _snap_floor(-np.asarray(y, dtype=float) / self.tile_size)
        return ix.astype(np.int64), iy.astype(np.int64)

    def bounds(self, ix: int, iy: int) -> tuple[float, float, float, float]:
        """``(minx, miny, maxx, maxy)`` of tile ``(ix, iy)`` in the grid CRS."""
        s = self.tile_size
        return ix * s, -(iy + 1) * s, (ix + 1) * s, -iy * s

    def tile_id(self, ix: int, iy: int) -> str:
        """Dot-free tile id, e.g. ``utm32633-r10-p96-x3512-y-64418``."""
        res = f"{self.resolution:g}".replace(".", "p")
        return f"utm{self.epsg}-r{res}-p{self.tile_px}-x{ix}-y{iy}"


def transformer(src: str | int, dst: str | int) -> Transformer:
    """A pyproj transformer with x=lon/easting, y=lat/northing order whatever the CRS axis order."""
    return Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(dst), always_xy=True)


def reproject(geom, src: str | int, dst: str | int):
    """A shapely geometry transformed between CRSs (x=lon/easting order)."""
    tr = transformer(src, dst)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
