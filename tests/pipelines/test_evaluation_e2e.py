"""The evaluation half end to end: train a few steps on one sample region, evaluate, report, ablate (no network)."""

import json
import os
from pathlib import Path

import dagster as dg
import geopandas as gpd
import pandas as pd
import pytest

from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    """One sample region built and a tiny model trained for a few steps, in a data root of this module."""
    root = tmp_path_factory.mktemp("gair_eval")
    old = os.environ.get("GAIR_DATA_ROOT")
    os.environ["GAIR_DATA_ROOT"] = str(root)
    from pipelines.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_job_def("build_dataset").execute_in_process(partition_key="sample-pontoise",
                                                                    instance=instance).success
    cfg = {"ops": {"gair_model_checkpoint": {"config": {"steps": 6, "batch_size": 8, "warmup_steps": 1,
                                                        "val_every": 3, "val_batches": 2, "max_minutes": 5.0}}}}
    assert defs.resolve_job_def("train_model").execute_in_process(instance=instance, run_config=cfg).success
    yield root, instance
    if old is None:
        os.environ.pop("GAIR_DATA_ROOT", None)
    else:
        os.environ["GAIR_DATA_ROOT"] = old


def _registry(tmp_path: Path) -> Path:
    """The bundled tasks, subsampled to keep the test short, plus one whose data is absent."""
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "config" / "eval_tasks.yaml").read_text())
    for task in doc["tasks"]:
        task["max_samples"] = 120
    doc["tasks"].append({"name": "not_here", "kind": "location", "encoder": "location", "type": "regression",
                         "path": "location/absent.csv", "columns": {"lon": "lon", "lat": "lat", "target": "y"}})
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _resources(tmp_path: Path) -> dict:
    return {"eval_tasks": {"config": {"tasks_file": str(_registry(tmp_path)), "data_dir": str(SHARED_DATA / "eval")}}}


def test_evaluate_job_reports_every_task_with_baselines(trained_root, tmp_path):
    from pipelines.definitions import defs

    root, instance = trained_root
    result = defs.resolve_job_def("evaluate_model").execute_in_process(
        instance=instance, run_config={"resources": _resources(tmp_path)})
    assert result.success
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert set(meta) == {"eval_alignment", "eval_location", "eval_streetview", "eval_remote_sensing",
                         "gair_embeddings", "evaluation_report"}
    align = meta["eval_alignment"]
    assert align["num_samples"].value > 0 and align["rs_stats_source"].value == "checkpoint header"
    assert align["localisation_median_error_m_tile_centre"].value > 0
    for key in ("offset_rings_plot", "examples_plot"):
        assert "data:image/png;base64" in align[key].value

    report = json.loads((root / "reports" / "evaluation.json").read_text())
    assert report["checkpoint"].endswith(".safetensors") and report["synthetic_data"] is True
    assert report["training"]["final_val_loss"] is not None
    assert {s["task"] for s in report["skipped"]} >= {"not_here"}
    assert "absent.csv" in next(s["reason"] for s in report["skipped"] if s["task"] == "not_here")
    results = report["results"]
    loc = next(r for r in results if r["task"] == "alignment/in_tile_localisation" and r["metric"] == "median_m")
    assert loc["value"] > 0 and set(loc["baselines"]) == {"random_init", "tile_centre"}
    if (SHARED_DATA / "eval").is_dir():
        by_task = {(r["task"], r["probe"], r["metric"]): r for r in results}
        temp = by_task[("air_temperature", "ridge", "r2")]
        assert set(temp["baselines"]) == {"random_init", "raw_lonlat_rad", "geoclip_pretrained"}
        assert temp["n_train"] + temp["n_test"] == 120 and temp["value"] is not None
        for task, metric in (("place_pulse_city", "accuracy"), ("place_pulse_safety", "r2"),
                             ("rsscn7", "accuracy"), ("california_housing", "mae")):
            r = by_task[(task, "ridge", metric)]
            assert r["value"] is not None and r["baselines"]["random_init"] is not None, task
    md = (root / "reports" / "evaluation.md").read_text()
    assert "## Headline" in md and "random_init" in md and "not_here" in md
    for png in ("evaluation_probe_scores.png", "evaluation_offset_rings.png", "evaluation_examples.png"):
        assert (root / "reports" / png).read_bytes()[:4] == b"\x89PNG", png

    # Embeddings: one GeoParquet per shard set, a row per sample, readable by geopandas and DuckDB.
    manifest = pd.read_parquet(root / "shards" / "sample-pontoise" / "manifest.parquet")
    emb_path = root / "embeddings" / "sample-pontoise.parquet"
    gdf = gpd.read_parquet(emb_path)
    assert len(gdf) == len(manifest) and gdf.crs.to_epsg() == 4326
    from gair_dataset.pairing import connect

    con = connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{emb_path}') WHERE ST_X(geometry) = lon").fetchone()[0]
    assert n == len(manifest)


def test_one_family_reruns_alone_and_a_bad_registry_fails_clearly(trained_root, tmp_path):
    from pipelines.common.storage import DataRoot
    from pipelines.defs.evaluation.assets import eval_location, eval_remote_sensing, eval_streetview
    from pipelines.defs.evaluation.resources import EvalTasks

    root, instance = trained_root
    resources = {"data_root": DataRoot(),
                 "eval_tasks": EvalTasks(tasks_file=str(_registry(tmp_path)), data_dir=str(SHARED_DATA / "eval"))}
    assert dg.materialize([eval_streetview], instance=instance, resources=resources).success
    before = (root / "evaluation" / "downstream_streetview.json").stat().st_mtime_ns
    ok = dg.materialize([eval_remote_sensing], instance=instance, resources=resources)
    assert ok.success
    assert (root / "evaluation" / "downstream_streetview.json").stat().st_mtime_ns == before

    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - name: broken\n    kind: location\n    encoder: sv\n    type: regression\n"
                   "    path: x.csv\n    columns: {lon: a, lat: b, target: c}\n")
    failed = dg.materialize([eval_location], instance=instance, raise_on_error=False,
                            resources={"data_root": DataRoot(), "eval_tasks": EvalTasks(tasks_file=str(bad))})
    assert not failed.success
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert "broken" in str(failure.event_specific_data.error)


def test_localizer_ablation_job_reports_equal_budget_runs(trained_root, tmp_path):
    from pipelines.definitions import defs

    root, instance = trained_root
    cfg = {"ops": {"localizer_ablation": {"config": {"localizers": ["nili", "mean", "centre", "bilinear"],
                                                     "steps": 3, "batch_size": 8, "grid": 12}}}}
    result = defs.resolve_job_def("ablate_localizers").execute_in_process(instance=instance, run_config=cfg)
    assert result.success
    ablation = json.loads((root / "evaluation" / "ablation.json").read_text())
    assert ablation["budget"]["steps"] == 3 and ablation["budget"]["samples_seen"] == 24
    runs = ablation["runs"]
    assert list(runs) == ["nili", "mean", "centre", "bilinear"]
    assert all(r["steps"] == 3 and r["status"] == "completed" for r in runs.values())
    assert all(r["final_val_loss"] is not None for r in runs.values())  # one validation, at the end
    for name, run in runs.items():
        model = run["benchmark"]["localisation"]["model"]
        assert model["median_m"] > 0, name
        assert run["benchmark"]["localizer"] == name
    # mean-pool and centre ignore the position: every query gives the same embedding, answered as the centre.
    for name in ("mean", "centre"):
        loc = runs[name]["benchmark"]["localisation"]
        assert loc["model"]["median_m"] == pytest.approx(loc["centre_baseline"]["median_m"])
    md = (root / "reports" / "ablation.md").read_text()
    assert all(f"| {name} |" in md for name in runs) and "samples_seen = 24" in md
    assert (root / "reports" / "ablation_offset_rings.png").is_file()
    assert "| nili |" in (root / "reports" / "evaluation.md").read_text()  # the report picked the ablation up
