"""The data root: where each stage writes, per region partition, and where the embedded sample lives.

One resource, the single source of the data root: the assets write under it and the STAC and street-view resources
read the embedded sample (``sample://``, the local sample catalog) from it, so moving it moves inputs and outputs.
"""


import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from gair_dataset.atomic import atomic_write_json, file_lock, rw_file_lock
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
        return atomic_write_json(out, stats, indent=1, default=str)

    def lock_path(self, region: str) -> Path:
        """``<root>/.locks/<region>.lock``: the lock file of a region partition."""
        return self.path / ".locks" / f"{region}.lock"

    @contextlib.contextmanager
    def region_lock(self, region: str, *, shared: bool = False,
                    log: dg.DagsterLogManager | None = None) -> Iterator[None]:
        """Hold the region partition's lock: exclusive while a region asset writes, shared while a check reads.

        Two runs of one region (a schedule tick and a manual launch, a retry of a run still running, ...) then
        never write the same stage at once, and a check never reads a stage half rewritten by another run; the
        other run waits. An ``fcntl.flock`` on a file under the data root: it needs no Dagster instance settings,
        holds across processes of one machine (and on NFS v4 / most cluster filesystems), and a run that dies
        releases it.
        """
        t0 = time.monotonic()
        with file_lock(self.lock_path(region), shared=shared):
            waited = time.monotonic() - t0
            if log is not None and waited > 1.0:
                log.info(f"waited {waited:.1f}s for region {region}'s lock (another run was writing it)")
            yield

    @contextlib.contextmanager
    def shard_set_lock(self, region: str, *, shared: bool = False,
                       log: dg.DagsterLogManager | None = None) -> Iterator[None]:
        """Hold a region's published shard set: shared while a run reads it, exclusive while a rebuild swaps it.

        Apart from :meth:`region_lock`: training and evaluation read the shards for hours, and a refresh of the
        region meanwhile does all its work (new chips, staged shards) and only waits, at the end, to swap its new
        set in; readers never see shards replaced under them. A waiting swap goes before readers that arrive after it
        (:func:`~gair_dataset.atomic.rw_file_lock`), so overlapping training and evaluation runs cannot keep it out.
        """
        path = self.path / ".locks" / f"{region}.shards.lock"

        def say_waiting() -> None:
            if not shared and log is not None:
                log.info(f"region {region}: waiting for the runs reading its shard set (training, evaluation) to "
                         "finish before the new set replaces it")

        with rw_file_lock(path, shared=shared, on_wait=say_waiting):
            yield

    def read_stats(self, stage: str, region: str) -> dict | None:
        """A stage's counts for a region, or None when the stage has not run there."""
        p = self.path / stage / region / "stats.json"
        return json.loads(p.read_text()) if p.exists() else None
