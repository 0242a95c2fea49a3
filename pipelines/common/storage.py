"""Where each stage writes, per region partition (a resource so that tests and users can move it)."""


import json
import os
from pathlib import Path

import dagster as dg

from pipelines.config import data_root


class DataRoot(dg.ConfigurableResource):
    """The data root (``$GAIR_DATA_ROOT``, default ``gair_data``); each stage gets ``<root>/<stage>/<region>``."""

    root: str = ""

    @property
    def path(self) -> Path:
        """The resolved root folder."""
        return Path(self.root).resolve() if self.root else data_root()

    def stage_dir(self, stage: str, region: str | None = None) -> Path:
        """``<root>/<stage>[/<region>]``, created."""
        p = self.path / stage / region if region else self.path / stage
        p.mkdir(parents=True, exist_ok=True)
        return p

    def write_stats(self, stage: str, region: str, stats: dict) -> Path:
        """Write a stage's per-region counts (read back by the run summary), atomically."""
        out = self.stage_dir(stage, region) / "stats.json"
        tmp = out.with_name(f".stats.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(stats, indent=1, default=str))
        tmp.replace(out)
        return out

    def read_stats(self, stage: str, region: str) -> dict | None:
        """A stage's counts for a region, or None when the stage has not run there."""
        p = self.path / stage / region / "stats.json"
        return json.loads(p.read_text()) if p.exists() else None
