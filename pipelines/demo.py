"""`make demo`: run the main job for every region partition on the embedded default, then the summary.

Runs are recorded in a SQLite Dagster instance under ``$DAGSTER_HOME`` (default ``<data root>/dagster_home``),
so they show up in ``make dev`` afterwards. Exit status 1 when a run or a blocking check fails.
"""

import json
import os
import sys
import time
from pathlib import Path

DAGSTER_YAML = """# SQLite storage (the default) under this folder; written by pipelines/demo.py.
storage:
  sqlite:
    base_dir: {base}
telemetry:
  enabled: false
"""


def prepare_dagster_home(root: Path) -> Path:
    """Use ``$DAGSTER_HOME`` or create ``<root>/dagster_home`` with SQLite storage."""
    home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML.format(base=home / "storage"))
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the process exit status."""
    from pipelines.config import data_root

    home = prepare_dagster_home(data_root())
    import dagster as dg

    from pipelines.definitions import defs
    from pipelines.partitions import REGIONS

    regions = argv or sorted(REGIONS)
    instance = dg.DagsterInstance.get()
    job = defs.resolve_job_def("build_dataset")
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    t0 = time.perf_counter()
    ok = True
    for region in regions:
        print(f"== build_dataset [{region}]", flush=True)
        t = time.perf_counter()
        result = job.execute_in_process(partition_key=region, instance=instance, raise_on_error=False,
                                        run_config=quiet)
        print(f"   {'ok' if result.success else 'FAILED'} in {time.perf_counter() - t:.1f}s (run {result.run_id})")
        ok &= result.success
    if ok:
        print("== train_model (tiny CPU configuration)", flush=True)
        t = time.perf_counter()
        train = defs.resolve_job_def("train_model").execute_in_process(instance=instance, raise_on_error=False,
                                                                       run_config=quiet)
        print(f"   {'ok' if train.success else 'FAILED'} in {time.perf_counter() - t:.1f}s (run {train.run_id})")
        ok &= train.success
    else:
        summary_result = defs.resolve_job_def("run_summary_job").execute_in_process(
            instance=instance, raise_on_error=False, run_config=quiet)
        ok &= summary_result.success
    summary_path = data_root() / "reports" / "run_summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        print(f"\n== summary ({'SYNTHETIC sample data' if summary['synthetic_data'] else 'data'}), "
              f"{time.perf_counter() - t0:.0f}s, Dagster home {home}")
        for name, reg in summary["regions"].items():
            pairs = reg.get("pairs", {})
            spread = pairs.get("offset_spread", {})
            print(f"  {name}: items={reg.get('stac', {}).get('items')} tiles={reg.get('tiles', {}).get('tiles')} "
                  f"points={reg.get('streetview', {}).get('points')} "
                  f"(rejected {reg.get('streetview', {}).get('rejected')}) pairs={pairs.get('paired')} "
                  f"outside={pairs.get('outside_every_tile')} splits={pairs.get('splits')}")
            if spread:
                print(f"    offsets: x_std={spread.get('x_std')} y_std={spread.get('y_std')} "
                      f"cells={spread.get('occupied_cells')} near_centre={spread.get('share_near_centre')}")
            if "shards" in reg:
                sh = reg["shards"]
                print(f"    shards: {sh.get('shards')} shards, {sh.get('samples')} samples, "
                      f"rejected {sh.get('rejected')}")
        if "training" in summary:
            tr = summary["training"]
            print(f"  training: steps={tr.get('steps')} final_loss={tr.get('final_loss')} "
                  f"checkpoint={tr.get('checkpoint')}")
        print(f"  written: {summary_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
