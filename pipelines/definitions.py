"""The Dagster code location: everything under :mod:`pipelines.defs`, autoloaded (a module left out cannot be)."""

from pathlib import Path

import dagster as dg

import pipelines.defs

# project_root: the package folder itself, so the location also loads from an installed wheel (no pyproject.toml).
defs = dg.components.load_defs(pipelines.defs, project_root=Path(pipelines.defs.__file__).resolve().parents[1])
