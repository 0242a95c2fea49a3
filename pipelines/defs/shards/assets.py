"""WebDataset shards of (RS chip, SV image, location) samples, per region partition."""

import errno
import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import dagster as dg
import numpy as np
import pandas as pd
from PIL import Image

from gair_dataset import object_store
from gair_dataset.atomic import atomic_write_json
from gair_dataset.bands import profile_data
from gair_dataset.chip_cache import ChipCache
from gair_dataset.contract import KEY_PATTERN, MANIFEST_NAME, MEMBER_SUFFIXES, SHARDS_JSON_NAME, decode_npy, rs_dates
from gair_dataset.samples import DEFAULT_INTERLEAVE_TILES, build_shards_from_pairs, iter_items
from gair_dataset.shards import iter_raw_samples, read_shards_json
from gair_dataset.stac_catalog import read_items
from gair_dataset.streetview_points import with_provenance
from pipelines.common.incremental import (
    CODE_VERSIONS,
    built,
    file_signatures,
    input_version,
    skipped,
    unchanged_stats,
    upstream_versions,
)
from pipelines.common.plots import figure_md, plt
from pipelines.common.policies import NETWORK_RETRY, REMOTE_READS_POOL
from pipelines.common.storage import DataRoot
from pipelines.config import RegionConfig
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
    # URL prefix (s3://bucket/prefix/, any fsspec URL) the complete set is also published to, as <prefix>/<region>/,
    # shards.json last (gair_dataset.object_store; credentials from the environment). None: local only.
    publish_url: str | None = None
    # Keep each tile's chips in <data root>/cache/<region>/chips (about the size of the shards' rs.npy): a rebuild
    # after a few catalog changes reads only the tiles whose items or grid changed (gair_dataset.chip_cache).
    chip_cache: bool = True


def shard_dir(data_root: DataRoot, region: str) -> Path:
    """Folder of a region's shard set."""
    return data_root.stage_dir("shards", region)


#: errno values of a write that no retry can fix: no space, quota exceeded, file too large.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

#: ShardsConfig fields that change how fast shards are written, not what is in them.
_NEUTRAL_SHARD_SETTINGS = {"chip_workers", "publish_url", "chip_cache"}


def _publish(context: dg.AssetExecutionContext, config: ShardsConfig, out: Path,
             region: str) -> dict[str, dg.MetadataValue]:
    """Publish the complete set to ``config.publish_url`` (if set); the metadata saying where."""
    if not config.publish_url:
        return {}
    result = object_store.publish_shard_set(
        out, object_store.join(object_store.check_url(config.publish_url), region) + "/")
    context.log.info("published to %s: %d files uploaded (%s), %d stale removed", result.url,
                     len(result.uploaded), "unchanged" if result.unchanged else f"{result.bytes_uploaded} bytes",
                     len(result.removed))
    return {"published_url": dg.MetadataValue.url(result.url),
            "published_files": dg.MetadataValue.int(len(result.uploaded))}


def shards_versions(config: ShardsConfig, region: RegionConfig, data_root: DataRoot) -> tuple[str, str]:
    """``(input version, data version)`` of a region's shard set.

    Both hash every upstream stage's data version and the shard settings; the input version also the sizes and
    times of the files read (a file rewritten by hand is read again), the data version not (the same inputs give
    the same shards, byte for byte, whenever they are built).
    """
    settings = {k: v for k, v in config.model_dump().items() if k not in _NEUTRAL_SHARD_SETTINGS}
    settings["band_profiles"] = band_profiles(region.collections)  # edited in the regions file: chips change
    upstream = upstream_versions(data_root, region.name, ["stac", "tiles", "streetview", "pairs"])
    files = [data_root.stage_dir(stage, region.name) / name for stage, name in
             (("stac", "items.json"), ("tiles", "tiles.parquet"), ("streetview", "points.parquet"),
              ("pairs", "pairs.parquet"))]
    return (input_version("shards", region, upstream, settings, files=files),
            input_version("shards", region, upstream, settings))


def band_profiles(collections: Iterable[str]) -> dict[str, Any]:
    """The band profile of each collection (None for one without), as plain data for a version hash."""
    return {c: profile_data(c) for c in sorted(collections)}


def shard_files(out: Path) -> list[Path]:
    """The shard files the set's ``shards.json`` lists (none when it is missing or unreadable)."""
    try:
        return [out / s["path"] for s in read_shards_json(out)["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [out / SHARDS_JSON_NAME]  # missing: never "unchanged"


@dg.asset(partitions_def=region_partitions, group_name="shards", deps=[pairs, tile_grid, stac_items],
          kinds={"webdataset"},
          pool=REMOTE_READS_POOL, retry_policy=NETWORK_RETRY, code_version=CODE_VERSIONS["shards"])
def shards(context: dg.AssetExecutionContext, config: ShardsConfig, raster_access: RasterAccess,
           data_root: DataRoot) -> dg.MaterializeResult:
    """Training-ready WebDataset shards (rs.npy, sv.jpg, json per sample) + manifest, for one region."""
    with data_root.region_lock(context.partition_key, log=context.log):
        return _shards(context, config, raster_access, data_root)


def _shards(context: dg.AssetExecutionContext, config: ShardsConfig, raster_access: RasterAccess,
            data_root: DataRoot) -> dg.MaterializeResult:
    """The body of :func:`shards`, run under the region lock."""
    region = region_of(context)
    out = shard_dir(data_root, region.name)
    version, data_version = shards_versions(config, region, data_root)
    same = unchanged_stats(data_root, "shards", region.name, version,
                           [out / SHARDS_JSON_NAME, out / MANIFEST_NAME, *shard_files(out)])
    if same is not None:  # unchanged: still published (a no-op when the remote copy is identical)
        return skipped(context, "shards", same, {"path": dg.MetadataValue.path(str(out)),
                                                 **_publish(context, config, out, region.name)})
    pairs_df = pd.read_parquet(data_root.stage_dir("pairs", region.name) / "pairs.parquet")
    # Licence/attribution of API street-view points stay in points.parquet (slim pairs): joined here by sv_id.
    pairs_df = with_provenance(pairs_df, data_root.stage_dir("streetview", region.name) / "points.parquet")
    # The pairs table is slim: each pair's tile attributes (window, CRS, bbox, item_ids...) come from the tiles.
    tiles_df = pd.read_parquet(data_root.stage_dir("tiles", region.name) / "tiles.parquet")
    items = iter_items(read_items(data_root.stage_dir("stac", region.name)))
    synthetic = any(it.get("properties", {}).get("gair:synthetic") for it in items.values())
    context.log.info("building shards for %d pairs over %d tiles into %s", len(pairs_df),
                     pairs_df["tile_id"].nunique(), out)
    try:
        report = build_shards_from_pairs(
            pairs_df, items, out, tiles=tiles_df, name=region.name, samples_per_shard=config.samples_per_shard,
            out_size=region.grid.chip_px, signer=raster_access.signer(), gdal_env=raster_access.gdal_env(),
            max_nodata_fraction=config.max_nodata_fraction, max_cloud_fraction=config.max_cloud_fraction,
            sv_max_side=config.sv_max_side, synthetic=synthetic, chip_workers=config.chip_workers,
            max_dates=config.max_dates or region.grid.items_per_tile, interleave_tiles=config.interleave_tiles,
            publish_lock=data_root.shard_set_lock(region.name, log=context.log),
            chip_cache=ChipCache(data_root.stage_dir("cache", region.name) / "chips") if config.chip_cache else None)
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        # A full disk (or quota, or file-size limit) fails the same way on a retry: say so once, now.
        raise dg.Failure(f"shards of {region.name}: cannot write under {out}: {exc.strerror} ([Errno {exc.errno}] "
                         f"{errno.errorcode.get(exc.errno or 0, '')}): free space (or raise the quota) and run "
                         f"again; the staging folder was removed and the published set, if any, is as it was",
                         allow_retries=False) from exc
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
             "splits": splits, "chip_reads": report.n_chip_reads, "chip_retries": report.n_chip_retries,
             "chip_resigned": report.n_chip_resigned,
             "cached_tiles": report.n_cached_tiles,
             "sv_reencoded": report.n_reencoded_sv,
             "panorama_crops": report.n_panorama_crops, "path": str(out),
             "dates_per_sample": {str(k): v for k, v in sorted(report.dates_per_sample.items())},
             "batch_diversity": shard_set.batch_diversity}
    if report.n_unrecovered_tiles:  # read errors are no verdict on the data: the next run must not skip the step
        stats["unrecovered_tiles"] = report.n_unrecovered_tiles
        context.log.warning("%d tile(s) lost to read errors that a retry did not fix: the next run reads the region "
                            "again", report.n_unrecovered_tiles)
        version = f"{version}:incomplete"
    published = _publish(context, config, out, region.name)  # before the stats: a failed publish is retried whole
    data_root.write_stats("shards", region.name, built(stats, version, data_version))
    context.log.info("%d samples in %d shards (%.1f MB), %d rejected %s; %d chip reads, %d tiles from the chip cache",
                     report.n_written, len(shard_set.shards), total_bytes / 1e6, report.n_rejected, by_reason,
                     report.n_chip_reads, report.n_cached_tiles)
    return dg.MaterializeResult(data_version=dg.DataVersion(data_version), metadata={
        "rebuilt": True,
        "data_version": data_version,
        "num_samples": report.n_written,
        "num_rejected": report.n_rejected,
        "rejected_by_reason": dg.MetadataValue.json(by_reason),
        "num_shards": len(shard_set.shards),
        "chip_reads": report.n_chip_reads,
        "cached_tiles": report.n_cached_tiles,
        "chip_resigned": report.n_chip_resigned,
        "bytes": total_bytes,
        "splits": dg.MetadataValue.json(splits),
        "dates_per_sample": dg.MetadataValue.json(cast(dict, stats["dates_per_sample"])),
        "batch_diversity": dg.MetadataValue.json(shard_set.batch_diversity or {}),
        "distinct_tiles_per_batch": float((shard_set.batch_diversity or {}).get("distinct_tiles_per_batch_after", 0.0)),
        "path": dg.MetadataValue.path(str(out)),
        "preview": preview(shard_set.paths[0]),
        **published,
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
    """Open every shard with tarfile; each sample has exactly rs.npy, sv.jpg, json; keys match the pattern.

    A set already verified at its current data version, whose files still have the sizes and modification times
    they had then, is not read again (an unchanged refresh); any rewrite, truncation or replacement is read.
    """
    with data_root.region_lock(context.partition_key, shared=True):  # no run rewrites it meanwhile
        out, doc = _region_shards(data_root, context.partition_key)
        version = (data_root.read_stats("shards", context.partition_key) or {}).get("data_version")
        record = data_root.path / ".checks" / "shards_readable" / f"{context.partition_key}.json"
        files = _file_signatures(out, doc)
        try:
            earlier = json.loads(record.read_text())
        except (OSError, ValueError):
            earlier = {}
        if version is not None and earlier.get("data_version") == version and earlier.get("files") == files:
            return dg.AssetCheckResult(passed=True, metadata={
                "samples_read": 0, "samples_verified_earlier": int(earlier.get("samples", 0)),
                "shards": len(doc["shards"]), "problems": dg.MetadataValue.json([])})
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
        if not problems and version is not None:
            atomic_write_json(record, {"data_version": version, "files": files, "samples": total})
        return dg.AssetCheckResult(passed=not problems, metadata={"samples_read": total, "shards": len(doc["shards"]),
                                                                  "problems": dg.MetadataValue.json(problems[:20])})


def _file_signatures(out: Path, doc: dict) -> dict[str, list[int]]:
    """``{file: [size, mtime_ns]}`` of a shard set's listed files, manifest and shards.json (-1: missing)."""
    names = [SHARDS_JSON_NAME, MANIFEST_NAME, *(s["path"] for s in doc["shards"])]
    sigs = file_signatures(out / n for n in names)
    return {name: [size, mtime] for name, (_, size, mtime) in zip(names, sigs, strict=True)}
