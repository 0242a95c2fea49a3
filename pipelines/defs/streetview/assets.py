"""Street-view points per region: loaded, validated, rejects reported with reasons."""


import dagster as dg
import pandas as pd

from gair_dataset.streetview_points import validate_points
from pipelines.common.storage import DataRoot
from pipelines.defs.streetview.resources import StreetViewPoints
from pipelines.partitions import region_of, region_partitions


@dg.asset(partitions_def=region_partitions, group_name="streetview", kinds={"geoparquet"})
def sv_points(context: dg.AssetExecutionContext, streetview: StreetViewPoints,
              data_root: DataRoot) -> dg.MaterializeResult:
    """Validated street-view points (id, lon, lat, image, heading, time) and the rejected rows."""
    region = region_of(context)
    try:
        raw, read_rejects = streetview.load(region.streetview, region.base_dir, data_root)
    except (FileNotFoundError, ValueError) as exc:
        raise dg.Failure(f"cannot load street-view points for {region.name}: {exc}") from exc
    points, rejects = validate_points(raw)
    rejects = pd.concat([read_rejects.assign(lon=float("nan"), lat=float("nan")), rejects], ignore_index=True)
    if points.empty:
        raise dg.Failure(f"no valid street-view point for {region.name} ({len(rejects)} rejected)",
                         metadata={"rejects_by_reason": dg.MetadataValue.json(
                             {str(k): int(v) for k, v in rejects["reason"].value_counts().items()})})
    out = data_root.stage_dir("streetview", region.name)
    tmp = out / ".points.parquet.tmp"
    points.to_parquet(tmp, index=False)
    tmp.replace(out / "points.parquet")
    rejects.to_parquet(out / "rejects.parquet", index=False)
    by_reason = {str(k): int(v) for k, v in rejects["reason"].value_counts().items()}
    for reason, n in by_reason.items():
        context.log.warning("%d street-view rows rejected: %s", n, reason)
    data_root.write_stats("streetview", region.name, {"points": len(points), "rejected": len(rejects),
                                                      "rejected_by_reason": by_reason})
    return dg.MaterializeResult(metadata={
        "num_points": len(points),
        "num_rejected": len(rejects),
        "rejected_by_reason": dg.MetadataValue.json(by_reason),
        "source": dg.MetadataValue.json({"kind": region.streetview.kind, "path": region.streetview.path}),
        "path": dg.MetadataValue.path(str(out / "points.parquet")),
    })
