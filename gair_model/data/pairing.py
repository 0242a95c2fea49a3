"""Pairs street-view points with tiles in DuckDB (spatial extension loaded offline from its wheel).

The SQL lives in ``sql/pair_points.sql``; this module prepares its inputs and writes GeoParquet.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import duckdb
import pandas as pd

from gair_model.data.geo import MERC_HALF

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
#: DuckDB memory_limit used by the pipeline and the benchmark: keeps the pairing of 10M points under ~1.5 GB RSS
#: (DuckDB spills its sort/join state to disk beyond it).
DEFAULT_MEMORY_LIMIT = "1GB"


def spatial_extension_path() -> Path:
    """Path of the DuckDB spatial extension binary shipped by ``duckdb-extension-spatial``."""
    try:
        root = resources.files("duckdb_extension_spatial") / "extensions"
    except ModuleNotFoundError as exc:
        raise RuntimeError("duckdb-extension-spatial is not installed (pip install -e .)") from exc
    found = sorted(Path(str(root)).rglob("spatial.duckdb_extension"))
    if not found:
        raise RuntimeError(f"no spatial.duckdb_extension under {root}")
    version_dir = f"v{duckdb.__version__}"
    for path in found:
        if path.parent.name == version_dir:
            return path
    raise RuntimeError(f"duckdb {duckdb.__version__} needs the matching duckdb-extension-spatial "
                       f"(found {[p.parent.name for p in found]}); pin them to the same version")


def connect(memory_limit: str | None = None, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the spatial extension loaded (never downloaded)."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute(f"LOAD '{spatial_extension_path()}'")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def read_sql(name: str) -> str:
    """Text of ``sql/<name>``."""
    path = SQL_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"SQL file missing: {path}")
    return path.read_text()


def grids_table(tiles: pd.DataFrame, margin_deg: float = 0.05) -> pd.DataFrame:
    """One row per regular grid present in the tiles (an XYZ zoom, or one UTM zone), with its extent."""
    width = tiles["tile_maxx"] - tiles["tile_minx"]
    tiles = tiles.assign(size_mm=(width * 1000).round(), size=width)
    rows = []
    for (grid, crs, _), g in tiles.groupby(["grid", "tile_crs", "size_mm"]):
        origin = (-MERC_HALF, MERC_HALF) if grid == "xyz" else (0.0, 0.0)
        # The exact size, not a rounded one: tile indices reach 2^zoom, so a size error adds up.
        size = float(g["size"].iloc[0])
        if grid == "xyz":
            size = 2 * MERC_HALF / 2 ** round(math.log2(2 * MERC_HALF / size))
        rows.append({"grid_id": len(rows), "grid": grid, "tile_crs": crs, "origin_x": origin[0],
                     "origin_y": origin[1], "size": size, "lon_min": g["lon_min"].min() - margin_deg,
                     "lat_min": g["lat_min"].min() - margin_deg, "lon_max": g["lon_max"].max() + margin_deg,
                     "lat_max": g["lat_max"].max() + margin_deg})
    if len({(r["grid"], r["tile_crs"]) for r in rows}) < len(rows):
        raise ValueError("tiles of one CRS must share one tile size")
    return pd.DataFrame(rows, columns=["grid_id", "grid", "tile_crs", "origin_x", "origin_y", "size", "lon_min",
                                       "lat_min", "lon_max", "lat_max"])


@dataclass
class PairingResult:
    """Counts from one pairing run."""

    points: int
    paired: int
    outside: int
    capped: int
    tiles_with_points: int
    seconds: float
    join_seconds: float = 0.0  # up to the (point, tile) assignment, before writing the GeoParquet


def pair_points(points_path: str | Path, tiles_path: str | Path, out_path: str | Path, *,
                max_points_per_tile: int | None = None, unpaired_path: str | Path | None = None,
                con: duckdb.DuckDBPyConnection | None = None, region: str | None = None) -> PairingResult:
    """Pair every point with the one tile that contains it; write GeoParquet atomically.

    Args:
        points_path: Parquet with ``sv_id, lon, lat, image_uri, heading, captured_at`` (validated points).
        tiles_path: the tile grid GeoParquet (``docs/DATA_CONTRACT.md``).
        out_path: where the pairs GeoParquet goes.
        max_points_per_tile: optional cap (a deterministic hash-ordered subset is kept).
        unpaired_path: optional Parquet of the points that fell outside every tile.
        con: an existing connection (from ``connect``); a new one otherwise.
        region: the region (partition) name written in the ``region`` column.

    Returns:
        Counts of the run.
    """
    t0 = time.perf_counter()
    con = con or connect()
    out_path, tiles_path = Path(out_path), Path(tiles_path)
    if max_points_per_tile is not None and max_points_per_tile < 1:
        raise ValueError("max_points_per_tile must be >= 1 or None")
    con.execute(f"CREATE OR REPLACE TEMP VIEW points AS SELECT file_row_number AS pidx, sv_id, lon, lat, image_uri, "
                f"heading, captured_at FROM read_parquet('{_q(points_path)}', file_row_number = true)")
    con.execute(f"CREATE OR REPLACE TEMP TABLE tiles AS SELECT * FROM read_parquet('{_q(tiles_path)}')")
    tiles_meta = con.execute("SELECT grid, tile_crs, tile_minx, tile_maxx, lon_min, lat_min, lon_max, lat_max "
                             "FROM tiles").df()
    con.register("grids_df", grids_table(tiles_meta))
    con.execute("CREATE OR REPLACE TEMP TABLE run_info AS SELECT CAST(? AS VARCHAR) AS region", [region])
    con.execute("CREATE OR REPLACE TEMP TABLE grids AS SELECT * FROM grids_df")
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    run_sql(con, "pair_points.sql")
    if con.execute("SELECT count(*) FROM grids").fetchone()[0] > 1:
        run_sql(con, "pair_one_tile_per_point.sql")
    one_per_point = con.execute("SELECT count(*) FROM in_tile").fetchone()[0]
    if max_points_per_tile is not None:
        run_sql(con, "pair_cap_per_tile.sql", {"max_points_per_tile": int(max_points_per_tile)})
    paired, n_tiles = con.execute("SELECT count(*), count(DISTINCT tidx) FROM in_tile").fetchone()
    t_join = time.perf_counter() - t0
    output = _strip_comments(read_sql("pair_output.sql"))
    con.execute(f"COPY ({output}) TO '{_q(tmp)}' (FORMAT parquet, COMPRESSION zstd)")
    os.replace(tmp, out_path)
    n_points = con.execute("SELECT count(*) FROM points").fetchone()[0]
    if unpaired_path is not None:
        unpaired_path = Path(unpaired_path)
        tmp_u = unpaired_path.with_name(f".{unpaired_path.name}.tmp-{os.getpid()}")
        con.execute(f"COPY (SELECT p.* EXCLUDE (pidx) FROM points p ANTI JOIN in_tile USING (pidx) ORDER BY pidx) "
                    f"TO '{_q(tmp_u)}' (FORMAT parquet)")
        os.replace(tmp_u, unpaired_path)
    con.execute("DROP TABLE in_tile")
    con.execute("DROP TABLE tile_keys")
    return PairingResult(int(n_points), int(paired), int(n_points - one_per_point), int(one_per_point - paired),
                         int(n_tiles), time.perf_counter() - t0, t_join)


def run_sql(con: duckdb.DuckDBPyConnection, name: str, params: dict | None = None) -> None:
    """Execute every statement of ``sql/<name>`` (comments stripped), with named parameters."""
    for statement in (s for s in _strip_comments(read_sql(name)).split(";") if s.strip()):
        con.execute(statement, {k: v for k, v in (params or {}).items() if f"${k}" in statement} or None)


def _q(path) -> str:
    return str(path).replace("'", "''")


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))


def offset_spread(pairs: pd.DataFrame, bins: int = 4) -> dict:
    """How offsets spread over the tile: quantiles of x/y and the share of occupied ``bins x bins`` cells."""
    if pairs.empty:
        return {"n": 0}
    cells = (pairs["x"] * bins).clip(upper=bins - 1).astype(int) * bins + (pairs["y"] * bins).clip(
        upper=bins - 1).astype(int)
    centre = ((pairs["x"] - 0.5).abs() < 0.05) & ((pairs["y"] - 0.5).abs() < 0.05)
    return {
        "n": int(len(pairs)),
        "x_quantiles": [round(float(v), 4) for v in pairs["x"].quantile([0.05, 0.25, 0.5, 0.75, 0.95])],
        "y_quantiles": [round(float(v), 4) for v in pairs["y"].quantile([0.05, 0.25, 0.5, 0.75, 0.95])],
        "x_std": round(float(pairs["x"].std(ddof=0)), 4),
        "y_std": round(float(pairs["y"].std(ddof=0)), 4),
        "occupied_cells": f"{int(cells.nunique())}/{bins * bins}",
        "share_near_centre": round(float(centre.mean()), 4),
        "uniform_std": round(1 / math.sqrt(12), 4),
    }
