"""The data root: where each stage writes, per region partition, and where the embedded sample lives.

One resource, the single source of the data root: the assets write under it and the STAC and street-view resources
read the embedded sample (``sample://``, the local sample catalog) from it, so moving it moves inputs and outputs.
"""


import json
import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from gair_dataset.sample_region import ensure_sample
from pipelines.config import data_root


class DataRoot(dg.ConfigurableResource):
    """The data root; each stage gets ``<root>/<stage>/<region>``, the embedded sample ``<root>/sample``.

    The code location binds ``root`` to ``dg.EnvVar("GAIR_DATA_ROOT")`` when that variable is set; an empty
    ``root`` is ``$GAIR_DATA_ROOT`` read when used, else ``gair_data`` in the current directory.
    """

    root: str = Field(default="", description="data root folder ('' = $GAIR_DATA_ROOT or ./gair_data)")

    @property
    def path(self) -> Path:
        """The resolved root folder."""
        return Path(self.root).resolve() if self.root else data_root()

    @property
    def sample_dir(self) -> Path:
        """``<root>/sample``: where the embedded synthetic sample lives (not generated here)."""
        return self.path / "sample"

    def sample(self) -> Path:
        """The embedded SYNTHETIC sample under ``<root>/sample``, generated on first use (safe across processes)."""
        return ensure_sample(self.sample_dir)

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
