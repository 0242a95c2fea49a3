"""One data root: the ``DataRoot`` resource moves both the inputs (the embedded sample) and the outputs.

Environment settings reach the resources as ``dg.EnvVar`` (resolved when a run starts), with working defaults when
the variables are unset.
"""

import json

import dagster as dg
import pandas as pd
import pytest

from pipelines.common.storage import DataRoot
from pipelines.config import StreetViewSource
from pipelines.defs.shards.resources import RasterAccess
from pipelines.defs.stac.resources import ConfiguredStacCatalog, LiveStacCatalog, LocalStacCatalog, catalog_for
from pipelines.defs.streetview.resources import StreetViewPoints

SETTINGS = ("GAIR_DATA_ROOT", "GAIR_STAC_CATALOG", "GAIR_EVAL_TASKS", "GAIR_EVAL_DATA")


def _code_location_resources() -> dict:
    from pipelines.defs.resources import resources

    return resources().resources


@pytest.mark.slow
def test_data_root_resource_moves_the_sample_and_the_outputs(tmp_path, monkeypatch):
    from pipelines.defs.stac.assets import stac_items
    from pipelines.defs.streetview.assets import sv_points

    monkeypatch.delenv("GAIR_DATA_ROOT", raising=False)
    monkeypatch.delenv("GAIR_STAC_CATALOG", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # where the default data root (./gair_data) would be
    root = tmp_path / "elsewhere"
    resources = {"data_root": DataRoot(root=str(root)), "stac": ConfiguredStacCatalog(),
                 "streetview": StreetViewPoints()}
    result = dg.materialize([stac_items, sv_points], partition_key="sample-lund", resources=resources,
                            instance=dg.DagsterInstance.ephemeral())
    assert result.success

    sample = root / "sample"
    assert json.loads((sample / "SYNTHETIC.json").read_text())["synthetic"] is True  # generated under the root
    items = json.loads((root / "stac" / "sample-lund" / "items.json").read_text())["features"]
    hrefs = [a["href"] for item in items for a in item["assets"].values()]
    assert items and hrefs and all(h.startswith(str(sample)) for h in hrefs), hrefs[:3]  # read from the root
    points = pd.read_parquet(root / "streetview" / "sample-lund" / "points.parquet")
    assert len(points) > 1000 and points["image_uri"].str.startswith(str(sample)).all()
    assert (root / "streetview" / "sample-lund" / "stats.json").exists()
    assert not (cwd / "gair_data").exists()


def test_settings_bound_as_env_vars_when_set(tmp_path, monkeypatch):
    for name in SETTINGS:
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    res = _code_location_resources()
    bound = {"data_root": res["data_root"].root, "stac": res["stac"].catalog,
             "raster_access": res["raster_access"].stac_catalog, "eval_tasks.tasks_file": res["eval_tasks"].tasks_file,
             "eval_tasks.data_dir": res["eval_tasks"].data_dir}
    assert all(isinstance(v, dg.EnvVar) for v in bound.values()), bound
    assert res["data_root"].root.env_var_name == "GAIR_DATA_ROOT"
    assert res["stac"].catalog.env_var_name == "GAIR_STAC_CATALOG"


def test_unset_settings_keep_working_defaults(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    res = _code_location_resources()
    assert res["data_root"].root == "" and not isinstance(res["data_root"].root, dg.EnvVar)
    assert res["stac"].catalog == "local" and isinstance(res["stac"].resolved(), LocalStacCatalog)
    assert res["raster_access"].signer() is None
    assert (res["eval_tasks"].tasks_file, res["eval_tasks"].data_dir) == ("", "")


def test_env_var_is_read_when_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("GAIR_DATA_ROOT", str(tmp_path / "at_load"))
    data_root = _code_location_resources()["data_root"]

    @dg.asset
    def where(data_root: DataRoot) -> str:
        return str(data_root.path)

    monkeypatch.setenv("GAIR_DATA_ROOT", str(tmp_path / "at_run"))
    result = dg.materialize([where], resources={"data_root": data_root}, instance=dg.DagsterInstance.ephemeral())
    assert result.output_for_node("where") == str(tmp_path / "at_run")


def test_default_data_root_and_sample_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GAIR_DATA_ROOT", str(tmp_path / "env"))
    assert DataRoot().path == tmp_path / "env"
    assert DataRoot(root=str(tmp_path / "given")).sample_dir == tmp_path / "given" / "sample"
    monkeypatch.delenv("GAIR_DATA_ROOT")
    monkeypatch.chdir(tmp_path)
    assert DataRoot().path == tmp_path / "gair_data"


def test_sample_paths_need_the_sample_folder(tmp_path):
    source = StreetViewSource(kind="table", path="sample://streetview/x/points.parquet")
    with pytest.raises(ValueError, match="sample folder"):
        source.resolve(tmp_path)
    assert source.resolve(tmp_path, tmp_path / "sample") == tmp_path / "sample" / "streetview" / "x" / "points.parquet"
    assert StreetViewSource(kind="table", path="p.csv").resolve(tmp_path) == tmp_path / "p.csv"


def test_catalog_setting_values():
    assert isinstance(catalog_for("local"), LocalStacCatalog) and catalog_for("").path == ""
    assert catalog_for("/data/catalog.json").path == "/data/catalog.json"
    pc = catalog_for("planetary-computer")
    assert isinstance(pc, LiveStacCatalog) and pc.sign_with_planetary_computer
    other = catalog_for("https://earth-search.example/v1")
    assert isinstance(other, LiveStacCatalog) and not other.sign_with_planetary_computer
    assert RasterAccess(stac_catalog="planetary-computer").signer() is not None
    assert RasterAccess(stac_catalog="https://earth-search.example/v1").signer() is None


def test_held_shard_sets_hold_every_region_until_the_block_ends(tmp_path, monkeypatch):
    from gair_dataset.atomic import lock_free
    from pipelines.defs.training.assets import held_shard_sets
    from pipelines.partitions import REGIONS

    root = DataRoot(root=str(tmp_path))
    region = sorted(REGIONS)[0]
    (tmp_path / "shards" / region).mkdir(parents=True)
    (tmp_path / "shards" / region / "shards.json").write_text("{}")  # a published set
    locks = [tmp_path / ".locks" / f"{r}.shards.lock" for r in sorted(REGIONS)]
    with held_shard_sets(root) as sets:
        assert sets == [str(tmp_path / "shards" / region)]
        assert not any(lock_free(p) for p in locks)  # a rebuild cannot swap any region's set in now
    assert all(lock_free(p) for p in locks)
    with pytest.raises(dg.Failure, match="materialize `shards` first"):
        with held_shard_sets(DataRoot(root=str(tmp_path / "empty"))):
            pass


def test_a_swap_that_must_wait_for_readers_says_so(tmp_path):
    import threading
    import time

    class Log:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def info(self, msg: str) -> None:
            self.lines.append(msg)

    root, log = DataRoot(root=str(tmp_path)), Log()
    with root.shard_set_lock("r", log=log):  # nobody reads the set: no message
        pass
    assert log.lines == []
    swapped = threading.Event()

    def swap() -> None:
        with root.shard_set_lock("r", log=log):
            swapped.set()

    with root.shard_set_lock("r", shared=True):  # a training run reads it
        t = threading.Thread(target=swap)
        t.start()
        deadline = time.monotonic() + 30
        while not log.lines and time.monotonic() < deadline:  # the swap found the set in use and said so
            time.sleep(0.01)
        assert not swapped.is_set()
    t.join(30)
    assert swapped.is_set()
    assert len(log.lines) == 1 and "waiting for the runs reading its shard set" in log.lines[0]
