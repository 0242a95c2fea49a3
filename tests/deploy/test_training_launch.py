"""What the training asset sends to and takes from its Pipes process, whichever launcher runs it."""

from pathlib import Path

import dagster as dg
import pytest

from pipelines.defs.training.assets import SUMMARY_FIELDS, TrainingConfig, summary_report, training_extras
from pipelines.defs.training.launchers import run_training


def test_extras_ask_the_process_for_band_statistics(tmp_path):
    shards, out, stats = [str(tmp_path / "shards" / "r")], tmp_path / "run", tmp_path / "rs_stats.json"
    extras = training_extras(TrainingConfig(steps=3, rs_stats_samples=50), shards, out, stats)
    assert (extras["rs_stats_samples"], extras["rs_stats_path"], extras["shards"]) == (50, str(stats), shards)
    assert extras["out_dir"] == str(out) and extras["nproc_per_node"] == 1
    args = extras["trainer_args"]
    assert args[args.index("--shards") + 1] == shards[0] and "--rs-stats" not in args
    # A statistics file named in the config wins: the process computes none.
    given = training_extras(TrainingConfig(rs_stats=str(tmp_path / "mine.json")), shards, out, stats)
    assert given["rs_stats_samples"] == 0
    assert given["trainer_args"][given["trainer_args"].index("--rs-stats") + 1] == str(tmp_path / "mine.json")


def test_summary_report_comes_from_the_reported_metadata():
    summary = {"status": "done", "steps": 3, "final_loss": 1.5, "checkpoint": "/d/ckpt.safetensors",
               "world_size": 8, "extra_field": "not kept"}
    report = summary_report({"summary": dg.MetadataValue.json(summary), "steps": dg.MetadataValue.int(3)})
    assert list(report) == list(SUMMARY_FIELDS)
    assert (report["status"], report["steps"], report["world_size"], report["best_val_loss"]) == ("done", 3, 8, None)
    assert "extra_field" not in report
    with pytest.raises(dg.Failure, match="no `summary`"):
        summary_report({"steps": dg.MetadataValue.int(3)})


def test_an_unknown_pipes_client_is_refused(tmp_path):
    class OtherClient(dg.PipesClient):
        def run(self, *, context, extras=None, **kwargs):  # type: ignore[override]
            raise AssertionError("not called")

    context = dg.build_asset_context()
    with pytest.raises(TypeError, match="OtherClient is not supported"):
        run_training(OtherClient(), context, {"out_dir": str(Path(tmp_path))})
