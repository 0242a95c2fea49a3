"""Incremental refresh: a rerun with nothing new rebuilds nothing and leaves every file untouched; a changed input
rebuilds only the stages it reaches; the catalog sensor launches a region only when its items changed."""

import hashlib
import json
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from tests.run_helpers import data_root_env

REGION = "sample-lund"
STAGES = ("stac", "tiles", "streetview", "pairs", "shards")
ASSET_STAGE = {"stac_items": "stac", "tile_grid": "tiles", "sv_points": "streetview", "pairs": "pairs",
               "shards": "shards"}


def _files(root: Path) -> dict[str, tuple[str, int]]:
    """Every file of the region's stages -> (sha256, mtime_ns)."""
    out = {}
    for stage in STAGES:
        for p in sorted((root / stage / REGION).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _run(instance: dg.DagsterInstance) -> dict[str, dict]:
    """Build the region; {asset name: its materialization metadata (plain values)}."""
    from pipelines.definitions import defs

    result = defs.resolve_job_def("build_dataset").execute_in_process(partition_key=REGION, instance=instance)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks and all(checks.values()), checks
    out = {}
    for m in result.get_asset_materialization_events():
        mat = m.step_materialization_data.materialization
        out[mat.asset_key.path[-1]] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return out


def _sensor_requests(root: Path) -> list[dg.RunRequest]:
    from pipelines.definitions import defs
    from pipelines.defs.resources import resources

    sensor = defs.resolve_sensor_def("new_catalog_items_sensor")
    with dg.build_sensor_context(resources=resources().resources) as ctx:
        result = sensor(ctx)
    return list(result.run_requests or [])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    with data_root_env(tmp_path_factory.mktemp("gair_data")) as root:
        yield root


@pytest.mark.slow
def test_refresh_with_nothing_new_rebuilds_nothing_and_a_change_rebuilds_what_it_reaches(root: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    first = _run(instance)
    assert all(first[a]["rebuilt"] is True for a in ASSET_STAGE), first
    before = _files(root)
    assert any(k.endswith(".tar") for k in before)
    versions = {s: json.loads((root / s / REGION / "stats.json").read_text())["data_version"] for s in STAGES}

    # 1. Nothing new: every stage skips, every file keeps its bytes and its modification time.
    again = _run(instance)
    assert {a: again[a]["rebuilt"] for a in ASSET_STAGE} == dict.fromkeys(ASSET_STAGE, False)
    assert {a: again[a]["data_version"] for a in ASSET_STAGE} == {a: versions[s] for a, s in ASSET_STAGE.items()}
    assert _files(root) == before
    # Dagster records the same data version for each asset as on the first run.
    for asset, stage in ASSET_STAGE.items():
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.asset_materialization is not None
        assert event.asset_materialization.tags["dagster/data_version"] == versions[stage]

    # 2. The sensor sees the built region's catalog unchanged: no request for it.
    assert REGION not in {r.partition_key for r in _sensor_requests(root)}

    # 3. A catalog item changed (its metadata, not its footprint or pixels): the sensor asks for this region; the
    #    rebuild rewrites the items, recomputes the tiles (the same: the file is left as it is), skips the points
    #    and the pairs, rebuilds the shards.
    item_json = sorted((root / "sample" / "catalog" / "sentinel-2-l2a").glob("*T33UUB*/*.json"))[0]
    item = json.loads(item_json.read_text())
    item["properties"]["updated"] = "2026-12-01T00:00:00Z"
    item_json.write_text(json.dumps(item))
    requests = [r for r in _sensor_requests(root) if r.partition_key == REGION]
    assert len(requests) == 1 and requests[0].run_key.startswith(f"catalog-{REGION}-")
    third = _run(instance)
    assert {a: third[a]["rebuilt"] for a in ASSET_STAGE} == {
        "stac_items": True, "tile_grid": True, "sv_points": False, "pairs": False, "shards": True}
    after = _files(root)
    tiles = f"tiles/{REGION}/tiles.parquet"
    for name in (tiles, f"pairs/{REGION}/pairs.parquet", f"streetview/{REGION}/points.parquet"):
        assert after[name] == before[name]  # not even rewritten
    assert after[f"stac/{REGION}/items.json"][0] != before[f"stac/{REGION}/items.json"][0]
    # ... reading again the chips of the tiles that use the changed item: every tile of this small region (that
    # only the changed tiles are read is tests/dataset/test_chip_cache.py's)
    assert first["shards"]["cached_tiles"] == third["shards"]["cached_tiles"] == 0
    assert third["shards"]["chip_reads"] == first["shards"]["chip_reads"] > 0
    assert not [r for r in _sensor_requests(root) if r.partition_key == REGION]  # built: nothing to do again

    # 4. A street-view point removed: the points, pairs and shards rebuild; the items and the tiles stay untouched.
    before = _files(root)
    points_path = root / "sample" / "streetview" / REGION / "points.parquet"
    points = pd.read_parquet(points_path)
    points[points["sv_id"] != "lund-00001"].to_parquet(points_path, index=False)  # one valid point less
    fourth = _run(instance)
    assert {a: fourth[a]["rebuilt"] for a in ASSET_STAGE} == {
        "stac_items": False, "tile_grid": False, "sv_points": True, "pairs": True, "shards": True}
    after = _files(root)
    for name in (f"stac/{REGION}/items.json", tiles):
        assert after[name] == before[name]
    assert fourth["sv_points"]["num_points"] == first["sv_points"]["num_points"] - 1
    assert fourth["shards"]["chip_reads"] == 0 and fourth["shards"]["cached_tiles"] > 0  # no tile changed
