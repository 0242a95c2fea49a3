"""Pairs street-view points with tiles in DuckDB (spatial extension loaded offline from its wheel).

The SQL lives in ``sql/pair_points.sql``; this module prepares its inputs and writes GeoParquet. The pairs table
is slim (``PAIRS_COLUMNS``): the point's own columns, ``tile_id``, the offset and the tile's split; every other tile
attribute stays in ``tiles.parquet`` and is joined by ``tile_id`` where it is needed (the shards step, the checks).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from gair_dataset.atomic import publish, temp_path
from gair_dataset.geo import MERC_HALF

log = logging.getLogger(__name__)


def _sql_dir() -> Path:
    """The pairing SQL: package data in an installed wheel, else the checkout's top-level ``sql/``."""
    package = Path(str(resources.files("gair_dataset")))
    packaged = package / "sql"  # a wheel maps sql/ into the package (pyproject.toml [tool.setuptools.package-dir])
    return packaged if (packaged / "pair_points.sql").is_file() else package.parent / "sql"


#: Where :func:`read_sql` reads the SQL files (found once, at import).
SQL_DIR = _sql_dir()
#: DuckDB memory_limit used by the pipeline and the benchmark: keeps the pairing of 10M points under ~1.6 GB RSS
#: (DuckDB spills its sort state to disk beyond it).
DEFAULT_MEMORY_LIMIT = "1GB"
#: How far (in tile units) a tile's stored bounds may lie from its grid cell; the pairing refuses tiles beyond it.
OFF_GRID_TOLERANCE = 1e-6
#: Columns of ``pairs.parquet``, in order (``docs/DATA_CONTRACT.md``).
PAIRS_COLUMNS = ("sv_id", "lon", "lat", "image_uri", "heading", "captured_at", "tile_id", "x", "y", "col", "row",
                 "split", "region", "geometry")
#: Tile columns the pairing reads (the grid check and the offsets); the rest of the tile table is not loaded.
_TILE_INPUT_COLUMNS = ("tile_id", "grid", "tile_crs", "tile_minx", "tile_miny", "tile_maxx", "tile_maxy",
                       "tile_width", "tile_height", "lon_min", "lat_max", "lon_max", "lat_min", "split")
#: Degrees added around an item tile's lon/lat bbox for its candidate points (the exact test is in its own CRS).
ITEM_TILE_MARGIN_DEG = 1e-5
#: Parquet options of the pairs file: zstd level 1 writes a file as small as the default level 3 here (random
#: doubles dominate it) for a quarter less CPU.
_PAIRS_PARQUET = "FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1"


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


def connect(memory_limit: str | None = None, threads: int | None = None,
            temp_directory: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the spatial extension loaded (never downloaded).

    Args:
        memory_limit: DuckDB ``memory_limit`` (e.g. ``"1GB"``); beyond it sorts and tables spill to disk.
        threads: DuckDB ``threads``; its default (all cores) when None.
        temp_directory: where DuckDB spills; a folder of this process under the system temp dir when None
            (DuckDB's own default is ``.tmp`` in the working directory, shared by concurrent runs).
    """
    if temp_directory is None:
        temp_directory = Path(tempfile.gettempdir()) / f"gair-duckdb-{os.getpid()}"
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                 "temp_directory": str(temp_directory)})
    con.execute(f"LOAD '{spatial_extension_path()}'")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def read_sql(name: str) -> str:
    """Text of ``sql/<name>`` (:data:`SQL_DIR`)."""
    path = SQL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"SQL file missing: {path} (the checkout's sql/ folder, or gair_dataset/sql/ "
                                f"in an installed wheel)")
    return path.read_text()


def grids_table(tiles: pd.DataFrame, margin_deg: float = 0.05) -> pd.DataFrame:
    """One row per regular grid present in the tiles (an XYZ zoom, or one UTM zone), with its extent."""
    width = tiles["tile_maxx"] - tiles["tile_minx"]
    tiles = tiles.assign(size_mm=(width * 1000).round(), size=width)
    rows: list[dict[str, Any]] = []
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


@dataclass(frozen=True)
class PreparedPairing:
    """What :func:`prepare_pairing` found among the tiles.

    Attributes:
        n_grids: regular grids (an XYZ zoom, or one UTM zone) among the tiles; 0 for item tiles.
        item_tiles: the tiles are pre-cut tiles (grid ``item``), paired by a spatial join; they may overlap.
    """

    n_grids: int
    item_tiles: bool = False

    @property
    def overlapping(self) -> bool:
        """Whether a point may lie in more than one tile (several grids, or item tiles): one must be chosen."""
        return self.item_tiles or self.n_grids > 1

    @property
    def unpaired_sql(self) -> str:
        """The SQL of the unpaired list: the join-free one needs a single regular grid."""
        return "pair_unpaired_one_grid.sql" if self.n_grids == 1 and not self.item_tiles else "pair_unpaired.sql"


@dataclass
class PairingResult:
    """Counts from one pairing run."""

    points: int
    paired: int
    outside: int
    capped: int
    tiles_with_points: int
    seconds: float


def prepare_pairing(con: duckdb.DuckDBPyConnection, points_path: str | Path,
                    tiles_path: str | Path) -> PreparedPairing:
    """Load the inputs and define the view ``assigned`` on ``con``.

    Regular grids (``xyz``, ``utm``) are paired by grid arithmetic (``sql/pair_points.sql``); pre-cut tiles (grid
    ``item``) by a spatial join (``sql/pair_item_tiles.sql``). Both views have the same columns.

    Args:
        con: a connection from :func:`connect`.
        points_path: Parquet with ``sv_id, lon, lat, image_uri, heading, captured_at`` (validated points).
        tiles_path: the tile grid GeoParquet (``docs/DATA_CONTRACT.md``); only ``_TILE_INPUT_COLUMNS`` are read.

    Returns:
        What kind of tiles were found (how many regular grids; item tiles).

    Raises:
        ValueError: naming the tiles at fault: tiles off their grid or two on one cell (regular grids), a tile
            without a CRS or with missing or empty bounds (item tiles), or item tiles mixed with grid tiles.
    """
    con.execute(f"CREATE OR REPLACE TEMP VIEW points AS SELECT file_row_number AS pidx, sv_id, lon, lat, image_uri, "
                f"heading, captured_at FROM read_parquet('{_q(points_path)}', file_row_number = true)")
    con.execute(f"CREATE OR REPLACE TEMP TABLE tiles AS SELECT {', '.join(_TILE_INPUT_COLUMNS)} "
                f"FROM read_parquet('{_q(tiles_path)}')")
    kinds = sorted(str(k) for (k,) in con.execute("SELECT DISTINCT grid FROM tiles").fetchall())
    if "item" in kinds:
        if len(kinds) > 1:
            raise ValueError(f"{tiles_path} mixes tiles of grid 'item' with grid(s) {[k for k in kinds if k != 'item']}"
                             f"; a tile grid has one kind")
        _check_item_tiles(con, tiles_path)
        run_sql(con, "pair_item_tiles.sql", {"margin": ITEM_TILE_MARGIN_DEG})
        return PreparedPairing(0, item_tiles=True)
    tiles_meta = con.execute("SELECT grid, tile_crs, tile_minx, tile_maxx, lon_min, lat_min, lon_max, lat_max "
                             "FROM tiles").df()
    grids = grids_table(tiles_meta)
    con.register("grids_df", grids)
    con.execute("CREATE OR REPLACE TEMP TABLE grids AS SELECT * FROM grids_df")
    con.unregister("grids_df")
    run_sql(con, "pair_points.sql")
    off = con.execute("SELECT tile_id, off_grid FROM tile_keys WHERE NOT coalesce(off_grid <= ?, false) "
                      "ORDER BY tile_id", [OFF_GRID_TOLERANCE]).fetchall()
    if off:
        shown = ", ".join(f"{tid} ({'a bound is missing' if dev is None else f'{dev:.2g} tile units'})"
                          for tid, dev in off[:5])
        raise ValueError(f"{len(off)} tile(s) in {tiles_path} do not lie on a regular grid (bounds off their grid "
                         f"cell by more than {OFF_GRID_TOLERANCE} tile units, or missing): {shown}; pre-cut tiles "
                         f"of their own size and CRS are tile_grid kind 'item'")
    same_cell = con.execute("SELECT list(tile_id ORDER BY tile_id) FROM tile_keys GROUP BY k HAVING count(*) > 1 "
                            "ORDER BY 1").fetchall()
    if same_cell:
        raise ValueError(f"{len(same_cell)} grid cell(s) in {tiles_path} hold more than one tile (a point would be "
                         f"paired twice): {'; '.join(', '.join(ids) for (ids,) in same_cell[:5])}")
    return PreparedPairing(len(grids))


def _check_item_tiles(con: duckdb.DuckDBPyConnection, tiles_path: str | Path) -> None:
    """Refuse item tiles the spatial join cannot use: no CRS, a missing or empty bound or bbox, no pixel size."""
    bad = con.execute(_strip_comments(read_sql("pair_item_tiles_check.sql"))).fetchall()
    if bad:
        shown = ", ".join(f"{tid} ({why})" for tid, why in bad[:5])
        raise ValueError(f"{len(bad)} item tile(s) in {tiles_path} cannot be paired: {shown}")


def assign_points(points_path: str | Path, tiles_path: str | Path, *,
                  con: duckdb.DuckDBPyConnection | None = None) -> int:
    """The assignment alone: materialise ``assigned_rows(pidx, tidx, x, y)``, one row per paired point.

    This is what a spatial join computes (no point or tile attributes, nothing written); the benchmark
    compares it with geopandas ``sjoin``. :func:`pair_points` streams the same view into the pairs file.

    Returns:
        The number of paired points.
    """
    con = con or connect()
    prepared = prepare_pairing(con, points_path, tiles_path)
    con.execute("CREATE OR REPLACE TEMP TABLE assigned_rows AS SELECT pidx, tidx, x, y FROM assigned")
    if prepared.overlapping:
        run_sql(con, "pair_one_tile_per_point.sql")
    return int(con.execute("SELECT count(*) FROM assigned_rows").fetchall()[0][0])


def pair_points(points_path: str | Path, tiles_path: str | Path, out_path: str | Path, *,
                max_points_per_tile: int | None = None, unpaired_path: str | Path | None = None,
                con: duckdb.DuckDBPyConnection | None = None, region: str | None = None) -> PairingResult:
    """Pair every point with the one tile that contains it; write GeoParquet atomically.

    The pairs file holds ``PAIRS_COLUMNS``: the point's own columns, ``tile_id``, ``x, y, col, row``, the tile's
    ``split``, ``region`` and the point geometry; the tile's other attributes stay in ``tiles_path`` (joined by
    ``tile_id`` downstream). With one grid and no cap the assignment is a view streamed through DuckDB's sort (by
    tile, then input order) into the file; a choice between grids or a cap needs the assigned rows in a table
    first. The same inputs give the same file. Both files are written under temporary names and renamed only once
    both are complete, ``out_path`` last.

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
    if max_points_per_tile is not None and max_points_per_tile < 1:
        raise ValueError("max_points_per_tile must be >= 1 or None")
    con = con or connect()
    out_path = Path(out_path)
    prepared = prepare_pairing(con, points_path, tiles_path)
    n_points = int(con.execute("SELECT count(*) FROM points").fetchall()[0][0])
    materialise = prepared.overlapping or max_points_per_tile is not None
    source = "assigned_rows" if materialise else "assigned"  # what the unpaired list and the pairs read
    if materialise:
        con.execute("CREATE OR REPLACE TEMP TABLE assigned_rows AS SELECT * FROM assigned")
        if prepared.overlapping:
            run_sql(con, "pair_one_tile_per_point.sql")
    con.execute(f"CREATE OR REPLACE TEMP VIEW pairs_source AS SELECT * FROM {source}")  # read by both outputs
    pending: list[tuple[Path, Path]] = []  # (tmp, final), renamed in this order once all are complete
    try:
        if unpaired_path is not None:
            # Before the cap: a capped point lies in a tile, it is not unpaired.
            unpaired_path = Path(unpaired_path)
            pending.append((_tmp_path(unpaired_path), unpaired_path))
            # One grid: a point has one cell at most, and its unpaired test needs no join the size of the points.
            con.execute(f"COPY ({_strip_comments(read_sql(prepared.unpaired_sql))}) TO '{_q(pending[-1][0])}' "
                        f"(FORMAT parquet)")
        one_per_point = None
        if materialise:
            one_per_point = int(con.execute("SELECT count(*) FROM assigned_rows").fetchall()[0][0])
            if max_points_per_tile is not None:
                run_sql(con, "pair_cap_per_tile.sql", {"max_points_per_tile": int(max_points_per_tile)})
        tmp_pairs = _tmp_path(out_path)
        pending.append((tmp_pairs, out_path))
        paired = int(con.execute(f"COPY ({_strip_comments(read_sql('pair_output.sql'))}) TO '{_q(tmp_pairs)}' "
                                 f"({_PAIRS_PARQUET})", {"region": region}).fetchall()[0][0])
        n_tiles = int(con.execute(f"SELECT count(DISTINCT tile_id) FROM read_parquet('{_q(tmp_pairs)}')")
                      .fetchall()[0][0])
        for tmp, final in pending:
            publish(tmp, final)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    for name in ("pairs_source", "assigned", "point_cells"):
        con.execute(f"DROP VIEW IF EXISTS {name}")
    for name in ("assigned_rows", "tile_keys", "grids"):
        con.execute(f"DROP TABLE IF EXISTS {name}")
    if one_per_point is None:  # one grid: a point is in at most one tile
        one_per_point = paired
    return PairingResult(n_points, paired, n_points - one_per_point, one_per_point - paired, n_tiles,
                         time.perf_counter() - t0)


def _tmp_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return temp_path(path)  # unique per process and call: two runs never share it


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
