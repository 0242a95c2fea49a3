"""Incremental refresh vs a full build of the same region (bench/results/refresh.json).

Builds ``sample-lund`` from an empty data root (the synthetic sample generated beforehand, not timed), then runs
the same ``build_dataset`` job again with nothing new, and evaluates the catalog sensor, which launches nothing for
an unchanged catalog (the unattended path). Three figures, each a median over ``--repeats`` rounds:

* ``full_build_s``: the job from an empty data root (every stage rebuilt);
* ``refresh_run_s``: the job again with nothing new (every stage skips; Dagster still starts the run and its
  eleven steps, and the sources search the catalog and read the points again);
* ``refresh_work_s``: the region stages' own time in that refresh (the asset and check steps, as Dagster times
  them), i.e. without the fixed cost of starting a run;
* ``sensor_tick_s``: one evaluation of ``new_catalog_items_sensor`` for every region;
* ``points_changed_s``: the job after one street-view point was removed from the region's points file: the
  points, pairs and shards are rebuilt, every chip comes from the chip cache (no tile changed).

Ratios are against ``full_build_s``; the goal is < 5% for a refresh that finds nothing new.

    python bench/refresh_bench.py [--repeats 3] [--region sample-lund]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import write_result  # noqa: E402

GOAL = 0.05


def _step_seconds(instance, run_id: str) -> dict[str, float]:
    """Each step's duration (STEP_START -> STEP_SUCCESS) in a run, from the instance's event log."""
    starts, total = {}, {}
    for entry in instance.all_logs(run_id):
        e = entry.dagster_event
        if e is None:
            continue
        if e.event_type_value == "STEP_START":
            starts[e.step_key] = entry.timestamp
        elif e.event_type_value == "STEP_SUCCESS" and e.step_key in starts:
            total[e.step_key] = entry.timestamp - starts.pop(e.step_key)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--region", default="sample-lund")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="refresh_bench_"))
    os.environ["GAIR_DATA_ROOT"] = str(work / "gair_data")
    os.environ.pop("DAGSTER_HOME", None)
    import dagster as dg
    import pandas as pd

    from gair_dataset.sample_region import ensure_sample
    from pipelines.definitions import defs
    from pipelines.defs.resources import resources

    ensure_sample(work / "gair_data" / "sample")
    job = defs.resolve_job_def("build_dataset")
    sensor = defs.resolve_sensor_def("new_catalog_items_sensor")
    stages = ("stac", "tiles", "streetview", "pairs", "shards", ".checks", "cache")
    full, refresh, refresh_work, full_work, ticks, changed = [], [], [], [], [], []
    chip_reads: list[int] = []
    points_path = work / "gair_data" / "sample" / "streetview" / args.region / "points.parquet"
    points_bytes = points_path.read_bytes()
    full_steps: list[dict[str, float]] = []
    refresh_steps: list[dict[str, float]] = []
    try:
        for r in range(args.repeats):
            for stage in stages:  # an empty data root but the sample: a full build
                shutil.rmtree(work / "gair_data" / stage, ignore_errors=True)
            instance = dg.DagsterInstance.ephemeral()
            t = time.perf_counter()
            res = job.execute_in_process(partition_key=args.region, instance=instance)
            full.append(time.perf_counter() - t)
            full_steps.append(_step_seconds(instance, res.run_id))
            full_work.append(sum(full_steps[-1].values()))
            t = time.perf_counter()
            res = job.execute_in_process(partition_key=args.region, instance=instance)
            refresh.append(time.perf_counter() - t)
            refresh_steps.append(_step_seconds(instance, res.run_id))
            refresh_work.append(sum(refresh_steps[-1].values()))
            rebuilt = [m.step_materialization_data.materialization.metadata["rebuilt"].value
                       for m in res.get_asset_materialization_events()]
            assert res.success and not any(rebuilt), rebuilt
            with dg.build_sensor_context(resources=resources().resources) as ctx:
                t = time.perf_counter()
                tick = sensor(ctx)
                ticks.append(time.perf_counter() - t)
            assert args.region not in {q.partition_key for q in tick.run_requests or []}
            points = pd.read_parquet(points_path)
            points.iloc[1:].to_parquet(points_path, index=False)  # one point less
            try:
                t = time.perf_counter()
                res = job.execute_in_process(partition_key=args.region, instance=instance)
                changed.append(time.perf_counter() - t)
            finally:
                points_path.write_bytes(points_bytes)
            shards_md = {m.step_materialization_data.materialization.asset_key.path[-1]:
                         m.step_materialization_data.materialization.metadata
                         for m in res.get_asset_materialization_events()}["shards"]
            assert res.success and shards_md["rebuilt"].value, shards_md
            chip_reads.append(int(shards_md["chip_reads"].value))
            print(f"round {r}: full {full[-1]:.1f}s, refresh {refresh[-1]:.2f}s (steps {refresh_work[-1]:.2f}s), "
                  f"sensor {ticks[-1]:.2f}s, one point removed {changed[-1]:.2f}s ({chip_reads[-1]} chip reads)",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in
           {"full_build_s": full, "full_build_work_s": full_work, "refresh_run_s": refresh,
            "refresh_work_s": refresh_work, "sensor_tick_s": ticks, "points_changed_s": changed}.items()}
    ratios = {"refresh_run": med["refresh_run_s"] / med["full_build_s"],
              "refresh_work": med["refresh_work_s"] / med["full_build_work_s"],
              "sensor_tick": med["sensor_tick_s"] / med["full_build_s"]}
    changed_ratio = med["points_changed_s"] / med["full_build_s"]
    out = write_result("refresh", {
        "region": args.region, "repeats": args.repeats, "medians": med,
        "ratios_vs_full_build": ratios, "goal": GOAL,
        "step_seconds": {k: {"full": round(statistics.median(d[k] for d in full_steps), 3),
                             "refresh": round(statistics.median(d[k] for d in refresh_steps), 3)}
                         for k in sorted(full_steps[0])},
        "meets_goal": {k: v < GOAL for k, v in ratios.items()},
        "points_changed": {"ratio_vs_full_build": changed_ratio, "chip_reads": chip_reads,
                           "note": "one street-view point removed: points, pairs and shards rebuilt, the chips from "
                                   "the chip cache (no goal: it rewrites the whole shard set)"},
        "note": "refresh_run: the build_dataset job rerun with nothing new (in-process executor; it includes "
                "Dagster's fixed cost of a run with eleven steps); refresh_work: the steps' own time; sensor_tick: "
                "the catalog sensor, which launches nothing when no catalog changed (the unattended path).",
    })
    print(f"full {med['full_build_s']:.1f}s | refresh run {med['refresh_run_s']:.2f}s "
          f"({100 * ratios['refresh_run']:.1f}%), its steps {med['refresh_work_s']:.2f}s "
          f"({100 * ratios['refresh_work']:.1f}% of the full build's steps) | sensor tick "
          f"{med['sensor_tick_s']:.2f}s ({100 * ratios['sensor_tick']:.1f}%) | one point removed "
          f"{med['points_changed_s']:.2f}s ({100 * changed_ratio:.0f}%, chip reads {chip_reads}) -> {out}")


if __name__ == "__main__":
    main()
