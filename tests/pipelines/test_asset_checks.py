"""Every asset check fails on a bad output, and a failed blocking check stops what is downstream.

The sample region is materialized once into a module data root; each test corrupts one output (only columns that
every pairs schema keeps: sv_id, lon, lat, tile_id, x, y, col, row, split, geometry), runs the check alone through
Dagster, and puts the files back. The two blocking tests re-materialize an asset from a corrupted input in one run
with its downstream asset and show that the downstream asset is not materialized.
"""

import json
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import geopandas as gpd
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

PARTITION = "sample-pontoise"
CHECKS = {
    "items_found": "stac_items",
    "pairs_inside_tile_bbox": "pairs",
    "no_point_in_two_tiles": "pairs",
    "offsets_in_range_and_spread": "pairs",
    "manifest_matches_samples": "shards",
    "shards_readable_and_complete": "shards",
}


@dataclass
class Built:
    """The module's data root, the definitions and the result of the build run."""

    root: Path
    defs: dg.Definitions
    result: dg.ExecuteInProcessResult

    def stage(self, stage: str) -> Path:
        return self.root / stage / PARTITION


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    root = tmp_path_factory.mktemp("gair_data_checks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GAIR_DATA_ROOT", str(root))
        from pipelines.definitions import defs

        result = defs.resolve_job_def("build_dataset").execute_in_process(
            partition_key=PARTITION, instance=dg.DagsterInstance.ephemeral())
        assert result.success
        yield Built(root, defs, result)


@pytest.fixture
def preserve(tmp_path: Path) -> Iterator[Callable[..., None]]:
    """``preserve(*paths)``: the files or folders are put back as they were when the test ends."""
    saved: list[tuple[Path, Path | None]] = []

    def keep(*paths: Path) -> None:
        for p in paths:
            copy = tmp_path / "preserved" / str(len(saved))
            copy.parent.mkdir(exist_ok=True)
            if p.is_dir():
                shutil.copytree(p, copy)
            elif p.exists():
                shutil.copy2(p, copy)
            saved.append((p, copy if p.exists() else None))

    yield keep
    for p, copy in reversed(saved):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        if copy is not None:
            (shutil.copytree if copy.is_dir() else shutil.copy2)(copy, p)


def run_check(built: Built, name: str) -> dg.AssetCheckEvaluation:
    """Execute one asset check alone (no asset materialized) for the partition, through Dagster."""
    key = dg.AssetCheckKey(dg.AssetKey(CHECKS[name]), name)
    job = built.defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection=set(),
                                                                        asset_check_selection={key})
    result = job.execute_in_process(partition_key=PARTITION, instance=dg.DagsterInstance.ephemeral(),
                                    raise_on_error=False)
    assert not result.get_asset_materialization_events()
    evals = result.get_asset_check_evaluations()
    assert [e.check_name for e in evals] == [name]
    return evals[0]


def meta(evaluation: dg.AssetCheckEvaluation) -> dict:
    return {k: v.value for k, v in evaluation.metadata.items()}


def test_checks_are_blocking_and_pass_on_the_sample(built: Built) -> None:
    graph = built.defs.resolve_asset_graph()
    for key in graph.asset_check_keys:
        if key.name in CHECKS:
            assert graph.get_check_spec(key).blocking, key
    evals = {e.check_name: e.passed for e in built.result.get_asset_check_evaluations()}
    assert {name: evals.get(name) for name in CHECKS} == dict.fromkeys(CHECKS, True)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_each_check_passes_alone_on_the_untouched_outputs(built: Built, name: str) -> None:
    assert run_check(built, name).passed


# --- stac: items_found --------------------------------------------------------------------------------------------

def _edit_items(path: Path, edit: Callable[[list[dict]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc["features"])
    path.write_text(json.dumps(doc))


def _sign_an_asset(features: list[dict]) -> None:
    asset = features[0]["assets"]["B02"]
    asset["href"] += "?st=2024-01-01T00%3A00Z&se=2024-01-02T00%3A00Z&sp=r&sig=SECRET"


def _sign_an_alternate_href(features: list[dict]) -> None:
    features[-1]["assets"]["B04"]["alternate"] = {
        "https": {"href": "https://acct.blob.core.windows.net/c/B04.tif?se=2024-01-02&sig=SECRET"}}


def _drop_projection(features: list[dict]) -> None:
    for key in ("proj:code", "proj:epsg"):
        features[0]["properties"].pop(key, None)


ITEMS_CORRUPTIONS = {
    "empty": (lambda p: _edit_items(p, lambda f: f.clear()), "has no item"),
    "unparsable": (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "unreadable: JSONDecodeError"),
    "not a feature collection": (lambda p: p.write_text("[]"), "unreadable: TypeError"),
    "missing": (lambda p: p.unlink(), "unreadable: FileNotFoundError"),
    "signed asset href": (lambda p: _edit_items(p, _sign_an_asset), "credential parameters ['se', 'sig', 'sp', 'st']"),
    "signed alternate href": (lambda p: _edit_items(p, _sign_an_alternate_href),
                              "credential parameters ['se', 'sig']"),
    "band asset missing": (lambda p: _edit_items(p, lambda f: f[1]["assets"].pop("B8A")), "missing band assets: B8A"),
    "no projection": (lambda p: _edit_items(p, _drop_projection), "no projection fields"),
    "stale stats": (lambda p: _edit_items(p, lambda f: f.pop()), "stats.json counts 3 items, items.json has 2"),
}


@pytest.mark.parametrize("case", sorted(ITEMS_CORRUPTIONS))
def test_items_found_fails(built: Built, preserve: Callable[..., None], case: str) -> None:
    corrupt, expected = ITEMS_CORRUPTIONS[case]
    path = built.stage("stac") / "items.json"
    preserve(path)
    corrupt(path)
    ev = run_check(built, "items_found")
    assert not ev.passed
    problems = meta(ev)["problems"]
    assert any(expected in p for p in problems), problems
    assert "SECRET" not in json.dumps(problems)  # names the parameters, never the URL


def test_failed_items_check_blocks_the_tile_grid(built: Built, preserve: Callable[..., None],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A regression in the unsigning lets a token reach items.json: the check fails and tile_grid does not run."""
    import gair_dataset.stac_catalog

    monkeypatch.setattr(gair_dataset.stac_catalog, "unsign_item", lambda item: item)
    catalog_item = next((built.root / "sample" / "catalog").rglob("*T31UDQ_SYNTHETIC.json"))
    preserve(catalog_item, built.stage("stac"))
    tiles_before = (built.stage("tiles") / "tiles.parquet").stat().st_mtime_ns
    item = json.loads(catalog_item.read_text())
    _sign_an_alternate_href([item])
    catalog_item.write_text(json.dumps(item))

    result = built.defs.resolve_job_def("build_dataset").execute_in_process(
        partition_key=PARTITION, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
        asset_selection=[dg.AssetKey("stac_items"), dg.AssetKey("tile_grid")])
    assert not result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {"items_found": False}
    assert [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()] == ["stac_items"]
    assert (built.stage("tiles") / "tiles.parquet").stat().st_mtime_ns == tiles_before


# --- pairing ------------------------------------------------------------------------------------------------------

def _pairs_path(built: Built) -> Path:
    return built.stage("pairs") / "pairs.parquet"


def _tile_bounds(built: Built) -> pd.DataFrame:
    tiles = gpd.read_parquet(built.stage("tiles") / "tiles.parquet")
    return tiles.geometry.bounds.set_index(tiles["tile_id"])


def _write_pairs(path: Path, df: gpd.GeoDataFrame) -> None:
    df = df.set_geometry(gpd.points_from_xy(df["lon"], df["lat"], crs=df.crs))
    df.to_parquet(path, index=False)


@pytest.mark.parametrize("direction", ["east", "south"])
def test_pairs_inside_tile_bbox_fails_on_a_point_moved_out_of_its_tile(built: Built, preserve: Callable[..., None],
                                                                       direction: str) -> None:
    path = _pairs_path(built)
    preserve(path)
    df = gpd.read_parquet(path)
    b = _tile_bounds(built).loc[df.at[0, "tile_id"]]
    if direction == "east":
        df.loc[0, "lon"] = b.maxx + (b.maxx - b.minx) / 2
    else:
        df.loc[0, "lat"] = b.miny - (b.maxy - b.miny) / 2
    _write_pairs(path, df)
    ev = run_check(built, "pairs_inside_tile_bbox")
    assert not ev.passed
    assert meta(ev)["num_outside"] == 1 and meta(ev)["examples"] == [df.at[0, "sv_id"]]


def test_no_point_in_two_tiles_fails_on_an_sv_id_paired_twice(built: Built, preserve: Callable[..., None]) -> None:
    path = _pairs_path(built)
    preserve(path)
    df = gpd.read_parquet(path)
    other = df[df["tile_id"] != df.at[0, "tile_id"]].iloc[0]
    twin = df.iloc[[0]].copy()
    for col in ("tile_id", "x", "y", "col", "row", "split"):
        twin[col] = other[col]
    _write_pairs(path, pd.concat([df, twin], ignore_index=True))
    ev = run_check(built, "no_point_in_two_tiles")
    assert not ev.passed
    assert meta(ev)["num_duplicated"] == 1 and meta(ev)["examples"] == [df.at[0, "sv_id"]]


def _collapse_to_centre(df: pd.DataFrame) -> None:
    df["x"] = df["y"] = 0.5
    df["col"] = df["row"] = 48  # the sample's tiles are 96 px


def _one_offset_on_the_east_edge(df: pd.DataFrame) -> None:
    df.loc[0, "x"] = 1.0  # half-open: x == 1 belongs to the next tile


@pytest.mark.parametrize(("corrupt", "failed"), [(_collapse_to_centre, "spread_ok"),
                                                 (_one_offset_on_the_east_edge, "in_range")])
def test_offsets_in_range_and_spread_fails(built: Built, preserve: Callable[..., None], corrupt, failed: str) -> None:
    path = _pairs_path(built)
    preserve(path)
    df = gpd.read_parquet(path)
    corrupt(df)
    _write_pairs(path, df)
    ev = run_check(built, "offsets_in_range_and_spread")
    assert not ev.passed and meta(ev)[failed] is False


def test_failed_pairs_check_blocks_the_shards(built: Built, preserve: Callable[..., None]) -> None:
    """Every street-view point moved to its tile's centre: pairs materializes, its check fails, shards does not run."""
    points_path = built.stage("streetview") / "points.parquet"
    preserve(points_path, built.stage("pairs"))
    shard_files = {p.name: p.stat().st_mtime_ns for p in built.stage("shards").iterdir()}
    centres = _tile_bounds(built)
    centres = pd.DataFrame({"lon": (centres.minx + centres.maxx) / 2, "lat": (centres.miny + centres.maxy) / 2})
    tile_of = pd.read_parquet(_pairs_path(built), columns=["sv_id", "tile_id"]).set_index("sv_id")["tile_id"]
    points = gpd.read_parquet(points_path)
    tile = points["sv_id"].map(tile_of)
    paired = tile.notna()
    points.loc[paired, "lon"] = tile[paired].map(centres["lon"]).to_numpy()
    points.loc[paired, "lat"] = tile[paired].map(centres["lat"]).to_numpy()
    points.set_geometry(gpd.points_from_xy(points["lon"], points["lat"], crs=points.crs)).to_parquet(points_path)

    result = built.defs.resolve_job_def("build_dataset").execute_in_process(
        partition_key=PARTITION, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False,
        asset_selection=[dg.AssetKey("pairs"), dg.AssetKey("shards")])
    assert not result.success
    evals = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evals == {"pairs_inside_tile_bbox": True, "no_point_in_two_tiles": True,
                     "offsets_in_range_and_spread": False}
    assert [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()] == ["pairs"]
    assert {p.name: p.stat().st_mtime_ns for p in built.stage("shards").iterdir()} == shard_files


# --- shards -------------------------------------------------------------------------------------------------------

def _rewrite_manifest(path: Path, edit: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(edit(pq.read_table(path)), path)


def _duplicate_first_key(t: pa.Table) -> pa.Table:
    keys = t.column("key").to_pylist()
    keys[1] = keys[0]
    return t.set_column(t.schema.get_field_index("key"), "key", pa.array(keys, t.schema.field("key").type))


@pytest.mark.parametrize(("edit", "rows"), [(lambda t: t.slice(1), -1), (_duplicate_first_key, 0)],
                         ids=["row dropped", "key duplicated"])
def test_manifest_matches_samples_fails(built: Built, preserve: Callable[..., None], edit, rows: int) -> None:
    path = built.stage("shards") / "manifest.parquet"
    preserve(path)
    n = pq.read_metadata(path).num_rows
    _rewrite_manifest(path, edit)
    ev = run_check(built, "manifest_matches_samples")
    assert not ev.passed
    assert meta(ev)["manifest_rows"] == n + rows and meta(ev)["stats_samples"] == meta(ev)["per_shard_sum"] == n


def _truncate(shard: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _drop_one_member(shard: Path) -> None:
    copy = shard.with_suffix(".orig")
    shard.rename(copy)
    with tarfile.open(copy) as src, tarfile.open(shard, "w") as dst:
        dropped = False
        for m in src:
            if not dropped and m.name.endswith(".sv.jpg"):
                dropped = True
                continue
            dst.addfile(m, src.extractfile(m))
    copy.unlink()


@pytest.mark.parametrize(("corrupt", "problem"), [(_truncate, "unreadable (unexpected end of data)"),
                                                  (_drop_one_member, "has ['json', 'rs.npy']"),
                                                  (Path.unlink, "unreadable")],
                         ids=["truncated", "member removed", "shard missing"])
def test_shards_readable_and_complete_fails(built: Built, preserve: Callable[..., None], corrupt,
                                            problem: str) -> None:
    shard = sorted(built.stage("shards").glob("*.tar"))[-1]  # the last shard is the smallest
    preserve(shard)
    corrupt(shard)
    ev = run_check(built, "shards_readable_and_complete")
    assert not ev.passed
    problems = meta(ev)["problems"]
    assert problems and all(p.startswith(shard.name) for p in problems)
    assert any(problem in p for p in problems), problems
