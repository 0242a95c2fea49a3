"""STAC discovery and the tile grid, per region partition."""


import io
import json
from urllib.parse import parse_qsl, urlsplit

import dagster as dg
import geopandas as gpd
import pandas as pd

from gair_dataset.atomic import atomic_write_bytes
from gair_dataset.signing import TOKEN_PARAMS
from gair_dataset.stac_catalog import (
    StacSearchError,
    items_to_geodataframe,
    read_items,
    unsign_item,
    validate_items,
    write_items,
)
from gair_dataset.tile_grid import build_tiles, tiles_summary
from pipelines.common.incremental import (
    CODE_VERSIONS,
    built,
    files_version,
    input_version,
    skipped,
    unchanged_stats,
    upstream_versions,
    version_of,
)
from pipelines.common.plots import figure_md, footprints_map
from pipelines.common.policies import NETWORK_RETRY, STAC_POOL
from pipelines.common.storage import DataRoot
from pipelines.defs.stac.resources import StacCatalog
from pipelines.partitions import region_of, region_partitions


def items_version(items: list[dict]) -> str:
    """The data version of a set of items: a hash of their unsigned JSON, in id order (search order is free)."""
    return version_of("stac", CODE_VERSIONS["stac"], sorted(json.dumps(unsign_item(it), sort_keys=True)
                                                            for it in items))


@dg.asset(partitions_def=region_partitions, group_name="stac", kinds={"stac", "geoparquet"},
          pool=STAC_POOL, retry_policy=NETWORK_RETRY, code_version=CODE_VERSIONS["stac"])
def stac_items(context: dg.AssetExecutionContext, stac: StacCatalog, data_root: DataRoot) -> dg.MaterializeResult:
    """RS items found for the region (footprints as GeoParquet + unsigned item JSON)."""
    with data_root.region_lock(context.partition_key, log=context.log):
        return _stac_items(context, stac, data_root)


def _stac_items(context: dg.AssetExecutionContext, stac: StacCatalog, data_root: DataRoot) -> dg.MaterializeResult:
    """The body of :func:`stac_items`, run under the region lock."""
    region = region_of(context)
    params = region.search_params()
    context.log.info("searching %s: %s", stac.describe(), params.describe())
    try:
        items = stac.search(params, data_root)
    except StacSearchError as exc:
        raise dg.Failure(description=f"STAC search failed for region {region.name}: {exc}",
                         metadata={"search": dg.MetadataValue.json(params.describe())}) from exc
    # Each item is checked against its own collection's band profile (gair_dataset.bands): Planetary Computer
    # (B04, SCL) and Earth Search (red, scl) keys alike, S2 and Landsat items of one region each by their own.
    ok, rejects = validate_items(items, check_bands=True)
    for r in rejects:
        context.log.warning("item %s skipped: %s", r["item_id"], r["reason"])
    if not ok:
        raise dg.Failure(
            description=(f"no usable item for region {region.name} ({len(items)} found, {len(rejects)} rejected) "
                         f"in {stac.describe()} with {params.describe()}"),
            metadata={"search": dg.MetadataValue.json(params.describe()),
                      "rejects": dg.MetadataValue.json(rejects[:50])}, allow_retries=False)
    out = data_root.stage_dir("stac", region.name)
    version = items_version(ok)
    json_path, pq_path = out / "items.json", out / "items.parquet"
    same = unchanged_stats(data_root, "stac", region.name, version, [json_path, pq_path])
    if same is not None and same.get("rejected") == len(rejects):
        # The catalog returned what it returned last time: the files (and everything built on them) stay as they are.
        return skipped(context, "stac", same, {"catalog": stac.describe(), "items_json": dg.MetadataValue.path(
            str(json_path)), "search_params": dg.MetadataValue.json(params.describe())})
    write_items(ok, out)
    gdf = items_to_geodataframe(ok)
    dates = sorted({d.date().isoformat() for d in gdf["datetime"]})
    stats = {"items": len(ok), "rejected": len(rejects), "synthetic": bool(gdf["synthetic"].any()),
             "dates": dates, "catalog": stac.describe()}
    data_root.write_stats("stac", region.name, built(stats, version, version))
    context.log.info("%d items kept, %d rejected (data version %s)", len(ok), len(rejects), version)
    return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata={
        "data_version": version,
        "rebuilt": True,
        "num_items": len(ok),
        "num_rejected": len(rejects),
        "rejects": dg.MetadataValue.json(rejects[:50]),
        "search_params": dg.MetadataValue.json(params.describe()),
        "catalog": stac.describe(),
        "synthetic": bool(stats["synthetic"]),
        "dates": ", ".join(dates),
        "cloud_cover_max": float(gdf["cloud_cover"].max()),
        "items_table": dg.MetadataValue.md(gdf.drop(columns="geometry").head(20).to_markdown(index=False)),
        "items_json": dg.MetadataValue.path(str(json_path)),
        "items_parquet": dg.MetadataValue.path(str(pq_path)),
        "footprints": figure_md(footprints_map(list(gdf.geometry), region.area(), f"{region.name}: item footprints")),
    })


def _token_params(value: object) -> set[str]:
    """Credential query parameters (``TOKEN_PARAMS``) of every URL found anywhere in a JSON value."""
    if isinstance(value, str):
        if "?" not in value:
            return set()
        keys = {k.lower() for k, _ in parse_qsl(urlsplit(value).query, keep_blank_values=True)}
        return keys & TOKEN_PARAMS
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return set().union(*(_token_params(v) for v in children))


@dg.asset_check(asset=stac_items, blocking=True,
                description="items.json parses and has items; none carries a signed URL or lacks its band assets")
def items_found(context: dg.AssetCheckExecutionContext, data_root: DataRoot) -> dg.AssetCheckResult:
    """Re-read the written ``items.json`` (what the tile grid and the shards use).

    Fails when:

    * it is missing, unparsable or not a FeatureCollection, or has no item;
    * any string of an item is a URL with a credential parameter (``sig``, ``se``, ``st``, ... see
      ``gair_dataset.signing.TOKEN_PARAMS``; an href nested outside ``assets.*.href`` escapes the unsigning);
    * an item fails ``validate_items`` (footprint, datetime, projection, its collection's band assets);
    * ``stats.json`` counts another number of items (a stale or half-written stage).

    The metadata names the items and the offending parameters, never a URL.
    """
    path = data_root.stage_dir("stac", context.partition_key) / "items.json"
    with data_root.region_lock(context.partition_key, shared=True):  # both files of one run: none rewrites them now
        stats = data_root.read_stats("stac", context.partition_key)
        try:
            features = json.loads(path.read_text())["features"]
            if not isinstance(features, list):
                raise TypeError(f"features is a {type(features).__name__}, not a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return dg.AssetCheckResult(passed=False, metadata={
                "num_items": 0, "problems": dg.MetadataValue.json([f"{path.name} unreadable: {type(exc).__name__}"])})
    problems: list[str] = []
    if not features:
        problems.append(f"{path.name} has no item")
    num_signed = num_invalid = 0
    for i, item in enumerate(features):
        if not isinstance(item, dict):
            num_invalid += 1
            problems.append(f"feature {i} is not a JSON object")
            continue
        name = item.get("id", f"feature {i}")
        tokens = _token_params(item)
        if tokens:
            num_signed += 1
            problems.append(f"item {name}: URL with credential parameters {sorted(tokens)}")
        _, rejects = validate_items([item], check_bands=True)
        if rejects:
            num_invalid += 1
            problems.append(f"item {name}: {rejects[0]['reason']}")
    if stats is not None and stats.get("items") != len(features):
        problems.append(f"stats.json counts {stats.get('items')} items, {path.name} has {len(features)}")
    return dg.AssetCheckResult(passed=not problems, metadata={
        "num_items": len(features), "num_signed": num_signed, "num_invalid": num_invalid,
        "problems": dg.MetadataValue.json(problems[:20])})


@dg.asset(partitions_def=region_partitions, group_name="stac", deps=[stac_items], kinds={"geoparquet"},
          code_version=CODE_VERSIONS["tiles"])
def tile_grid(context: dg.AssetExecutionContext, data_root: DataRoot) -> dg.MaterializeResult:
    """Tile footprints (XYZ or UTM pixel grid) covered by items, with their items and spatial split."""
    with data_root.region_lock(context.partition_key, log=context.log):
        return _tile_grid(context, data_root)


def _tile_grid(context: dg.AssetExecutionContext, data_root: DataRoot) -> dg.MaterializeResult:
    """The body of :func:`tile_grid`, run under the region lock."""
    region = region_of(context)
    stac_dir = data_root.stage_dir("stac", region.name)
    out = data_root.stage_dir("tiles", region.name) / "tiles.parquet"
    version = input_version("tiles", region, upstream_versions(data_root, region.name, ["stac"]),
                            files=[stac_dir / "items.parquet", stac_dir / "items.json"])
    same = unchanged_stats(data_root, "tiles", region.name, version, [out])
    if same is not None:
        return skipped(context, "tiles", same, {"path": dg.MetadataValue.path(str(out))})
    items = gpd.read_parquet(stac_dir / "items.parquet")
    item_dicts = read_items(stac_dir) if region.grid.kind == "item" else None  # each item's own raster grid
    try:
        tiles = build_tiles(items, region.area(), region.grid, region.split, item_dicts=item_dicts)
    except ValueError as exc:  # duplicate item ids, items that cannot carry this grid kind: named in the message
        raise dg.Failure(f"tile grid of region {region.name}: {exc}", allow_retries=False) from exc
    if tiles.empty:
        raise dg.Failure(f"no {region.grid.kind} tile of region {region.name} is fully covered by any of the "
                         f"{len(items)} items; check the region, the zoom/tile size and the item footprints",
                         allow_retries=False)
    buf = io.BytesIO()
    tiles.to_parquet(buf, index=False)
    data = buf.getvalue()
    if not (out.exists() and out.read_bytes() == data):  # the same tiles (an item's metadata changed): untouched
        atomic_write_bytes(out, data)
    summary = tiles_summary(tiles)
    data_version = files_version(out)
    data_root.write_stats("tiles", region.name, built({**summary, "grid": region.grid.kind}, version, data_version))
    colors = tiles["split"].map({"train": "tab:blue", "val": "tab:orange", "test": "tab:red"}).tolist()
    context.log.info("%d tiles (%s grid), splits %s", len(tiles), region.grid.kind, summary["splits"])
    return dg.MaterializeResult(data_version=dg.DataVersion(data_version), metadata={
        "rebuilt": True,
        "data_version": data_version,
        "num_tiles": len(tiles),
        "grid": dg.MetadataValue.json({"kind": region.grid.kind, "zoom": region.grid.zoom,
                                       "tile_px": region.grid.tile_px, "resolution": region.grid.resolution,
                                       "items_per_tile": region.grid.items_per_tile}),
        "splits": dg.MetadataValue.json(summary["splits"]),
        "items_per_tile_mean": summary["items_per_tile_mean"],
        "dates_per_tile": dg.MetadataValue.json(
            {str(k): int(v) for k, v in pd.Series(tiles["n_items"]).value_counts().sort_index().items()}),
        "path": dg.MetadataValue.path(str(out)),
        "map": figure_md(footprints_map(list(tiles.geometry), region.area(),
                                        f"{region.name}: tiles (blue train, orange val, red test)", colors)),
    })
