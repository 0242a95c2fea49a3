"""WebDataset shards of (RS chip, SV image, location) samples, per region partition."""

import io
import json
import tarfile
from pathlib import Path
from typing import cast

import dagster as dg
import numpy as np
import pandas as pd
from PIL import Image

from gair_dataset.contract import KEY_PATTERN, MANIFEST_NAME, MEMBER_SUFFIXES, decode_npy, rs_dates
from gair_dataset.samples import DEFAULT_INTERLEAVE_TILES, build_shards_from_pairs, iter_items
from gair_dataset.shards import iter_raw_samples, read_shards_json
from gair_dataset.stac_catalog import read_items
from gair_dataset.streetview_points import with_provenance
from pipelines.common.plots import figure_md, plt
from pipelines.common.policies import NETWORK_RETRY, REMOTE_READS_POOL
from pipelines.common.storage import DataRoot
from pipelines.defs.pairing.assets import pairs
from pipelines.defs.shards.resources import RasterAccess
from pipelines.defs.stac.assets import stac_items, tile_grid
from pipelines.partitions import region_of, region_partitions


class ShardsConfig(dg.Config):
    """Shard-writing settings."""

    samples_per_shard: int = 256
    max_nodata_fraction: float = 0.1
    max_cloud_fraction: float = 0.1
    sv_max_side: int = 1024
    chip_workers: int = 4  # threads reading chips ahead; also the bound on concurrent remote reads
    max_dates: int = 0  # dates (passing items) per sample's rs.npy; 0: the region's tile_grid.items_per_tile
    interleave_tiles: int = DEFAULT_INTERLEAVE_TILES  # tiles interleaved together (chips held in memory)


def shard_dir(data_root: DataRoot, region: str) -> Path:
    """Folder of a region's shard set."""
    return data_root.stage_dir("shards", region)


@dg.asset(partitions_def=region_partitions, group_name="shards", deps=[pairs, tile_grid, stac_items],
          kinds={"webdataset"},
          pool=REMOTE_READS_POOL, retry_policy=NETWORK_RETRY)
def shards(context: dg.AssetExecutionContext, config: ShardsConfig, raster_access: RasterAccess,
           data_root: DataRoot) -> dg.MaterializeResult:
    """Training-ready WebDataset shards (rs.npy, sv.jpg, json per sample) + manifest, for one region."""
    with data_root.region_lock(context.partition_key, log=context.log):
        return _shards(context, config, raster_access, data_root)


def _shards(context: dg.AssetExecutionContext, config: ShardsConfig, raster_access: RasterAccess,
            data_root: DataRoot) -> dg.MaterializeResult:
    """The body of :func:`shards`, run under the region lock."""
    region = region_of(context)
    pairs_df = pd.read_parquet(data_root.stage_dir("pairs", region.name) / "pairs.parquet")
    # Licence/attribution of API street-view points stay in points.parquet (slim pairs): joined here by sv_id.
    pairs_df = with_provenance(pairs_df, data_root.stage_dir("streetview", region.name) / "points.parquet")
    # The pairs table is slim: each pair's tile attributes (window, CRS, bbox, item_ids...) come from the tiles.
    tiles_df = pd.read_parquet(data_root.stage_dir("tiles", region.name) / "tiles.parquet")
    items = iter_items(read_items(data_root.stage_dir("stac", region.name)))
    synthetic = any(it.get("properties", {}).get("gair:synthetic") for it in items.values())
    out = shard_dir(data_root, region.name)
    context.log.info("building shards for %d pairs over %d tiles into %s", len(pairs_df),
                     pairs_df["tile_id"].nunique(), out)
    report = build_shards_from_pairs(
        pairs_df, items, out, tiles=tiles_df, name=region.name, samples_per_shard=config.samples_per_shard,
        out_size=region.grid.chip_px, signer=raster_access.signer(), gdal_env=raster_access.gdal_env(),
        max_nodata_fraction=config.max_nodata_fraction, max_cloud_fraction=config.max_cloud_fraction,
        sv_max_side=config.sv_max_side, synthetic=synthetic, chip_workers=config.chip_workers,
        max_dates=config.max_dates or region.grid.items_per_tile, interleave_tiles=config.interleave_tiles)
    by_reason = report.rejected_by_reason()
    for r in report.rejections[:20]:
        context.log.warning("rejected %s (%s): %s", r.key or r.sv_id, r.stage, r.reason)
    if report.n_written == 0:
        raise dg.Failure(f"no sample written for {region.name}: {report.n_rejected} pairs rejected",
                         metadata={"rejected_by_reason": dg.MetadataValue.json(by_reason)})
    shard_set = report.shards
    if shard_set is None:  # samples were written, so the writer closed a shard set
        raise dg.Failure(f"shard writer for {region.name} reported no shard set")
    total_bytes = sum(s.bytes for s in shard_set.shards)
    splits = {str(k): int(v) for k, v in
              pd.read_parquet(out / MANIFEST_NAME, columns=["split"])["split"].value_counts().items()}
    stats = {"pairs": report.n_pairs, "samples": report.n_written, "rejected": report.n_rejected,
             "rejected_by_reason": by_reason, "shards": len(shard_set.shards), "bytes": total_bytes,
             "splits": splits, "chip_reads": report.n_chip_reads, "sv_reencoded": report.n_reencoded_sv,
             "panorama_crops": report.n_panorama_crops, "path": str(out),
             "dates_per_sample": {str(k): v for k, v in sorted(report.dates_per_sample.items())},
             "batch_diversity": shard_set.batch_diversity}
    data_root.write_stats("shards", region.name, stats)
    context.log.info("%d samples in %d shards (%.1f MB), %d rejected %s", report.n_written,
                     len(shard_set.shards), total_bytes / 1e6, report.n_rejected, by_reason)
    return dg.MaterializeResult(metadata={
        "num_samples": report.n_written,
        "num_rejected": report.n_rejected,
        "rejected_by_reason": dg.MetadataValue.json(by_reason),
        "num_shards": len(shard_set.shards),
        "bytes": total_bytes,
        "splits": dg.MetadataValue.json(splits),
        "dates_per_sample": dg.MetadataValue.json(cast(dict, stats["dates_per_sample"])),
        "batch_diversity": dg.MetadataValue.json(shard_set.batch_diversity or {}),
        "distinct_tiles_per_batch": float((shard_set.batch_diversity or {}).get("distinct_tiles_per_batch_after", 0.0)),
        "path": dg.MetadataValue.path(str(out)),
        "preview": preview(shard_set.paths[0]),
    })


def preview(shard: str, n: int = 4) -> dg.MetadataValue:
    """RS true colour with the SV position marked, beside the SV image, for the first samples of a shard."""
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    for row, (_key, m) in enumerate(iter_raw_samples(shard, limit=n)):
        meta = json.loads(m["json"])
        rs = rs_dates(decode_npy(m["rs.npy"]))[0].astype(np.float32)  # date 0 of a multi-date sample
        bands = meta.get("bands", [])
        idx = [bands.index(b) for b in ("B04", "B03", "B02") if b in bands] or [0, 0, 0]
        rgb = np.stack([rs[i] for i in idx], axis=-1)
        lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
        axes[row, 0].imshow(np.clip((rgb - lo) / max(hi - lo, 1), 0, 1))
        axes[row, 0].plot(meta["x"] * rgb.shape[1] - 0.5, meta["y"] * rgb.shape[0] - 0.5, "r+", ms=14, mew=2)
        axes[row, 0].set_title(f"{meta['tile_id']}", fontsize=7)
        axes[row, 1].imshow(Image.open(io.BytesIO(m["sv.jpg"])))
        axes[row, 1].set_title(f"{meta['sv_id']} ({meta['lon']:.5f}, {meta['lat']:.5f})", fontsize=7)
        for ax in axes[row]:
            ax.axis("off")
    return figure_md(fig, "shard preview")


def _region_shards(data_root: DataRoot, region: str) -> tuple[Path, dict]:
    out = shard_dir(data_root, region)
    return out, read_shards_json(out)


@dg.asset_check(asset=shards, blocking=True, description="The manifest lists exactly the samples written")
def manifest_matches_samples(context: dg.AssetCheckExecutionContext, data_root: DataRoot) -> dg.AssetCheckResult:
    """Manifest rows == samples in stats == sum of per-shard counts."""
    with data_root.region_lock(context.partition_key, shared=True):  # three files of one run, none rewritten meanwhile
        out, doc = _region_shards(data_root, context.partition_key)
        manifest = pd.read_parquet(out / MANIFEST_NAME, columns=["key", "shard"])
        stats = data_root.read_stats("shards", context.partition_key) or {}
    per_shard = sum(int(s["n_samples"]) for s in doc["shards"])
    ok = len(manifest) == stats.get("samples") == per_shard and manifest["key"].is_unique
    return dg.AssetCheckResult(passed=bool(ok), metadata={"manifest_rows": len(manifest), "per_shard_sum": per_shard,
                                                          "stats_samples": stats.get("samples")})


@dg.asset_check(asset=shards, blocking=True,
                description="Every shard opens, is non-empty, has dot-free keys and the full member set")
def shards_readable_and_complete(context: dg.AssetCheckExecutionContext,
                                 data_root: DataRoot) -> dg.AssetCheckResult:
    """Open every shard with tarfile; each sample has exactly rs.npy, sv.jpg, json; keys match the pattern."""
    with data_root.region_lock(context.partition_key, shared=True):  # no run rewrites it meanwhile
        out, doc = _region_shards(data_root, context.partition_key)
        problems: list[str] = []
        total = 0
        for s in doc["shards"]:
            n = 0
            try:
                # links, devices, absolute/.. paths and off-pattern names are refused, never extracted
                on_bad = lambda msg, name=s["path"]: problems.append(f"{name}: bad member: {msg}")  # noqa: E731
                for key, members in iter_raw_samples(str(out / s["path"]), on_bad_member=on_bad):
                    n += 1
                    if not KEY_PATTERN.match(key):
                        problems.append(f"{s['path']}: bad key {key!r}")
                    if set(members) != set(MEMBER_SUFFIXES):
                        problems.append(f"{s['path']}: {key} has {sorted(members)}")
            except (tarfile.TarError, OSError) as exc:
                problems.append(f"{s['path']}: unreadable ({exc})")
            if n == 0:
                problems.append(f"{s['path']}: empty shard")
            if n != int(s["n_samples"]):
                problems.append(f"{s['path']}: {n} samples, shards.json says {s['n_samples']}")
            total += n
        return dg.AssetCheckResult(passed=not problems, metadata={"samples_read": total, "shards": len(doc["shards"]),
                                                                  "problems": dg.MetadataValue.json(problems[:20])})
