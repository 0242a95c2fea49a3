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


def print_evaluation(path: Path) -> None:
    """Headline figures of the evaluation report (model vs its best baseline), if the report exists."""
    if not path.exists():
        return
    doc = json.loads(path.read_text())
    print(f"\n== evaluation ({len(doc['results'])} results, {len(doc['skipped'])} tasks skipped): "
          "model vs its best baseline")
    for h in doc.get("headline", []):
        value = "n/a" if h["value"] is None else f"{h['value']:.3f}"
        base = "n/a" if h["best_baseline_value"] is None else f"{h['best_baseline_value']:.3f}"
        verdict = {True: "better", False: "not better", None: "?"}[h["model_better"]]
        print(f"  {h['task']:<34} {h['metric']:<15} model {value:>9}  {h['best_baseline']} {base:>9}  {verdict}")
    for s in doc.get("skipped", []):
        print(f"  skipped {s['task']}: {s['reason']}")
    print(f"  written: {path.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the process exit status."""
    from pipelines.config import data_root

    home = prepare_dagster_home(data_root())
    import dagster as dg

    from pipelines.definitions import defs
    from pipelines.partitions import REGIONS

    regions = argv or sorted(REGIONS)
    instance = dg.DagsterInstance.get()
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

    def run(job: str, title: str, partition: str | None = None) -> bool:
        print(f"== {title}", flush=True)
        t = time.perf_counter()
        result = defs.resolve_job_def(job).execute_in_process(partition_key=partition, instance=instance,
                                                              raise_on_error=False, run_config=quiet)
        print(f"   {'ok' if result.success else 'FAILED'} in {time.perf_counter() - t:.1f}s (run {result.run_id})")
        return result.success

    t0 = time.perf_counter()
    ok = all([run("build_dataset", f"build_dataset [{region}]", region) for region in regions])
    if ok:
        ok = run("train_model", "train_model (tiny CPU configuration)") and run(
            "evaluate_model", "evaluate_model (geo-alignment, downstream probes, embeddings, report)")
    else:  # still write the summary of what did run; the exit status stays 1
        run("run_summary_job", "run_summary_job")
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
                  f"final_val_loss={tr.get('final_val_loss')} "
                  f"checkpoint={tr.get('checkpoint')}")
        print(f"  written: {summary_path}")
    print_evaluation(data_root() / "reports" / "evaluation.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
