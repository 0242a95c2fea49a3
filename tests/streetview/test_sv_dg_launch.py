"""``dg launch --assets sv_points`` with a Mapillary and a Panoramax region against the loopback fakes.

The regions are those of ``tests/streetview/regions.loopback.yaml`` (the README's demo file), pointed at the fake
server's port; the token comes from the environment variable the region names, as a user would set it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.streetview.fake_apis import FakeApis

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tests" / "streetview" / "regions.loopback.yaml"


@pytest.fixture(scope="module")
def fake():
    server = FakeApis(n_points=12).start()
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("region", ["lund-mapillary", "lund-panoramax"])
def test_dg_launch_sv_points_against_the_loopback_api(fake, tmp_path, region):
    doc = yaml.safe_load(DEMO.read_text())
    for spec in doc["regions"].values():
        spec["streetview"]["url"] = spec["streetview"]["url"].replace("http://127.0.0.1:8765", fake.base)
    regions = tmp_path / "regions.yaml"
    regions.write_text(yaml.safe_dump(doc))
    (tmp_path / "home").mkdir()
    env = {**os.environ, "GAIR_REGIONS": str(regions), "GAIR_DATA_ROOT": str(tmp_path / "data"),
           "DAGSTER_HOME": str(tmp_path / "home"), "MAPILLARY_TOKEN": "GOOD"}
    proc = subprocess.run([str(Path(sys.executable).parent / "dg"), "launch", "--assets", "sv_points",
                           "--partition", region], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GOOD" not in proc.stdout + proc.stderr  # the token never reaches the logs
    out = tmp_path / "data" / "streetview" / region
    points = pd.read_parquet(out / "points.parquet")
    rejects = pd.read_parquet(out / "rejects.parquet")
    source = region.split("-")[1]
    # 12 pictures each; the fakes serve one broken picture per API (no geometry / image 404)
    assert len(points) == 11 and len(points) + len(rejects) == 12
    assert set(points["source"]) == {source} and points["license"].notna().all()
    assert points["attribution"].str.contains(source.capitalize()).all()
    assert all(Path(p).is_file() for p in points["image_uri"])  # images cached on disk
