"""The code location's resources: every external system behind a resource, the local implementation by default."""

import dagster as dg

from pipelines.common.storage import DataRoot
from pipelines.defs.evaluation.resources import EvalTasks
from pipelines.defs.pairing.resources import DuckDBEngine
from pipelines.defs.shards.resources import raster_access_from_env
from pipelines.defs.stac.resources import stac_from_env
from pipelines.defs.streetview.resources import StreetViewPoints


@dg.definitions
def resources() -> dg.Definitions:
    """Resources bound to every asset (built when the code location loads, so environment variables apply)."""
    return dg.Definitions(resources={
        "stac": stac_from_env(),
        "streetview": StreetViewPoints(),
        "duckdb_engine": DuckDBEngine(),
        "raster_access": raster_access_from_env(),
        "data_root": DataRoot(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
        "eval_tasks": EvalTasks(),
    })
