"""The Dagster code location end to end on the embedded synthetic sample (no network)."""

import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import geopandas as gpd
import pandas as pd
import pytest

from tests.run_helpers import data_root_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    with data_root_env(tmp_path_factory.mktemp("gair_data")) as root:
        yield root


@pytest.fixture(scope="module")
def built(data_root):
    """The sample region built once in the module's data root, for every test that needs its outputs."""
    from pipelines.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def("build_dataset").execute_in_process(partition_key="sample-pontoise",
                                                                      instance=instance)
    assert result.success
    shard_dir = data_root / "shards" / "sample-pontoise"
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shard_dir.glob("*.tar"))}
    return {"result": result, "instance": instance, "shard_hashes": hashes}


def test_definitions_load():
    from pipelines.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"stac_items", "tile_grid", "sv_points", "pairs", "run_summary", "eval_alignment", "eval_location",
            "eval_streetview", "eval_remote_sensing", "gair_embeddings", "evaluation_report",
            "localizer_ablation"} <= keys
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"build_dataset", "train_model", "evaluate_model",
                                                              "ablate_localizers"}
    job = defs.resolve_job_def("build_dataset")
    assert set(job.partitions_def.get_partition_keys()) == {"sample-lund", "sample-pontoise"}
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"items_found", "pairs_inside_tile_bbox", "no_point_in_two_tiles", "offsets_in_range_and_spread",
            "manifest_matches_samples", "shards_readable_and_complete"} <= checks


def test_refresh_schedule_has_deterministic_run_keys():
    from pipelines.defs.jobs import dataset_refresh_schedule

    when = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    ctx = dg.build_schedule_context(scheduled_execution_time=when)
    first = list(dataset_refresh_schedule(ctx))
    second = list(dataset_refresh_schedule(dg.build_schedule_context(scheduled_execution_time=when)))
    assert [r.run_key for r in first] == [r.run_key for r in second] == [
        "refresh-sample-lund-2026-11-30", "refresh-sample-pontoise-2026-11-30"]
    assert [r.partition_key for r in first] == ["sample-lund", "sample-pontoise"]


@pytest.mark.slow
def test_build_dataset_on_the_sample_region(data_root, built):
    from pipelines.common.storage import DataRoot
    from pipelines.definitions import defs
    from pipelines.defs.reports.assets import build_summary

    result, instance = built["result"], built["instance"]
    evals = result.get_asset_check_evaluations()
    assert {e.check_name for e in evals} >= {"items_found", "pairs_inside_tile_bbox", "no_point_in_two_tiles",
                                            "offsets_in_range_and_spread", "manifest_matches_samples",
                                            "shards_readable_and_complete"}
    assert all(e.passed for e in evals)
    shard_dir = data_root / "shards" / "sample-pontoise"
    first_hashes = built["shard_hashes"]
    assert first_hashes
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shard_dir.glob("*.tar"))} == first_hashes
    assert not list(shard_dir.glob(".staging*"))  # nothing left half-written

    pairs = gpd.read_parquet(data_root / "pairs" / "sample-pontoise" / "pairs.parquet")
    assert len(pairs) > 1000 and pairs.sv_id.is_unique
    assert pairs.x.between(0, 1, inclusive="left").all() and pairs.y.between(0, 1, inclusive="left").all()
    assert set(pairs.split) <= {"train", "val", "test"} and set(pairs.region) == {"sample-pontoise"}
    # Spatial split: a tile has one split.
    assert (pairs.groupby("tile_id").split.nunique() == 1).all()
    items_json = (data_root / "stac" / "sample-pontoise" / "items.json").read_text()
    assert '"gair:synthetic": true' in items_json and "sig=" not in items_json

    mats = result.get_asset_materialization_events()
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in mats}
    assert meta["stac_items"]["num_items"].value == 3
    assert meta["pairs"]["num_outside_every_tile"].value == 10
    assert meta["sv_points"]["num_rejected"].value == 3
    assert "data:image/png;base64" in meta["pairs"]["offsets"].value

    manifest = pd.read_parquet(shard_dir / "manifest.parquet")
    assert len(manifest) == meta["shards"]["num_samples"].value == len(pairs)  # the sample has no bad image
    assert "data:image/png;base64" in meta["shards"]["preview"].value

    # Re-materializing the partition gives byte-identical shards.
    again = defs.resolve_job_def("build_dataset").execute_in_process(partition_key="sample-pontoise",
                                                                     instance=instance)
    assert again.success
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shard_dir.glob("*.tar"))} == first_hashes

    summary = build_summary(DataRoot())
    reg = summary["regions"]["sample-pontoise"]
    assert summary["synthetic_data"] is True
    assert reg["pairs"]["paired"] == len(pairs)
    assert reg["shards"]["samples"] == len(pairs) and reg["shards"]["shards"] == len(first_hashes)
    assert reg["streetview"]["rejected_by_reason"] == {"non-finite coordinate": 1,
                                                       "latitude out of range [-90, 90]": 1, "duplicate id": 1}


@pytest.mark.slow
def test_empty_search_fails_with_a_clear_error(data_root, tmp_path):
    regions = tmp_path / "regions.yaml"
    regions.write_text(
        "regions:\n  nowhere:\n    bbox: [20.0, -10.0, 20.1, -9.9]\n"
        "    streetview: {kind: table, path: 'sample://streetview/sample-lund/points.parquet'}\n")
    env = {**os.environ, "GAIR_REGIONS": str(regions), "GAIR_DATA_ROOT": str(data_root),
           "DAGSTER_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "pipelines.demo"], check=False, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert "no usable item for region nowhere" in proc.stdout + proc.stderr


def test_bad_region_config_is_rejected(tmp_path):
    from pipelines.config import load_regions

    bad = tmp_path / "r.yaml"
    bad.write_text("regions:\n  x:\n    bbox: [10, 50, 9, 51]\n    streetview: {kind: table, path: p.csv}\n")
    with pytest.raises(ValueError, match="west < east"):
        load_regions(bad)
    bad.write_text("regions:\n  'a.b':\n    bbox: [9, 50, 10, 51]\n    streetview: {kind: table, path: p.csv}\n")
    with pytest.raises(ValueError, match="letters, digits"):
        load_regions(bad)
    bad.write_text("regions:\n  x:\n    bbox: [9, 50, 10, 51]\n    streetview: {kind: ftp, path: p}\n")
    with pytest.raises(ValueError, match=r"streetview\.kind"):
        load_regions(bad)


@pytest.mark.slow
def test_dg_check_defs():
    dg_exe = Path(sys.executable).parent / "dg"
    proc = subprocess.run([str(dg_exe), "check", "defs"], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_training_asset_through_pipes(data_root, built):
    """Trains on the shards of the module's sample build (whatever the order the tests run in)."""
    from pipelines.definitions import defs

    assert (data_root / "shards" / "sample-pontoise" / "shards.json").exists()
    cfg = {"ops": {"gair_model_checkpoint": {"config": {"steps": 3, "batch_size": 8, "warmup_steps": 1,
                                                        "max_minutes": 5.0}}}}
    result = defs.resolve_job_def("train_model").execute_in_process(instance=dg.DagsterInstance.ephemeral(),
                                                                    run_config=cfg)
    assert result.success
    mats = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    meta = mats["gair_model_checkpoint"]
    assert meta["steps"].value == 3
    assert meta["final_loss"].value > 0
    assert Path(meta["checkpoint"].value).suffix == ".safetensors" and Path(meta["checkpoint"].value).exists()
    assert "data:image/png;base64" in meta["loss_curve"].value
    summary = json.loads((data_root / "reports" / "run_summary.json").read_text())
    assert summary["training"]["steps"] == 3 and summary["training"]["checkpoint"] == meta["checkpoint"].value
    stats = json.loads((data_root / "training" / "rs_stats.json").read_text())
    assert len(stats["mean"]) == len(stats["std"]) == 10 and all(v > 0 for v in stats["std"])


@pytest.mark.slow
def test_region_polygon_through_dg_launch(data_root, tmp_path):
    """A region declared by a GeoJSON polygon: searched with intersects, tiles clipped to it (dg launch)."""
    from shapely.geometry import Polygon, box

    w, s, e, n = 13.141039, 55.672384, 13.238947, 55.727676  # sample-lund's bbox
    mx, my = (w + e) / 2, (s + n) / 2
    l_shape = Polygon([(w, s), (e, s), (e, my), (mx, my), (mx, n), (w, n)])  # without the NE quarter
    (tmp_path / "lund-l.geojson").write_text(json.dumps({"type": "Feature", "properties": {},
                                                         "geometry": l_shape.__geo_interface__}))
    regions = tmp_path / "regions.yaml"
    regions.write_text("regions:\n  lund-l:\n    geometry: lund-l.geojson\n"
                       "    streetview: {kind: table, path: 'sample://streetview/sample-lund/points.parquet'}\n")
    env = {**os.environ, "GAIR_REGIONS": str(regions), "GAIR_DATA_ROOT": str(data_root),
           "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    proc = subprocess.run([str(Path(sys.executable).parent / "dg"), "launch", "--assets", "stac_items,tile_grid",
                           "--partition", "lund-l"], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tiles = gpd.read_parquet(data_root / "tiles" / "lund-l" / "tiles.parquet")
    assert len(tiles) > 0 and tiles.geometry.intersects(l_shape).all()
    # The same region as a bbox has more tiles: those wholly inside the notch.
    from gair_dataset.stac_catalog import items_to_geodataframe, read_items
    from gair_dataset.tile_grid import GridConfig, SplitConfig, build_tiles

    items = items_to_geodataframe(read_items(data_root / "stac" / "lund-l"))
    by_bbox = build_tiles(items, (w, s, e, n), GridConfig(kind="xyz", zoom=14, tile_px=96), SplitConfig(block_tiles=1))
    dropped = by_bbox[~by_bbox.tile_id.isin(tiles.tile_id)]
    assert set(tiles.tile_id) < set(by_bbox.tile_id) and dropped.geometry.within(box(mx, my, e + 1, n + 1)).all()
