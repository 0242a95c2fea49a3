"""The chip of an item tile (tile_grid kind ``item``) is the raster itself: equal to a direct rasterio read."""

from __future__ import annotations

import numpy as np
import rasterio

from gair_dataset.chips import ChipReader, TileSpec
from gair_dataset.local_tiles import FolderCatalog, search_folder
from gair_dataset.stac_catalog import SearchParams, items_to_geodataframe
from gair_dataset.tile_grid import GridConfig, SplitConfig, build_tiles
from tests.pairing.item_tile_fixtures import PX, write_tiles

S2_12 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


def test_item_tile_chip_equals_a_direct_read_of_the_raster(tmp_path):
    bounds = write_tiles(tmp_path / "tiles")
    bbox = (min(b[0] for b in bounds.values()) - 0.01, min(b[1] for b in bounds.values()) - 0.01,
            max(b[2] for b in bounds.values()) + 0.01, max(b[3] for b in bounds.values()) + 0.01)
    items = search_folder(FolderCatalog(tmp_path / "tiles"), SearchParams(collections=("sentinel-2-l2a",), bbox=bbox))
    tiles = build_tiles(items_to_geodataframe(items), bbox, GridConfig(kind="item", tile_px=96), SplitConfig(),
                        item_dicts=items)
    assert GridConfig(kind="item", tile_px=96).chip_px is None  # the shards read item tiles at their own size
    by_id = {it["id"]: it for it in items}
    with ChipReader() as reader:
        for row in tiles.to_dict("records"):
            chip = reader.read(by_id[row["item_ids"][0]], TileSpec.from_row(row), bands=S2_12,
                               out_size=GridConfig(kind="item").chip_px, max_nodata_fraction=1.0)
            assert chip.ok, chip.rejected_reason
            with rasterio.open(tmp_path / "tiles" / f"{row['tile_id']}.tif") as ds:
                direct = ds.read()
            assert chip.array is not None and chip.array.shape == (12, PX, PX)
            np.testing.assert_array_equal(chip.array, direct)
            # A subset of bands, by name, in another order: the same bands of the direct read.
            sub = reader.read(by_id[row["item_ids"][0]], TileSpec.from_row(row), bands=["B04", "B03", "B02"],
                              max_nodata_fraction=1.0)
            assert sub.array is not None
            np.testing.assert_array_equal(sub.array, direct[[3, 2, 1]])
