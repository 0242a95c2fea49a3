"""Street-view point sources (a table of points, a folder of geotagged JPEGs) and their validation.

Every source yields the same columns: ``sv_id, lon, lat, image_uri, heading, captured_at``. Validation
never drops a row silently: rejects come back with a reason.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from shapely.geometry import Point

COLUMNS = ["sv_id", "lon", "lat", "image_uri", "heading", "captured_at"]
_ALIASES = {
    "sv_id": ("sv_id", "id", "image_id", "filename", "Filename", "Image ID"),
    "lon": ("lon", "longitude", "Longitude", "Lon", "lng", "x"),
    "lat": ("lat", "latitude", "Latitude", "Lat", "y"),
    "image_uri": ("image_uri", "image_path", "image_url", "url", "path", "image", "Filename", "filename"),
    "heading": ("heading", "Heading", "compass_angle", "direction"),
    "captured_at": ("captured_at", "timestamp", "datetime", "date", "captured"),
}
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_id(value: str) -> str:
    """Make an id safe for WebDataset keys: only ``[A-Za-z0-9_-]`` (dots and others become ``-``)."""
    return _BAD_ID_CHARS.sub("-", str(value)).strip("-")


def _pick(df: pd.DataFrame, name: str) -> pd.Series | None:
    for alias in _ALIASES[name]:
        if alias in df.columns:
            return df[alias]
    return None


def _resolve_uri(value, base: Path) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value)
    if "://" in s:
        return s
    p = Path(s)
    return str(p if p.is_absolute() else (base / p).resolve())


def load_table(path: str | Path, image_root: str | Path | None = None) -> pd.DataFrame:
    """Load points from a GeoParquet, Parquet or CSV table.

    Args:
        path: the table. Columns are matched by common names (``id``/``sv_id``, ``lon``/``longitude``,
            ``lat``/``latitude``, ``image_path``/``image_url``...); a point geometry is used when lon/lat
            columns are absent.
        image_root: folder that relative image paths are resolved against (default: the table's folder).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"street-view table not found: {path}")
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        try:
            df = gpd.read_parquet(path)
        except (ValueError, KeyError):
            df = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".txt"):
        sep = ";" if ";" in path.open(encoding="utf-8-sig").readline() else ","
        df = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
    else:
        raise ValueError(f"unsupported street-view table format: {path.suffix} (use .parquet or .csv)")
    base = Path(image_root) if image_root else path.parent
    lon, lat = _pick(df, "lon"), _pick(df, "lat")
    if (lon is None or lat is None) and isinstance(df, gpd.GeoDataFrame) and df.geometry is not None:
        pts = df.geometry.to_crs("EPSG:4326") if df.crs else df.geometry
        lon, lat = pts.x, pts.y
    if lon is None or lat is None:
        raise ValueError(f"{path}: no longitude/latitude columns (looked for {_ALIASES['lon']} / {_ALIASES['lat']})")
    ids = _pick(df, "sv_id")
    uris = _pick(df, "image_uri")
    heading = _pick(df, "heading")
    captured_at = _pick(df, "captured_at")
    out = pd.DataFrame({
        "sv_id": ids.astype("string") if ids is not None else pd.Series(
            [f"row{i}" for i in range(len(df))], dtype="string"),
        "lon": pd.to_numeric(lon, errors="coerce").astype(float).to_numpy(),
        "lat": pd.to_numeric(lat, errors="coerce").astype(float).to_numpy(),
        "image_uri": [_resolve_uri(v, base) for v in uris] if uris is not None else None,
        "heading": pd.to_numeric(heading, errors="coerce") if heading is not None else np.nan,
        "captured_at": captured_at.astype("string") if captured_at is not None else None,
    })
    return out[COLUMNS]


def _dms_to_deg(dms, ref: str) -> float:
    d, m, s = (float(v) for v in dms)
    deg = d + m / 60.0 + s / 3600.0
    return -deg if ref in ("S", "W") else deg


def read_exif_point(path: Path) -> dict:
    """Read GPS position, heading and time from a JPEG's EXIF.

    Raises:
        ValueError: no readable GPS position in the file.
    """
    try:
        with Image.open(path) as im:
            exif = im.getexif()
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"unreadable image: {type(exc).__name__}") from exc
    gps = exif.get_ifd(0x8825)
    if not gps or 2 not in gps or 4 not in gps:
        raise ValueError("no GPS position in EXIF")
    try:
        lat = _dms_to_deg(gps[2], gps.get(1, "N"))
        lon = _dms_to_deg(gps[4], gps.get(3, "E"))
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"malformed GPS EXIF: {exc}") from exc
    heading = float(gps[17]) if 17 in gps else math.nan
    when = exif.get_ifd(0x8769).get(36867) or exif.get(306)
    captured = None
    if when:
        captured = str(when).replace(":", "-", 2).replace(" ", "T")
    return {"lon": lon, "lat": lat, "heading": heading, "captured_at": captured}


def load_exif_folder(folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every ``*.jpg``/``*.jpeg`` under a folder; ids come from the relative path (sanitised).

    Returns:
        ``(points, rejects)``; rejects have ``sv_id, image_uri, reason`` (e.g. no GPS in EXIF).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"street-view folder not found: {folder}")
    rows, rejects = [], []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    for p in files:
        sv_id = sanitize_id(str(p.relative_to(folder).with_suffix("")).replace("/", "-"))
        try:
            rows.append({"sv_id": sv_id, **read_exif_point(p), "image_uri": str(p.resolve())})
        except ValueError as exc:
            rejects.append({"sv_id": sv_id, "image_uri": str(p.resolve()), "reason": str(exc)})
    points = pd.DataFrame(rows, columns=COLUMNS)
    return points, pd.DataFrame(rejects, columns=["sv_id", "image_uri", "reason"])


def validate_points(df: pd.DataFrame) -> tuple[gpd.GeoDataFrame, pd.DataFrame]:
    """Validate points; return ``(valid GeoDataFrame sorted by sv_id, rejects with a reason)``.

    Rules: an id is required (sanitised to ``[A-Za-z0-9_-]``); lon/lat finite and in range; (0, 0)
    "null island" rejected; an image reference is required; duplicate ids keep the first row.
    """
    df = df.copy()
    reasons = pd.Series(pd.NA, index=df.index, dtype="string")

    def flag(mask, why: str) -> None:
        reasons[mask & reasons.isna()] = why

    raw_id = df["sv_id"].astype("string")
    df["sv_id"] = raw_id.fillna("").map(sanitize_id)
    flag(df["sv_id"] == "", "missing id")
    lon, lat = df["lon"].astype(float), df["lat"].astype(float)
    flag(~np.isfinite(lon) | ~np.isfinite(lat), "non-finite coordinate")
    flag((lon < -180) | (lon > 180), "longitude out of range [-180, 180]")
    flag((lat < -90) | (lat > 90), "latitude out of range [-90, 90]")
    flag((lon == 0) & (lat == 0), "null island (0, 0)")
    if "image_uri" in df:
        flag(df["image_uri"].isna(), "no image reference")
    dup = df["sv_id"].duplicated(keep="first") & reasons.isna()
    flag(dup, "duplicate id")
    rejects = df[reasons.notna()].assign(reason=reasons[reasons.notna()])
    valid = df[reasons.isna()].sort_values("sv_id", kind="stable").reset_index(drop=True)
    gdf = gpd.GeoDataFrame(valid, geometry=[Point(x, y) for x, y in zip(valid["lon"], valid["lat"], strict=True)],
                           crs="EPSG:4326")
    return gdf, rejects[["sv_id", "lon", "lat", "image_uri", "reason"]].reset_index(drop=True)
