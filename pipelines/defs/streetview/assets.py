"""Street-view points per region: loaded (files or an API), validated, rejects always written with reasons."""


import hashlib
import io
from pathlib import Path

import dagster as dg
import pandas as pd

from gair_dataset.atomic import atomic_path, atomic_write_bytes
from gair_dataset.signing import strip_token_params
from gair_dataset.streetview_points import normalize_rejects, swapped_coordinates, validate_points
from gair_dataset.sv_sources import ApiError
from pipelines.common.incremental import CODE_VERSIONS, built, region_settings, skipped, unchanged_stats, version_of
from pipelines.common.policies import NETWORK_RETRY, REMOTE_READS_POOL
from pipelines.common.storage import DataRoot
from pipelines.config import RegionConfig
from pipelines.defs.streetview.resources import StreetViewPoints
from pipelines.partitions import region_of, region_partitions


def _by_reason(rejects: pd.DataFrame) -> dict[str, int]:
    """Reject counts by kind of reason (the text before ``': '``, so per-row details do not split a kind)."""
    kinds = rejects["reason"].astype(str).str.split(": ", n=1).str[0]
    return {str(k): int(v) for k, v in kinds.value_counts().items()}


def _where(region: RegionConfig) -> str:
    src = region.streetview
    return f"{src.kind} {strip_token_params(src.url) if src.url else 'default API'}" if src.is_api \
        else f"{src.kind} {src.path}"


def _describe(region: RegionConfig) -> dict:
    """The source for run metadata, its URL without credential query parameters."""
    described = dict(region.streetview.describe())
    if described.get("url"):
        described["url"] = strip_token_params(str(described["url"]))
    return described


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a (Geo)Parquet table atomically (a unique temporary name, then renamed)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    """A table as the Parquet bytes it is written as (hashed for the data version before anything is written)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _log_rejects(context: dg.AssetExecutionContext, region: RegionConfig, rejects: pd.DataFrame) -> None:
    """One warning per kind of reason, naming the region, the source and the first rows with their text."""
    kinds = rejects["reason"].astype(str).str.split(": ", n=1).str[0]
    for kind, group in rejects.groupby(kinds, sort=True):
        examples = "; ".join(
            f"{'row ' + str(row) if row is not None and row is not pd.NA else sv_id}: {reason}"
            for sv_id, row, reason in group[["sv_id", "row", "reason"]].head(3).itertuples(index=False))
        context.log.warning("%s (%s): %d street-view rows rejected: %s (e.g. %s)", region.name, _where(region),
                            len(group), kind, examples)


@dg.asset(partitions_def=region_partitions, group_name="streetview", kinds={"geoparquet"}, pool=REMOTE_READS_POOL,
          retry_policy=NETWORK_RETRY, code_version=CODE_VERSIONS["streetview"])
def sv_points(context: dg.AssetExecutionContext, streetview: StreetViewPoints,
              data_root: DataRoot) -> dg.MaterializeResult:
    """Validated street-view points (id, lon, lat, image, heading, time, source, licence) and the rejected rows.

    ``rejects.parquet`` is written on every run (empty when nothing was rejected), before any failure.
    """
    with data_root.region_lock(context.partition_key, log=context.log):
        return _sv_points(context, streetview, data_root)


def _sv_points(context: dg.AssetExecutionContext, streetview: StreetViewPoints,
               data_root: DataRoot) -> dg.MaterializeResult:
    """The body of :func:`sv_points`, run under the region lock."""
    region = region_of(context)
    out = data_root.stage_dir("streetview", region.name)
    outputs = [out / "points.parquet", out / "rejects.parquet"]
    fingerprint = streetview.source_fingerprint(region, data_root)
    source_version = None if fingerprint is None else version_of(
        "streetview-source", CODE_VERSIONS["streetview"], region_settings(region), fingerprint)
    earlier = data_root.read_stats("streetview", region.name) or {}
    if source_version is not None and earlier.get("source_version") == source_version:
        same = unchanged_stats(data_root, "streetview", region.name, earlier.get("input_version", ""), outputs)
        if same is not None:  # the same file as last time: not even read again
            return skipped(context, "streetview", same, {"path": dg.MetadataValue.path(str(outputs[0]))})
    try:
        raw, read_rejects = streetview.load_region(region, data_root)
    except (FileNotFoundError, ValueError, ApiError) as exc:
        _write_parquet(normalize_rejects(pd.DataFrame()), out / "rejects.parquet")
        # The API clients already retried transient errors (429, 5xx, connection); what is left (a refused token, a
        # missing file, a malformed table) fails the same way again: no step retry.
        raise dg.Failure(f"cannot load street-view points for {region.name} ({_where(region)}): {exc}",
                         allow_retries=False) from exc
    points, rejects = validate_points(raw)
    rejects = normalize_rejects(pd.concat([df for df in (normalize_rejects(read_rejects), rejects) if not df.empty])
                                if not (read_rejects.empty and rejects.empty) else pd.DataFrame())
    rejects_bytes = _parquet_bytes(rejects)
    by_reason = _by_reason(rejects)
    _log_rejects(context, region, rejects)
    reasons_md = {"rejects_by_reason": dg.MetadataValue.json(by_reason)}
    swapped = swapped_coordinates(points, region.bbox) if not points.empty else None
    if points.empty or swapped:
        atomic_write_bytes(out / "rejects.parquet", rejects_bytes)  # written before the failure, as on every run
    if points.empty:
        raise dg.Failure(f"no valid street-view point for {region.name} from {_where(region)} ({len(rejects)} "
                         f"rejected, see {out / 'rejects.parquet'})", metadata=reasons_md, allow_retries=False)
    if swapped:
        raise dg.Failure(f"region {region.name} ({_where(region)}): {swapped}", metadata=reasons_md,
                         allow_retries=False)
    points_bytes = _parquet_bytes(points)
    version = version_of("streetview", CODE_VERSIONS["streetview"], region_settings(region),
                         hashlib.blake2b(points_bytes).hexdigest(), hashlib.blake2b(rejects_bytes).hexdigest())
    same = unchanged_stats(data_root, "streetview", region.name, version, outputs)
    if same is not None:  # the same points and rejects as last time: nothing rewritten
        if same.get("source_version") != source_version:  # a file rewritten with the same content
            data_root.write_stats("streetview", region.name, {**same, "source_version": source_version})
        return skipped(context, "streetview", same, {"path": dg.MetadataValue.path(str(outputs[0]))})
    atomic_write_bytes(out / "rejects.parquet", rejects_bytes)
    atomic_write_bytes(out / "points.parquet", points_bytes)
    decimal_commas = int(raw.attrs.get("decimal_commas", 0))
    if decimal_commas:
        context.log.info("%s: %d values read with a decimal comma", region.name, decimal_commas)
    licenses = {str(k): int(v) for k, v in points["license"].dropna().value_counts().items()}
    stats = {"points": len(points), "rejected": len(rejects), "rejected_by_reason": by_reason}
    if region.streetview.is_api:
        stats.update({"source": region.streetview.kind, "licenses": licenses,
                      "images_downloaded": int(raw.attrs.get("images_downloaded", 0)),
                      "images_cached": int(raw.attrs.get("images_cached", 0))})
    data_root.write_stats("streetview", region.name,
                          {**built(stats, version, version), "source_version": source_version})
    return dg.MaterializeResult(data_version=dg.DataVersion(version), metadata={
        "rebuilt": True,
        "data_version": version,
        "num_points": len(points),
        "num_rejected": len(rejects),
        "rejected_by_reason": dg.MetadataValue.json(by_reason),
        "source": dg.MetadataValue.json(_describe(region)),
        "licenses": dg.MetadataValue.json(licenses),
        "decimal_comma_values": decimal_commas,
        "images_downloaded": int(raw.attrs.get("images_downloaded", 0)),
        "images_cached": int(raw.attrs.get("images_cached", 0)),
        "path": dg.MetadataValue.path(str(out / "points.parquet")),
    })
