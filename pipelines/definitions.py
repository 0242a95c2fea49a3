"""The Dagster code location: everything under :mod:`pipelines.defs`, autoloaded (a module left out cannot be)."""

import dagster as dg

import pipelines.defs

defs = dg.components.load_defs(pipelines.defs)
