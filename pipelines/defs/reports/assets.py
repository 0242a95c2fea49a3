"""The run summary: counts per stage and region, written to ``<data root>/reports/run_summary.json``."""


import json
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from gair_dataset.atomic import atomic_write_json
from pipelines.common.storage import DataRoot
from pipelines.defs.shards.assets import shards
from pipelines.defs.training.assets import gair_model_checkpoint
from pipelines.partitions import REGIONS

#: Stages whose per-region ``stats.json`` goes into the summary, in pipeline order.
STAGES = ("stac", "tiles", "streetview", "pairs", "shards")


def build_summary(data_root: DataRoot) -> dict:
    """Collect every stage's per-region stats (stages not run yet are omitted)."""
    regions: dict[str, dict[str, Any]] = {}
    for name, cfg in REGIONS.items():
        per_stage = {s: st for s in STAGES if (st := data_root.read_stats(s, name)) is not None}
        if per_stage:
            regions[name] = {"description": cfg.description, **per_stage}
    totals: dict[str, int] = {}
    for reg in regions.values():
        for stage, key in (("stac", "items"), ("tiles", "tiles"), ("streetview", "points"), ("pairs", "paired"),
                           ("pairs", "outside_every_tile"), ("shards", "samples"), ("shards", "shards")):
            if stage in reg and key in reg[stage]:
                totals[f"{stage}.{key}"] = totals.get(f"{stage}.{key}", 0) + int(reg[stage][key])
    synthetic = any(r.get("stac", {}).get("synthetic") for r in regions.values())
    return {"generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "data_root": str(data_root.path), "synthetic_data": synthetic, "totals": totals,
            "regions": regions}


@dg.asset(group_name="reports", deps=[shards, gair_model_checkpoint], kinds={"json"})
def run_summary(context: dg.AssetExecutionContext, data_root: DataRoot) -> dg.MaterializeResult:
    """Machine-readable summary of the latest run of every stage and region."""
    summary = build_summary(data_root)
    extra = data_root.path / "reports" / "training_summary.json"
    if extra.exists():
        summary["training"] = json.loads(extra.read_text())
    out = data_root.stage_dir("reports") / "run_summary.json"
    atomic_write_json(out, summary, indent=1, default=str)
    context.log.info("run summary: %s", json.dumps(summary["totals"]))
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(out)),
                                          "totals": dg.MetadataValue.json(summary["totals"]),
                                          "synthetic_data": summary["synthetic_data"]})
