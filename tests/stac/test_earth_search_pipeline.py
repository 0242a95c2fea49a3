"""An Earth Search-shaped catalog (S2 v1 common-name keys and Landsat in one region) through the whole pipeline.

The code location runs in a subprocess (its regions, catalog and data root are read when it loads): the catalog is
the ndjson of Earth Search-shaped items over real pixels (``tests/fixtures/earth_search``), the region lists
``sentinel-2-l2a`` and ``landsat-c2-l2``, and ``build_dataset`` materialises stac_items -> tile_grid -> sv_points ->
pairs -> shards with their blocking checks.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import shared_path
from tests.run_helpers import run_build_dataset
from tests.stac.test_earth_search import BBOX, FIXTURES, write_rasters


@pytest.mark.slow
def test_earth_search_s2_and_landsat_region_builds_shards(tmp_path):
    folder = tmp_path / "es"
    folder.mkdir()
    write_rasters(folder)
    items = [json.loads((FIXTURES / n).read_text()) for n in ("s2_l2a_v1_item.json", "landsat_c2_l2_item.json")]
    (folder / "items.ndjson").write_text("".join(json.dumps(it) + "\n" for it in items))
    photos = sorted(shared_path("streetview", "exif_photos", "lund").glob("*.jpg"))
    rng = np.random.default_rng(0)
    n = 40
    pd.DataFrame({"id": [f"es{i:03d}" for i in range(n)],
                  "lon": rng.uniform(BBOX[0], BBOX[2], n), "lat": rng.uniform(BBOX[1], BBOX[3], n),
                  "image_path": [str(photos[i % len(photos)]) for i in range(n)]}).to_csv(tmp_path / "points.csv",
                                                                                        index=False)
    (tmp_path / "regions.yaml").write_text(f"""
regions:
  es-region:
    bbox: [{BBOX[0]}, {BBOX[1]}, {BBOX[2]}, {BBOX[3]}]
    collections: [sentinel-2-l2a, landsat-c2-l2]
    datetime: 2020-01-01/2025-12-31
    max_cloud_cover: 30
    tile_grid: {{kind: utm, tile_px: 32, resolution: 10.0, items_per_tile: 2}}
    split: {{block_tiles: 1, val_fraction: 0.2, test_fraction: 0.2, seed: 0}}
    streetview: {{kind: table, path: points.csv}}
""")
    run_build_dataset("es-region", env={"GAIR_REGIONS": str(tmp_path / "regions.yaml"),
                                        "GAIR_DATA_ROOT": str(tmp_path / "data"),
                                        "GAIR_STAC_CATALOG": str(folder / "items.ndjson")})
    data = tmp_path / "data"
    found = pd.read_parquet(data / "stac" / "es-region" / "items.parquet")
    assert set(found.collection) == {"sentinel-2-l2a", "landsat-c2-l2"}  # neither rejected for the other's assets
    manifest = pd.read_parquet(data / "shards" / "es-region" / "manifest.parquet")
    pairs = pd.read_parquet(data / "pairs" / "es-region" / "pairs.parquet")
    assert len(manifest) == len(pairs) > 0
