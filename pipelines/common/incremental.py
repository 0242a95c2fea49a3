"""Incremental rebuilds of the region stages: each records what it was built from and skips when that is unchanged.

Every region stage writes two versions into its ``stats.json``:

* ``input_version``: a hash of what the stage was built from: the ``data_version`` of each upstream stage, the
  region's settings, the asset's configuration and the stage's :data:`CODE_VERSIONS` entry;
* ``data_version``: a hash of what it wrote. For ``stac_items`` and ``sv_points`` (the sources) it hashes the
  content found (item JSON, the points table); ``tile_grid`` and ``pairs`` hash the files they wrote (a changed item
  whose footprint did not change gives the same tiles, and the pairs and shards after them can skip); ``shards``,
  whose output is a deterministic function of its inputs (byte-identical reruns are tested), uses its input version.

A stage whose input version equals the recorded one, and whose outputs all exist, does no work: it rewrites
nothing (its files stay byte-identical, modification times included) and reports the materialization with the same
``data_version``, so Dagster shows the downstream assets as up to date. The sources always look again (a catalog
search, a points file read) and write only when the content changed.
"""

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import dagster as dg

from pipelines.common.storage import DataRoot
from pipelines.config import RegionConfig

#: Bump a stage's entry when a code change alters what it writes from the same inputs: the next run rebuilds it.
CODE_VERSIONS = {"stac": "1", "tiles": "1", "streetview": "1", "pairs": "1", "shards": "1"}

#: Region fields that do not change any output (a new description, the regions file moved).
_NEUTRAL_REGION_FIELDS = ("description", "base_dir")


def version_of(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def region_settings(region: RegionConfig) -> dict[str, Any]:
    """The region's settings that shape its outputs (everything but its description and file location)."""
    d = dataclasses.asdict(region)
    for k in _NEUTRAL_REGION_FIELDS:
        d.pop(k, None)
    return d


def upstream_versions(data_root: DataRoot, region: str, stages: Iterable[str]) -> dict[str, str | None]:
    """``{stage: data_version}`` of upstream stages as their ``stats.json`` records them (None: never built)."""
    return {s: (data_root.read_stats(s, region) or {}).get("data_version") for s in stages}


def file_signatures(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of files (-1 for a missing one): any rewrite of an input changes them."""
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((p.name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p.name, -1, -1))
    return out


def input_version(stage: str, region: RegionConfig, upstream: dict[str, str | None], config: Any = None,
                  files: Iterable[Path] = ()) -> str:
    """The input version of ``stage`` for ``region``.

    Args:
        stage: the stage (a :data:`CODE_VERSIONS` key).
        region: the region (its settings count, see :func:`region_settings`).
        upstream: the upstream stages' data versions (:func:`upstream_versions`).
        config: the asset's run configuration, if any.
        files: the upstream files the stage reads: their sizes and modification times count too, so a file
            rewritten by hand (or by a tool outside the pipeline) is read again.
    """
    return version_of(stage, CODE_VERSIONS[stage], upstream, region_settings(region), config,
                      file_signatures(files))


def unchanged_stats(data_root: DataRoot, stage: str, region: str, version: str,
                    outputs: Iterable[Path]) -> dict | None:
    """The recorded stats when ``stage`` was last built from ``version`` and every output still exists, else None.

    An upstream that was never built (a None data version) never counts as unchanged.
    """
    stats = data_root.read_stats(stage, region)
    if not stats or stats.get("input_version") != version or stats.get("data_version") is None:
        return None
    if not all(p.exists() for p in outputs):
        return None
    return stats


def skipped(context: dg.AssetExecutionContext, stage: str, stats: dict,
            metadata: dict[str, Any] | None = None) -> dg.MaterializeResult:
    """The materialization of a stage that found its inputs unchanged: same data version, nothing rewritten."""
    context.log.info("%s of %s: inputs unchanged (input version %s): nothing rebuilt, outputs kept as they are",
                     stage, context.partition_key, stats["input_version"])
    counts = {k: v for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(stats["data_version"]),
        metadata={**{f"num_{k}" if not k.startswith("num_") else k: v for k, v in counts.items()},
                  **(metadata or {}), "rebuilt": False, "data_version": stats["data_version"],
                  "input_version": stats["input_version"]})


def files_version(*paths: Path) -> str:
    """A hash of files' bytes, the data version of a stage whose output may stay the same when its inputs change.

    (A catalog item's metadata changed, the tiles did not: the stages after them can skip.)
    """
    h = hashlib.blake2b(digest_size=12)
    for p in paths:
        with open(p, "rb") as fh:
            h.update(p.name.encode())
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def built(stats: dict, input_ver: str, data_ver: str | None = None) -> dict:
    """``stats`` with the input and data versions of a fresh build (the data version defaults to the input's)."""
    return {**stats, "input_version": input_ver, "data_version": data_ver or input_ver}
