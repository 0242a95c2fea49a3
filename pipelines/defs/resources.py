"""The code location's resources: every external system behind a resource, the local implementation by default.

Settings read from the environment are bound as ``dg.EnvVar`` (resolved when a run starts, shown as such in the
UI), and only when the variable is set: ``dg.EnvVar`` fails on an unset variable, so an unset one leaves the
working default (``make demo`` sets nothing by hand). Nothing here reads the environment at import time.

- ``GAIR_DATA_ROOT`` -> ``data_root.root`` (the one data root: outputs, and the embedded sample the ``stac`` and
  ``streetview`` resources read);
- ``GAIR_STAC_CATALOG`` -> ``stac.catalog`` and ``raster_access.stac_catalog``;
- ``GAIR_EVAL_TASKS``, ``GAIR_EVAL_DATA`` -> ``eval_tasks.tasks_file``, ``eval_tasks.data_dir``;
- ``GAIR_TRAINING_LAUNCHER`` (``subprocess`` | ``k8s``, with ``GAIR_TRAINING_IMAGE``, ...) -> the kind of
  ``training_pipes_client``, chosen when the location loads (:mod:`pipelines.defs.training.launchers`).
"""

import os

import dagster as dg

from pipelines.common.storage import DataRoot
from pipelines.defs.evaluation.resources import EvalTasks
from pipelines.defs.pairing.resources import DuckDBEngine
from pipelines.defs.shards.resources import RasterAccess
from pipelines.defs.stac.resources import ConfiguredStacCatalog
from pipelines.defs.streetview.resources import StreetViewPoints
from pipelines.defs.training.launchers import training_pipes_client


def env_setting(name: str, default: str) -> str:
    """``dg.EnvVar(name)`` when the variable is set (and not empty), else ``default``."""
    return dg.EnvVar(name) if os.environ.get(name) else default


@dg.definitions
def resources() -> dg.Definitions:
    """Resources bound to every asset (built when the code location loads)."""
    return dg.Definitions(resources={
        "stac": ConfiguredStacCatalog(catalog=env_setting("GAIR_STAC_CATALOG", "local")),
        "streetview": StreetViewPoints(),
        "duckdb_engine": DuckDBEngine(),
        "raster_access": RasterAccess(stac_catalog=env_setting("GAIR_STAC_CATALOG", "")),
        "data_root": DataRoot(root=env_setting("GAIR_DATA_ROOT", "")),
        "training_pipes_client": training_pipes_client(),
        "eval_tasks": EvalTasks(tasks_file=env_setting("GAIR_EVAL_TASKS", ""),
                                data_dir=env_setting("GAIR_EVAL_DATA", "")),
    })
