"""Pairs: each SV point with the tile that contains it, at its true offset (DuckDB, sql/pair_points.sql)."""


import dagster as dg
import pandas as pd

from gair_dataset.pairing import offset_spread, pair_points
from pipelines.common.incremental import (
    CODE_VERSIONS,
    built,
    files_version,
    input_version,
    skipped,
    unchanged_stats,
    upstream_versions,
)
from pipelines.common.plots import figure_md, offsets_hist
from pipelines.common.storage import DataRoot
from pipelines.defs.pairing.resources import DuckDBEngine
from pipelines.defs.stac.assets import tile_grid
from pipelines.defs.streetview.assets import sv_points
from pipelines.partitions import region_of, region_partitions


@dg.asset(partitions_def=region_partitions, group_name="pairing", deps=[tile_grid, sv_points],
          kinds={"duckdb", "geoparquet"}, code_version=CODE_VERSIONS["pairs"])
def pairs(context: dg.AssetExecutionContext, duckdb_engine: DuckDBEngine,
          data_root: DataRoot) -> dg.MaterializeResult:
    """One row per SV point inside a tile: the point, its tile_id, relative position (x, y), pixel col/row, split.

    Slim: the tile's other attributes (CRS, bounds, bbox, item_ids...) stay in tiles.parquet, joined by tile_id.
    """
    with data_root.region_lock(context.partition_key, log=context.log):
        return _pairs(context, duckdb_engine, data_root)


def _pairs(context: dg.AssetExecutionContext, duckdb_engine: DuckDBEngine,
           data_root: DataRoot) -> dg.MaterializeResult:
    """The body of :func:`pairs`, run under the region lock."""
    region = region_of(context)
    out_dir = data_root.stage_dir("pairs", region.name)
    version = input_version("pairs", region, upstream_versions(data_root, region.name, ["tiles", "streetview"]),
                            files=[data_root.stage_dir("streetview", region.name) / "points.parquet",
                                   data_root.stage_dir("tiles", region.name) / "tiles.parquet"])
    same = unchanged_stats(data_root, "pairs", region.name, version,
                           [out_dir / "pairs.parquet", out_dir / "unpaired.parquet"])
    if same is not None:
        return skipped(context, "pairs", same, {"path": dg.MetadataValue.path(str(out_dir / "pairs.parquet"))})
    con = duckdb_engine.connect()
    res = pair_points(data_root.stage_dir("streetview", region.name) / "points.parquet",
                      data_root.stage_dir("tiles", region.name) / "tiles.parquet",
                      out_dir / "pairs.parquet", max_points_per_tile=region.max_points_per_tile,
                      unpaired_path=out_dir / "unpaired.parquet", con=con, region=region.name)
    con.close()
    if res.paired == 0:
        raise dg.Failure(f"no street-view point of {region.name} falls inside a tile ({res.points} points, "
                         f"{res.outside} outside every tile)")
    df = pd.read_parquet(out_dir / "pairs.parquet", columns=["sv_id", "tile_id", "x", "y", "split"])
    spread = offset_spread(df)
    splits = {str(k): int(v) for k, v in df["split"].value_counts().items()}
    stats = {"points": res.points, "paired": res.paired, "outside_every_tile": res.outside,
             "capped": res.capped, "tiles_with_points": res.tiles_with_points, "splits": splits,
             "offset_spread": spread, "seconds": round(res.seconds, 3)}
    data_version = files_version(out_dir / "pairs.parquet", out_dir / "unpaired.parquet")
    data_root.write_stats("pairs", region.name, built(stats, version, data_version))
    if res.outside:
        context.log.warning("%d of %d points are outside every tile (listed in unpaired.parquet)",
                            res.outside, res.points)
    context.log.info("paired %d points into %d tiles in %.2fs", res.paired, res.tiles_with_points, res.seconds)
    return dg.MaterializeResult(data_version=dg.DataVersion(data_version), metadata={
        "rebuilt": True,
        "data_version": data_version,
        "num_pairs": res.paired,
        "num_points": res.points,
        "num_outside_every_tile": res.outside,
        "num_capped": res.capped,
        "tiles_with_points": res.tiles_with_points,
        "splits": dg.MetadataValue.json(splits),
        "offset_spread": dg.MetadataValue.json(spread),
        "path": dg.MetadataValue.path(str(out_dir / "pairs.parquet")),
        "offsets": figure_md(offsets_hist(df["x"], df["y"], f"{region.name}: x/y histograms")),
    })


def _pairs_with_tiles(data_root: DataRoot, region: str, columns: list[str], tile_columns: list[str]) -> pd.DataFrame:
    """``columns`` of the pairs joined by ``tile_id`` with ``tile_columns`` of the tiles (NaN: tile not found)."""
    with data_root.region_lock(region, shared=True):  # both tables of one run: no run rewrites them meanwhile
        df = pd.read_parquet(data_root.stage_dir("pairs", region) / "pairs.parquet", columns=[*columns, "tile_id"])
        tiles = pd.read_parquet(data_root.stage_dir("tiles", region) / "tiles.parquet",
                                columns=["tile_id", *tile_columns])
    return df.merge(tiles.drop_duplicates("tile_id"), on="tile_id", how="left")


@dg.asset_check(asset=pairs, blocking=True, description="Every pair's point lies inside its tile's bbox")
def pairs_inside_tile_bbox(context: dg.AssetCheckExecutionContext, data_root: DataRoot) -> dg.AssetCheckResult:
    """Point within ``[lon_min, lon_max] x [lat_min, lat_max]`` of its tile (1e-9 degree tolerance).

    The bbox comes from tiles.parquet (joined by ``tile_id``); a pair whose tile is not there counts as outside.
    """
    df = _pairs_with_tiles(data_root, context.partition_key, ["sv_id", "lon", "lat"],
                           ["lon_min", "lat_max", "lon_max", "lat_min"])
    tol = 1e-9
    inside = ((df.lon >= df.lon_min - tol) & (df.lon <= df.lon_max + tol)
              & (df.lat >= df.lat_min - tol) & (df.lat <= df.lat_max + tol))
    bad = df[~inside]
    return dg.AssetCheckResult(passed=bad.empty, metadata={"num_outside": len(bad),
                                                           "examples": bad["sv_id"].head(10).tolist()})


@dg.asset_check(asset=pairs, blocking=True, description="No SV point is paired with two tiles")
def no_point_in_two_tiles(context: dg.AssetCheckExecutionContext, data_root: DataRoot) -> dg.AssetCheckResult:
    """Every ``sv_id`` appears once."""
    with data_root.region_lock(context.partition_key, shared=True):  # no run rewrites it meanwhile
        df = pd.read_parquet(data_root.stage_dir("pairs", context.partition_key) / "pairs.parquet",
                             columns=["sv_id"])
    dups = df["sv_id"][df["sv_id"].duplicated()]
    return dg.AssetCheckResult(passed=dups.empty, metadata={"num_duplicated": len(dups),
                                                            "examples": dups.head(10).tolist()})


@dg.asset_check(asset=pairs, blocking=True,
                description="Offsets lie in [0, 1) and spread over the tile (not collapsed to the centre)")
def offsets_in_range_and_spread(context: dg.AssetCheckExecutionContext,
                                data_root: DataRoot) -> dg.AssetCheckResult:
    """x, y in [0, 1); std of each at least 0.15 (uniform is 0.29) and at least 3/4 of 4x4 cells occupied.

    The spread rules apply from 50 pairs on (fewer points cannot show a spread). ``col, row`` are checked against
    the tile's size in tiles.parquet (joined by ``tile_id``; a pair whose tile is not there is out of range).
    """
    df = _pairs_with_tiles(data_root, context.partition_key, ["x", "y", "col", "row"],
                           ["tile_width", "tile_height"])
    in_range = bool(((df.x >= 0) & (df.x < 1) & (df.y >= 0) & (df.y < 1)).all()
                    and ((df.col >= 0) & (df.col < df.tile_width) & (df.row >= 0) & (df.row < df.tile_height)).all())
    spread = offset_spread(df)
    spread_ok = True
    if len(df) >= 50:
        occupied = int(spread["occupied_cells"].split("/")[0])
        spread_ok = spread["x_std"] >= 0.15 and spread["y_std"] >= 0.15 and occupied >= 12
    return dg.AssetCheckResult(passed=in_range and spread_ok,
                               metadata={"in_range": in_range, "spread_ok": spread_ok,
                                         "spread": dg.MetadataValue.json(spread)})
