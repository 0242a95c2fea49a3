"""A folder of pre-cut GeoTIFF tiles plus a points CSV builds shards with ``tile_grid: {kind: item}``.

The code location runs in a subprocess (its regions, catalog and data root are read when it loads):
``GAIR_STAC_CATALOG=folder:<tiles>`` (one STAC item per GeoTIFF, made with rio-stac), a regions file whose region has
``tile_grid: {kind: item}``, and a CSV of real street-view photos. ``build_dataset`` materialises stac_items ->
tile_grid -> sv_points -> pairs -> shards with their blocking checks.

Two layouts: NAIP-like 4-band files (R, G, B, NIR = the real patch's B04, B03, B02, B08) and the authors' layout,
one 12-band Sentinel-2 file per tile (B01..B12) of which the 10 GAIR bands are read by their ``eo:bands`` names.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import rasterio

from tests.conftest import shared_path
from tests.pairing.item_tile_fixtures import PX, SIDE, write_tiles
from tests.run_helpers import run_build_dataset

#: collection -> (1-based bands of the patch written per tile, 0-based bands of the file each sample holds)
LAYOUTS = {"naip": ([4, 3, 2, 8], [0, 1, 2, 3]),
           "sentinel-2-l2a": (list(range(1, 13)), [1, 2, 3, 4, 5, 6, 7, 8, 10, 11])}  # B01, B09 dropped


@pytest.mark.slow
@pytest.mark.parametrize("collection", sorted(LAYOUTS))
def test_folder_of_item_tiles_builds_shards(tmp_path, collection):
    photos = sorted(shared_path("streetview", "exif_photos", "lund").glob("*.jpg"))[:12]
    written, kept = LAYOUTS[collection]
    bounds = write_tiles(tmp_path / "tiles", bands=written)
    a = bounds["s2tile_a_20230601"]
    # 12 points spread over tiles a..d (2 x 2 tile sides from a's north-west corner), each with a real photo.
    offsets = [(0.1 + 0.6 * (i % 3), 0.15 + 0.45 * (i // 3)) for i in range(12)]
    pd.DataFrame({"id": [f"sv{i:02d}" for i in range(12)],
                  "lon": [a[0] + dx * SIDE for dx, _ in offsets], "lat": [a[3] - dy * SIDE for _, dy in offsets],
                  "image_path": [str(p) for p in photos]}).to_csv(tmp_path / "points.csv", index=False)
    west, north = a[0] - SIDE, a[3] + SIDE
    (tmp_path / "regions.yaml").write_text(f"""
regions:
  user-tiles:
    bbox: [{west}, {north - 4 * SIDE}, {west + 4 * SIDE}, {north}]
    collections: [{collection}]
    datetime: 2023-01-01/2023-12-31
    max_cloud_cover: 30
    tile_grid: {{kind: item, tile_px: 96, items_per_tile: 1}}
    split: {{block_tiles: 1, val_fraction: 0.0, test_fraction: 0.0, seed: 0}}
    streetview: {{kind: table, path: points.csv}}
""")
    run_build_dataset("user-tiles", env={"GAIR_REGIONS": str(tmp_path / "regions.yaml"),
                                         "GAIR_DATA_ROOT": str(tmp_path / "data"),
                                         "GAIR_STAC_CATALOG": f"folder:{tmp_path / 'tiles'}"})

    data = tmp_path / "data"
    tiles = pd.read_parquet(data / "tiles" / "user-tiles" / "tiles.parquet")
    assert sorted(tiles.tile_id) == sorted(bounds) and set(tiles.grid) == {"item"}
    pairs = pd.read_parquet(data / "pairs" / "user-tiles" / "pairs.parquet")
    assert len(pairs) == 12 and pairs.sv_id.is_unique
    manifest = pd.read_parquet(data / "shards" / "user-tiles" / "manifest.parquet")
    assert len(manifest) == 12
    # Every sample's rs.npy is its tile's raster, read directly.
    seen = 0
    for shard in sorted((data / "shards" / "user-tiles").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, raw in members.items():
            if not name.endswith(".json"):
                continue
            meta = json.loads(raw)
            rs = np.load(io.BytesIO(members[name[: -len("json")] + "rs.npy"]))
            with rasterio.open(tmp_path / "tiles" / f"{meta['tile_id']}.tif") as ds:
                np.testing.assert_array_equal(rs, ds.read()[kept])
            assert rs.shape == (len(kept), PX, PX) and meta["grid"] == "item" and meta["crs"] == "EPSG:4326"
            seen += 1
    assert seen == 12
    leftovers = [p for p in data.rglob("*") if ".tmp" in p.name or p.name.startswith(".staging")]
    assert leftovers == []
