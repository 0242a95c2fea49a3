"""Street-view point sources (a table of points, a folder of geotagged JPEGs) and their validation.

Every source yields the same columns (:data:`COLUMNS`): ``sv_id, lon, lat, image_uri, heading, captured_at`` and
``source, license, attribution, source_url`` (null for file sources; hosted APIs, see
:mod:`gair_dataset.sv_sources`, fill them). Validation never drops a row silently: rejects come back with a
reason, the 1-based data ``row`` and the original text of the row (``raw``), see :data:`REJECT_COLUMNS`.

Coordinates written with a decimal comma (``55,7``, as spreadsheets export them in many locales) are parsed: once
the CSV reader has split a line into fields, a field matching ``[+-]digits,digits`` can only be a decimal comma
(a thousands separator is impossible in a valid degree or heading). Anything else that is not a number is
rejected as ``unparseable <column> '<text>'``. A comma-separated file whose unquoted decimal commas add fields is
refused with the line number.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from shapely.geometry import Point

#: The points table (``points.parquet``): the core columns, then provenance (null for file sources).
COLUMNS = ["sv_id", "lon", "lat", "image_uri", "heading", "captured_at", "source", "license", "attribution",
           "source_url"]
#: Provenance columns of API points; not repeated in the slim pairs table, joined by sv_id where samples are built.
PROVENANCE_COLUMNS = ("source", "license", "attribution", "source_url")
#: ``rejects.parquet``: ``row`` is the 1-based data row of a table source (null otherwise), ``raw`` the original
#: text of the row (CSV: the line's fields; Parquet: the row as JSON; API: the item's JSON without signed URLs).
REJECT_COLUMNS = ["sv_id", "row", "lon", "lat", "image_uri", "reason", "raw"]
_DECIMAL_COMMA = re.compile(r"^\s*[+-]?\d+,\d+\s*$")
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
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    s = str(value).strip()
    if not s:
        return None
    if "://" in s:
        return s
    p = Path(s)
    return str(p if p.is_absolute() else (base / p).resolve())


def empty_rejects() -> pd.DataFrame:
    """A rejects table with no rows and the :data:`REJECT_COLUMNS` types (so an empty file still has a schema)."""
    return pd.DataFrame({"sv_id": pd.Series(dtype="string"), "row": pd.Series(dtype="Int64"),
                         "lon": pd.Series(dtype=float), "lat": pd.Series(dtype=float),
                         "image_uri": pd.Series(dtype="string"), "reason": pd.Series(dtype="string"),
                         "raw": pd.Series(dtype="string")})


def normalize_rejects(rejects: pd.DataFrame) -> pd.DataFrame:
    """``rejects`` with exactly :data:`REJECT_COLUMNS` and their types (missing columns are null)."""
    out = empty_rejects() if rejects is None or rejects.empty else rejects.reindex(columns=REJECT_COLUMNS)
    return out.astype({"sv_id": "string", "row": "Int64", "lon": float, "lat": float, "image_uri": "string",
                       "reason": "string", "raw": "string"}).reset_index(drop=True)


def parse_number(value: Any) -> tuple[float, bool, bool]:
    """Parse a coordinate or heading cell.

    Returns:
        ``(value, decimal_comma, ok)``: NaN with ``ok`` for an empty cell; ``ok`` False when the text is not a
        number (the value is then NaN).
    """
    if value is None:
        return math.nan, False, True
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        return float(value), False, True
    text = str(value).strip()
    if text == "" or text.lower() in ("nan", "na", "null", "none"):
        return math.nan, False, True
    comma = bool(_DECIMAL_COMMA.match(text))
    try:
        return float(text.replace(",", ".") if comma else text), comma, True
    except ValueError:
        return math.nan, False, False


def _parse_column(values: pd.Series | None, name: str, problems: list[str | None]) -> tuple[np.ndarray, int]:
    """Parse a numeric column; record ``unparseable <name> '<text>'`` per bad row; return (values, n commas)."""
    if values is None:
        return np.full(len(problems), np.nan), 0
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype(float).to_numpy(), 0
    out = np.empty(len(values))
    commas = 0
    for i, v in enumerate(values.tolist()):
        out[i], comma, ok = parse_number(v)
        commas += comma
        if not ok and problems[i] is None:
            problems[i] = f"unparseable {name}: {str(v)[:80]!r}"
    return out, commas


def _read_csv(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """Every cell of a CSV as text (delimiter ``;``, tab or ``,`` from the header) and each row's original text.

    Raises:
        ValueError: a row with more or fewer fields than the header (named by line).
    """
    with path.open(encoding="utf-8-sig", newline="") as fh:
        head = fh.readline()
        delim = ";" if ";" in head else "\t" if "\t" in head else ","
        fh.seek(0)
        reader = csv.reader(fh, delimiter=delim)
        header = next(reader, None)
        if not header:
            raise ValueError(f"{path}: empty CSV (no header line)")
        rows, raws = [], []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                hint = (" - decimal commas in a comma-separated file? quote such values or use ';' as the delimiter"
                        if delim == "," and len(fields) > len(header) else "")
                raise ValueError(f"{path}: line {reader.line_num} has {len(fields)} fields, the header "
                                 f"{len(header)}{hint}")
            rows.append(fields)
            raws.append(delim.join(fields))
    return pd.DataFrame(rows, columns=header, dtype="string"), raws


def _blank_to_na(values: pd.Series) -> np.ndarray:
    text = values.astype("string")
    return text.mask(text.str.strip() == "").to_numpy()


def _raw_json(df: pd.DataFrame, idx: int) -> str:
    row = {str(k): (None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
           for k, v in df.iloc[idx].items() if k != getattr(df, "_geometry_column_name", None)}
    return json.dumps(row, ensure_ascii=False)


def load_table(path: str | Path, image_root: str | Path | None = None) -> pd.DataFrame:
    """Load points from a GeoParquet, Parquet or CSV table.

    Args:
        path: the table. Columns are matched by common names (``id``/``sv_id``, ``lon``/``longitude``,
            ``lat``/``latitude``, ``image_path``/``image_url``...); a point geometry is used when lon/lat
            columns are absent. CSV cells are read as text and parsed here (decimal commas accepted).
        image_root: folder that relative image paths are resolved against (default: the table's folder).

    Returns:
        :data:`COLUMNS` plus ``row`` (1-based data row), ``raw`` (the row's original text; for Parquet only where
        a coordinate is missing or unparseable) and ``parse_error`` (why the row cannot be read, else null).
        ``attrs["decimal_commas"]`` counts the values read with a decimal comma.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported format, no coordinate columns, or a CSV line with the wrong number of fields.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"street-view table not found: {path}")
    raws: list[str] | None = None
    if path.suffix.lower() in (".parquet", ".geoparquet"):
        try:
            df = gpd.read_parquet(path)
        except (ValueError, KeyError):
            df = pd.read_parquet(path)
    elif path.suffix.lower() in (".csv", ".txt"):
        df, raws = _read_csv(path)
    else:
        raise ValueError(f"unsupported street-view table format: {path.suffix} (use .parquet or .csv)")
    base = Path(image_root) if image_root else path.parent
    lon, lat = _pick(df, "lon"), _pick(df, "lat")
    if (lon is None or lat is None) and isinstance(df, gpd.GeoDataFrame) and df.geometry is not None:
        pts = df.geometry.to_crs("EPSG:4326") if df.crs else df.geometry
        lon, lat = pts.x, pts.y
    if lon is None or lat is None:
        raise ValueError(f"{path}: no longitude/latitude columns (looked for {_ALIASES['lon']} / {_ALIASES['lat']})")
    problems: list[str | None] = [None] * len(df)
    lon_v, n_lon = _parse_column(lon, "longitude", problems)
    lat_v, n_lat = _parse_column(lat, "latitude", problems)
    heading = _pick(df, "heading")
    heading_v, n_head = _parse_column(heading, "heading", problems)
    ids = _pick(df, "sv_id")
    uris = _pick(df, "image_uri")
    captured_at = _pick(df, "captured_at")
    if raws is None:
        bad = np.flatnonzero(~np.isfinite(lon_v) | ~np.isfinite(lat_v) | np.array([p is not None for p in problems]))
        raw_list: list[str | None] = [None] * len(df)
        for i in bad:
            raw_list[i] = _raw_json(df, int(i))
    else:
        raw_list = list(raws)
    out = pd.DataFrame({
        "sv_id": _blank_to_na(ids) if ids is not None else pd.Series(
            [f"row{i}" for i in range(len(df))], dtype="string").to_numpy(),
        "lon": lon_v,
        "lat": lat_v,
        "image_uri": [_resolve_uri(v, base) for v in uris] if uris is not None else None,
        "heading": heading_v,
        "captured_at": _blank_to_na(captured_at) if captured_at is not None
        else None,
        "source": None, "license": None, "attribution": None, "source_url": None,
        "row": np.arange(1, len(df) + 1),
        "raw": pd.array(raw_list, dtype="string"),
        "parse_error": pd.array(problems, dtype="string"),
    })
    out.attrs["decimal_commas"] = int(n_lon + n_lat + n_head)
    return out


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
        ``(points, rejects)``; rejects have :data:`REJECT_COLUMNS` (e.g. ``no GPS position in EXIF``;
        ``raw``: the file).
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
            rejects.append({"sv_id": sv_id, "image_uri": str(p.resolve()), "reason": str(exc),
                            "raw": str(p.relative_to(folder))})
    points = pd.DataFrame(rows, columns=COLUMNS)
    return points, normalize_rejects(pd.DataFrame(rejects, columns=REJECT_COLUMNS))


def validate_points(df: pd.DataFrame) -> tuple[gpd.GeoDataFrame, pd.DataFrame]:
    """Validate points; return ``(valid GeoDataFrame sorted by sv_id, rejects with a reason)``.

    Rules: a row that could not be read is rejected with its ``parse_error`` (e.g. ``unparseable latitude
    '55.7.1'``); an id is required (sanitised to ``[A-Za-z0-9_-]``); lon/lat finite and in range; (0, 0)
    "null island" rejected; an image reference is required; duplicate ids keep the first row.

    Args:
        df: :data:`COLUMNS` (provenance columns may be absent), optionally ``row``, ``raw``, ``parse_error``
            (from :func:`load_table`).

    Returns:
        ``(valid, rejects)``: ``valid`` has :data:`COLUMNS` and a point geometry; ``rejects`` has
        :data:`REJECT_COLUMNS`.
    """
    df = df.copy()
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    reasons = pd.Series(pd.NA, index=df.index, dtype="string")

    def flag(mask, why: str | pd.Series) -> None:
        sel = mask & reasons.isna()
        reasons[sel] = why[sel] if isinstance(why, pd.Series) else why

    if "parse_error" in df:
        flag(df["parse_error"].notna(), df["parse_error"].astype("string"))
    raw_id = df["sv_id"].astype("string")
    df["sv_id"] = raw_id.fillna("").map(sanitize_id)
    flag(df["sv_id"] == "", "missing id")
    lon, lat = df["lon"].astype(float), df["lat"].astype(float)
    flag(~np.isfinite(lon) | ~np.isfinite(lat), "non-finite coordinate")
    flag((lon < -180) | (lon > 180), "longitude out of range [-180, 180]")
    flag((lat < -90) | (lat > 90), "latitude out of range [-90, 90]")
    flag((lon == 0) & (lat == 0), "null island (0, 0)")
    flag(df["image_uri"].isna(), "no image reference")
    dup = df["sv_id"].duplicated(keep="first") & reasons.isna()
    flag(dup, "duplicate id")
    rejects = df[reasons.notna()].assign(reason=reasons[reasons.notna()])
    valid = df[reasons.isna()][COLUMNS].sort_values("sv_id", kind="stable").reset_index(drop=True)
    valid = valid.astype({c: "string" for c in ("captured_at", "source", "license", "attribution", "source_url")})
    gdf = gpd.GeoDataFrame(valid, geometry=[Point(x, y) for x, y in zip(valid["lon"], valid["lat"], strict=True)],
                           crs="EPSG:4326")
    return gdf, normalize_rejects(rejects)


def swapped_coordinates(points: pd.DataFrame, bbox: tuple[float, float, float, float], *,
                        min_share: float = 0.5) -> str | None:
    """Say so when lon/lat look swapped for a region, else None.

    They look swapped when more than ``min_share`` of the points fall outside the region's bbox while, with
    lon and lat exchanged, more than ``min_share`` fall inside it.

    Args:
        points: valid points (``lon, lat``).
        bbox: the region's ``(west, south, east, north)``.
        min_share: the share of points that decides.

    Returns:
        A message with the counts and an example point, or None.
    """
    if points.empty:
        return None
    w, s, e, n = bbox
    lon, lat = points["lon"].to_numpy(float), points["lat"].to_numpy(float)
    inside = (lon >= w) & (lon <= e) & (lat >= s) & (lat <= n)
    swapped = (lat >= w) & (lat <= e) & (lon >= s) & (lon <= n)
    total = len(points)
    if inside.mean() > min_share or swapped.mean() <= min_share:
        return None
    i = int(np.flatnonzero(swapped)[0])
    return (f"lat/lon look swapped: {int((~inside).sum())} of {total} points fall outside the region bbox "
            f"[{w}, {s}, {e}, {n}] but {int(swapped.sum())} fall inside it with longitude and latitude exchanged "
            f"(e.g. {points['sv_id'].iloc[i]}: lon={lon[i]}, lat={lat[i]}); exchange the lon/lat columns of the "
            f"source")


def with_provenance(pairs: pd.DataFrame, points_path: str | os.PathLike[str]) -> pd.DataFrame:
    """``pairs`` with the points' provenance columns (``PROVENANCE_COLUMNS``) joined by ``sv_id``.

    The pairs table stays slim (the point's core columns only); the shards step calls this so that API points carry
    their licence and attribution into the sample JSON. Points files without those columns (older runs) or with
    only nulls (file sources) leave ``pairs`` as it is.
    """
    import pyarrow.parquet as pq

    present = [c for c in PROVENANCE_COLUMNS if c in pq.read_schema(points_path).names and c not in pairs.columns]
    if not present:
        return pairs
    prov = pd.read_parquet(points_path, columns=["sv_id", *present])
    prov = prov[prov[present].notna().any(axis=1)]
    if prov.empty:
        return pairs
    return pairs.merge(prov, on="sv_id", how="left", validate="many_to_one")
