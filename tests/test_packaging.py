"""The project builds into a wheel that works without the checkout: SQL and default configs ship as package data.

Builds the wheel from a copy of the sources (nothing is written into the checkout), installs it with ``--target``
and, from a folder outside the repository, pairs a small generated set of points with tiles, loads the packaged
default regions and the evaluation task registry, and loads the Dagster definitions, all from the installed copy.
"""

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# Runs in the installed copy (PYTHONPATH = the --target folder, cwd outside the repository).
PROBE = r'''
import json, sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from shapely.geometry import box

import gair_dataset.pairing as pairing
import gair_model.eval.tasks as tasks
import pipelines.config as config
from gair_dataset.tile_grid import GridConfig, SplitConfig, build_tiles

out = Path(sys.argv[1])
items = gpd.GeoDataFrame([{"item_id": "item0", "collection": "sentinel-2-l2a",
                           "datetime": pd.Timestamp("2022-01-01", tz="UTC"), "cloud_cover": 5.0, "platform": "x",
                           "processing_baseline": "04.00", "epsg": 32633, "synthetic": True,
                           "geometry": box(13.0, 55.6, 13.4, 55.8)}], geometry="geometry", crs="EPSG:4326")
tiles = build_tiles(items, (13.10, 55.65, 13.30, 55.75), GridConfig(kind="xyz", zoom=14, tile_px=96),
                    SplitConfig(block_tiles=2))
rng = np.random.default_rng(0)
n = 2000
points = pd.DataFrame({"sv_id": [f"p{i:05d}" for i in range(n)], "lon": rng.uniform(13.05, 13.35, n),
                       "lat": rng.uniform(55.62, 55.78, n), "image_uri": [f"/img/p{i}.jpg" for i in range(n)],
                       "heading": np.nan, "captured_at": None})
tiles.to_parquet(out / "tiles.parquet")
points.to_parquet(out / "points.parquet")
# The cap makes the pairing read every SQL file (assignment, cap, output).
res = pairing.pair_points(out / "points.parquet", out / "tiles.parquet", out / "pairs.parquet",
                          unpaired_path=out / "unpaired.parquet", max_points_per_tile=5)
regions = config.load_regions()
specs = tasks.load_task_specs(tasks.default_tasks_path())
print(json.dumps({
    "modules": {m.__name__: m.__file__ for m in (pairing, tasks, config)},
    "sql_dir": str(pairing.SQL_DIR),
    "regions_file": str(config.regions_file()),
    "tasks_file": str(tasks.default_tasks_path()),
    "regions": sorted(regions),
    "tasks": sorted(s.name for s in specs),
    "points": res.points, "paired": res.paired, "outside": res.outside, "capped": res.capped,
    "pairs_rows": len(pd.read_parquet(out / "pairs.parquet")),
}))
'''

DEFS_PROBE = r'''
import json
import pipelines.definitions as d

keys = sorted(k.to_user_string() for k in d.defs.resolve_asset_graph().get_all_asset_keys())
print(json.dumps({"file": d.__file__, "assets": keys}))
'''


def _copy_sources(dest: Path) -> None:
    """Copy what the build reads: the top-level files, the packages and the folders mapped into them."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    folders = {p.split(".")[0] for p in setuptools["packages"]} | set(setuptools.get("package-dir", {}).values())
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    dest.mkdir()
    for path in REPO.iterdir():
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    for folder in sorted(folders - {""}):
        shutil.copytree(REPO / folder, dest / folder, ignore=ignore)


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _checkout_packages() -> set[str]:
    """Every package folder (with an ``__init__.py``) of the three packages in the checkout."""
    out = set()
    for top in ("gair_dataset", "gair_model", "pipelines"):
        for init in (REPO / top).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                out.add(".".join(init.parent.relative_to(REPO).parts))
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (``pip wheel --no-deps --no-build-isolation``)."""
    tmp = tmp_path_factory.mktemp("wheel")
    _copy_sources(tmp / "src")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp / "wheels"), str(tmp / "src"), cwd=tmp)
    (built,) = (tmp / "wheels").glob("gair_pipeline-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed with ``--no-deps --target`` (the third-party packages come from this interpreter)."""
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--no-compile", "--quiet", "--target", str(target), str(wheel), cwd=target.parent)
    return target.resolve()


def _run_installed(site: Path, run: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with only the installed copy importable, from a folder outside the repository."""
    run.mkdir()
    (run / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GAIR_", "PYTHON"))}
    env.update(PYTHONPATH=str(site), GAIR_DATA_ROOT=str(run / "gair_data"), DAGSTER_HOME=str(run / "home"))
    return subprocess.run([sys.executable, "-c", code, str(run)], cwd=run, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.slow
def test_wheel_has_every_package_and_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = _checkout_packages() - in_wheel
    assert not missing, f"package folders missing from [tool.setuptools] packages in pyproject.toml: {missing}"
    for sql in (REPO / "sql").glob("*.sql"):
        assert f"gair_dataset/sql/{sql.name}" in names
    assert {"gair_model/eval/config/eval_tasks.yaml", "pipelines/default_config/regions.yaml"} <= names
    assert not any(n.startswith(("sql/", "config/", "tests/")) for n in names)  # nothing outside the packages


@pytest.mark.slow
def test_installed_wheel_pairs_outside_the_checkout(site, tmp_path):
    proc = _run_installed(site, tmp_path / "run", PROBE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    for name, file in got["modules"].items():
        assert Path(file).resolve().is_relative_to(site), f"{name} imported from {file}, not the installed copy"
    assert Path(got["sql_dir"]) == site / "gair_dataset" / "sql"
    assert Path(got["regions_file"]) == site / "pipelines" / "default_config" / "regions.yaml"
    assert Path(got["tasks_file"]) == site / "gair_model" / "eval" / "config" / "eval_tasks.yaml"
    assert got["regions"] == ["sample-lund", "sample-pontoise"]
    assert "air_temperature" in got["tasks"]
    assert got["points"] == 2000 and got["paired"] > 0 and got["capped"] > 0
    assert got["pairs_rows"] == got["paired"] and got["paired"] + got["outside"] + got["capped"] == got["points"]


@pytest.mark.slow
def test_installed_wheel_loads_the_code_location(site, tmp_path):
    proc = _run_installed(site, tmp_path / "run", DEFS_PROBE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site)
    assert {"stac_items", "sv_points", "pairs", "shards"} <= set(got["assets"])
