"""Jobs and the dataset-refresh schedule."""


import dagster as dg

from pipelines.defs.evaluation.ablation import localizer_ablation
from pipelines.defs.evaluation.assets import (
    eval_alignment,
    eval_location,
    eval_remote_sensing,
    eval_streetview,
    evaluation_report,
    gair_embeddings,
)
from pipelines.defs.pairing.assets import pairs
from pipelines.defs.reports.assets import run_summary
from pipelines.defs.shards.assets import shards
from pipelines.defs.stac.assets import stac_items, tile_grid
from pipelines.defs.streetview.assets import sv_points
from pipelines.defs.training.assets import gair_model_checkpoint
from pipelines.partitions import REGIONS

#: The main job: one region partition from STAC search to training-ready data.
build_dataset_job = dg.define_asset_job(
    "build_dataset",
    selection=dg.AssetSelection.assets(stac_items, tile_grid, sv_points, pairs, shards),
    description="STAC search -> tile grid -> street-view points -> pairs -> shards, for one region partition.",
)

#: Trains on every region's shards (tiny CPU configuration by default), then rewrites the summary.
train_job = dg.define_asset_job("train_model", selection=dg.AssetSelection.assets(gair_model_checkpoint, run_summary),
                                description="Train GAIR on all complete shard sets, then update the run summary.")

#: Evaluates the trained checkpoint: geo-alignment, every downstream family, embeddings, then the report.
evaluate_job = dg.define_asset_job(
    "evaluate_model",
    selection=dg.AssetSelection.assets(eval_alignment, eval_location, eval_streetview, eval_remote_sensing,
                                       gair_embeddings, evaluation_report),
    description="Geo-alignment benchmark, downstream probes and embedding export for the trained checkpoint, then "
                "reports/evaluation.md + evaluation.json.",
)

#: One model per localiser at equal budget, the alignment benchmark for each, then the report again.
ablation_job = dg.define_asset_job(
    "ablate_localizers",
    selection=dg.AssetSelection.assets(localizer_ablation, evaluation_report),
    description="Train one tiny model per localiser (nili, mean, centre, bilinear, bicubic) with the same data, "
                "steps, seed and batch; benchmark each; add the side-by-side rows to the evaluation report.",
)

#: Rewrites reports/run_summary.json from what every stage last wrote.
summary_job = dg.define_asset_job("run_summary_job", selection=dg.AssetSelection.assets(run_summary))


@dg.schedule(job=build_dataset_job, cron_schedule="0 3 * * 1", default_status=dg.DefaultScheduleStatus.STOPPED,
             description="Weekly dataset refresh: re-search STAC for every region (new items are picked up).")
def dataset_refresh_schedule(context: dg.ScheduleEvaluationContext):
    """One run per region; run keys are deterministic (region + scheduled date), so a tick never runs twice."""
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    for region in sorted(REGIONS):
        yield dg.RunRequest(run_key=f"refresh-{region}-{day}", partition_key=region,
                            tags={"gair/refresh": day})
