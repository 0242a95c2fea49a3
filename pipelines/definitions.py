"""The Dagster code location: assets, checks, resources, jobs and schedules (kept thin)."""


import dagster as dg

from pipelines.common.storage import DataRoot
from pipelines.jobs import build_dataset_job, dataset_refresh_schedule, summary_job
from pipelines.pairing import assets as pairing_assets
from pipelines.pairing.resources import DuckDBEngine
from pipelines.reports import assets as report_assets
from pipelines.stac import assets as stac_assets
from pipelines.stac.resources import stac_from_env
from pipelines.streetview import assets as streetview_assets
from pipelines.streetview.resources import StreetViewPoints

_modules = [stac_assets, streetview_assets, pairing_assets, report_assets]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(_modules),
    asset_checks=dg.load_asset_checks_from_modules(_modules),
    jobs=[build_dataset_job, summary_job],
    schedules=[dataset_refresh_schedule],
    resources={
        "stac": stac_from_env(),
        "streetview": StreetViewPoints(),
        "duckdb_engine": DuckDBEngine(),
        "data_root": DataRoot(),
    },
)
