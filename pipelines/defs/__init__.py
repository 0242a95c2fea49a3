"""Everything Dagster loads, one folder per domain, autoloaded by :mod:`pipelines.definitions`.

A module-level asset, check, job, schedule, sensor or ``Definitions`` object in any module under this folder is
part of the code location; nothing needs listing by hand.
"""
