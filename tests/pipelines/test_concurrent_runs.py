"""Two runs of one region partition at once (e.g. a schedule tick and a manual launch) leave complete outputs,
byte-identical to a clean single run: every region asset holds the partition's lock while it writes, temporary and
staging names are unique per run, and every file is published by an atomic rename."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
REGION = "sample-lund"
STAGES = ("stac", "tiles", "streetview", "pairs", "shards")
#: stats.json fields that measure the run rather than describe its output (input_version hashes the input files'
#: modification times too; the concurrent runs take their chips from the chip cache the single run filled).
VOLATILE_STATS = {"seconds", "input_version", "chip_reads", "cached_tiles"}

RUN = r'''
import sys
import dagster as dg
from pipelines.definitions import defs
result = defs.resolve_job_def("build_dataset").execute_in_process(
    partition_key=sys.argv[1], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
print("CHECKS", checks, flush=True)
raise SystemExit(0 if result.success and checks and all(checks.values()) else 1)
'''


def _launch(root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "GAIR_DATA_ROOT": str(root), "PYTHONPATH": str(REPO)}
    env.pop("DAGSTER_HOME", None)
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-c", RUN, REGION], cwd=REPO, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs, strict=True):
        rc = proc.wait(timeout=900)
        assert rc == 0, f"run failed (rc {rc}):\n{log.read_text()[-6000:]}"


def _outputs(root: Path) -> dict[str, str]:
    """Every published file of the region's stages -> its sha256 (stats.json without its timings)."""
    out = {}
    for stage in STAGES:
        for p in sorted((root / stage / REGION).rglob("*")):
            if not p.is_file():
                continue
            data = p.read_bytes()
            if p.name == "stats.json":
                stats = {k: v for k, v in json.loads(data).items() if k not in VOLATILE_STATS}
                data = json.dumps(stats, sort_keys=True).encode()
            out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if ".tmp-" in p.name or p.name.startswith(".staging") or ".old-" in p.name]


@pytest.mark.slow
def test_two_concurrent_runs_of_one_region_match_a_clean_single_run(tmp_path: Path) -> None:
    root = tmp_path / "gair_data"
    # A clean single run (it also generates the embedded sample, which both concurrent runs then read).
    t0 = time.monotonic()
    _wait([_launch(root, tmp_path / "single.log")], [tmp_path / "single.log"])
    single_s = time.monotonic() - t0
    clean = _outputs(root)
    assert any(k.endswith(".tar") for k in clean) and any(k.endswith("shards.json") for k in clean)
    for stage in STAGES:  # start again from nothing but the sample: both runs create every file
        for p in sorted((root / stage / REGION).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()

    logs = [tmp_path / "run-a.log", tmp_path / "run-b.log"]
    t0 = time.monotonic()
    procs = [_launch(root, log) for log in logs]
    _wait(procs, logs)
    both_s = time.monotonic() - t0

    assert _leftovers(root) == []
    shard_dir = root / "shards" / REGION
    doc = json.loads((shard_dir / "shards.json").read_text())
    listed = [s["path"] for s in doc["shards"]]
    assert listed and all((shard_dir / p).is_file() for p in listed)
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == sorted(listed)  # no stray shard of the other run
    for s in doc["shards"]:
        assert hashlib.sha256((shard_dir / s["path"]).read_bytes()).hexdigest() == s["sha256"]
    manifest = pd.read_parquet(shard_dir / "manifest.parquet", columns=["key", "shard"])
    assert len(manifest) == doc["n_samples"] == sum(s["n_samples"] for s in doc["shards"]) > 0
    assert manifest["key"].is_unique
    assert _outputs(root) == clean  # byte-identical to the clean single run, file for file
    waited = sum("for region sample-lund's lock" in log.read_text() for log in logs)
    print(f"single run {single_s:.0f}s, two concurrent runs {both_s:.0f}s, runs that waited for the lock: {waited}")
