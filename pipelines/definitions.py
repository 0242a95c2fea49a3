"""The Dagster code location: assets, checks, resources, jobs and schedules (kept thin)."""


import dagster as dg

from pipelines.common.storage import DataRoot
from pipelines.evaluation import ablation as ablation_assets
from pipelines.evaluation import assets as evaluation_assets
from pipelines.evaluation.resources import EvalTasks
from pipelines.jobs import (
    ablation_job,
    build_dataset_job,
    dataset_refresh_schedule,
    evaluate_job,
    summary_job,
    train_job,
)
from pipelines.pairing import assets as pairing_assets
from pipelines.pairing.resources import DuckDBEngine
from pipelines.reports import assets as report_assets
from pipelines.shards import assets as shard_assets
from pipelines.shards.resources import raster_access_from_env
from pipelines.stac import assets as stac_assets
from pipelines.stac.resources import stac_from_env
from pipelines.streetview import assets as streetview_assets
from pipelines.streetview.resources import StreetViewPoints
from pipelines.training import assets as training_assets

_modules = [stac_assets, streetview_assets, pairing_assets, shard_assets, training_assets, report_assets,
            evaluation_assets, ablation_assets]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(_modules),
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=[build_dataset_job, train_job, evaluate_job, ablation_job, summary_job],
    schedules=[dataset_refresh_schedule],
    resources={
        "stac": stac_from_env(),
        "streetview": StreetViewPoints(),
        "duckdb_engine": DuckDBEngine(),
        "raster_access": raster_access_from_env(),
        "data_root": DataRoot(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "eval_tasks": EvalTasks(),
    },
)
