"""Street-view points per region: loaded (files or an API), validated, rejects always written with reasons."""


from pathlib import Path

import dagster as dg
import pandas as pd

from gair_dataset.atomic import atomic_path
from gair_dataset.streetview_points import normalize_rejects, swapped_coordinates, validate_points
from gair_dataset.sv_sources import ApiError
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
    return f"{src.kind} {src.url or 'default API'}" if src.is_api else f"{src.kind} {src.path}"


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a (Geo)Parquet table atomically (a unique temporary name, then renamed)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


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
          retry_policy=NETWORK_RETRY)
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
    _write_parquet(rejects, out / "rejects.parquet")
    by_reason = _by_reason(rejects)
    _log_rejects(context, region, rejects)
    reasons_md = {"rejects_by_reason": dg.MetadataValue.json(by_reason)}
    if points.empty:
        raise dg.Failure(f"no valid street-view point for {region.name} from {_where(region)} ({len(rejects)} "
                         f"rejected, see {out / 'rejects.parquet'})", metadata=reasons_md, allow_retries=False)
    swapped = swapped_coordinates(points, region.bbox)
    if swapped:
        raise dg.Failure(f"region {region.name} ({_where(region)}): {swapped}", metadata=reasons_md,
                         allow_retries=False)
    _write_parquet(points, out / "points.parquet")
    decimal_commas = int(raw.attrs.get("decimal_commas", 0))
    if decimal_commas:
        context.log.info("%s: %d values read with a decimal comma", region.name, decimal_commas)
    licenses = {str(k): int(v) for k, v in points["license"].dropna().value_counts().items()}
    stats = {"points": len(points), "rejected": len(rejects), "rejected_by_reason": by_reason}
    if region.streetview.is_api:
        stats.update({"source": region.streetview.kind, "licenses": licenses,
                      "images_downloaded": int(raw.attrs.get("images_downloaded", 0)),
                      "images_cached": int(raw.attrs.get("images_cached", 0))})
    data_root.write_stats("streetview", region.name, stats)
    return dg.MaterializeResult(metadata={
        "num_points": len(points),
        "num_rejected": len(rejects),
        "rejected_by_reason": dg.MetadataValue.json(by_reason),
        "source": dg.MetadataValue.json(region.streetview.describe()),
        "licenses": dg.MetadataValue.json(licenses),
        "decimal_comma_values": decimal_commas,
        "images_downloaded": int(raw.attrs.get("images_downloaded", 0)),
        "images_cached": int(raw.attrs.get("images_cached", 0)),
        "path": dg.MetadataValue.path(str(out / "points.parquet")),
    })
