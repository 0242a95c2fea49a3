"""Wrong inputs are named: the file/item/region and the cause, and nothing half-written is left."""

from pathlib import Path

import numpy as np
import pytest
import rasterio

from gair_dataset.bands import S2_L2A_ALL_BANDS
from gair_dataset.chips import ChipReader, ChipReadError, TileSpec
from gair_dataset.samples import build_shards_from_pairs, iter_items
from pipelines.config import load_regions

PATCH = "patch_286743.tif"  # real pixels already without the +1000 offset (dark: most below 1000)


def _item(item_id: str, href: Path, **props) -> dict:
    return {"id": item_id, "collection": "sentinel-2-l2a", "properties": {"datetime": "2023-01-05T00:00:00Z", **props},
            "assets": {"data": {"href": str(href), "eo:bands": [{"name": b} for b in S2_L2A_ALL_BANDS]}}}


def _tile_of(src: rasterio.DatasetReader, size: int = 32) -> TileSpec:
    x0, y1 = src.transform @ (0, 0)
    x1, y0 = src.transform @ (size, size)
    return TileSpec(src.crs.to_string(), (x0, y0, x1, y1), size, size, "t0")


def _pair(tile: TileSpec, photo: Path, item_id: str = "item") -> dict:
    return {"sv_id": "sv01", "tile_id": "t0", "lon": 0.0, "lat": 0.0, "x": 0.5, "y": 0.5, "col": 0, "row": 0,
            "split": "train", "tile_crs": tile.crs, "tile_minx": tile.bounds[0], "tile_miny": tile.bounds[1],
            "tile_maxx": tile.bounds[2], "tile_maxy": tile.bounds[3], "tile_width": tile.width,
            "tile_height": tile.height, "lon_min": 0.0, "lat_min": 0.0, "lon_max": 0.1, "lat_max": 0.1,
            "item_ids": [item_id], "image_uri": str(photo), "grid": "utm"}


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.is_file()) if out.exists() else []


def test_raster_without_crs_is_named_and_nothing_is_written(shared_data: Path, tmp_path: Path) -> None:
    src_path = shared_data / "rasters" / "s2_l2a_patches" / "images" / PATCH
    with rasterio.open(src_path) as src:
        tile = _tile_of(src)
        prof = {**src.profile, "crs": None}
        data = src.read()
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(no_crs, "w", **prof) as dst:
        dst.write(data)
    item = _item("item", no_crs)
    with ChipReader() as reader, pytest.raises(ChipReadError, match=r"no_crs\.tif has no CRS"):
        reader.read(item, tile, raise_on_error=True)
    photo = shared_data / "streetview" / "exif_photos" / "lund" / "01.jpg"
    out = tmp_path / "shards"
    report = build_shards_from_pairs([_pair(tile, photo)], iter_items([item]), out, name="r", fsync=False)
    assert report.n_written == 0 and report.n_rejected == 1
    reason = report.rejections[0].reason
    assert "no_crs.tif has no CRS" in reason and "nodata_fraction" not in reason
    assert not [n for n in _leftovers(out) if n.endswith(".tar") or "tmp" in n]


def test_harmonising_harmonised_pixels_is_named(shared_data: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    src_path = shared_data / "rasters" / "s2_l2a_patches" / "images" / PATCH
    with rasterio.open(src_path) as src:
        tile = _tile_of(src)
    item = _item("already-harmonised", src_path, **{"s2:processing_baseline": "05.09"})
    with ChipReader() as reader:
        res = reader.read(item, tile)
        assert not res.ok and res.harmonize_clipped > 0.3 and res.nodata_fraction == 0.0
        assert res.rejected_reason.startswith("already_harmonised: removing the +1000 offset of baseline 05.09")
        assert "'already-harmonised' may already be harmonised" in res.rejected_reason
        assert "offset_removed" in res.rejected_reason
        assert "may already be harmonised" in caplog.text
        # the flag saying the offset was removed: no harmonisation, no nodata
        flagged = _item("flagged", src_path, **{"s2:processing_baseline": "05.09",
                                                "earthsearch:boa_offset_applied": True})
        ok = reader.read(flagged, tile)
    assert ok.ok and not ok.harmonized and ok.nodata_fraction == 0.0
    with rasterio.open(src_path) as src:
        np.testing.assert_array_equal(ok.array, src.read([2, 3, 4, 5, 6, 7, 8, 9, 11, 12],
                                                         window=((0, 32), (0, 32))))
    photo = shared_data / "streetview" / "exif_photos" / "lund" / "01.jpg"
    out = tmp_path / "shards"
    report = build_shards_from_pairs([_pair(tile, photo, item["id"])], iter_items([item]), out, name="h", fsync=False)
    assert report.n_written == 0 and "may already be harmonised" in report.rejections[0].reason
    assert not [n for n in _leftovers(out) if n.endswith(".tar")]


def test_unknown_collection_rejects_the_chip_instead_of_crashing(shared_data: Path, tmp_path: Path) -> None:
    src_path = shared_data / "rasters" / "s2_l2a_patches" / "images" / PATCH
    with rasterio.open(src_path) as src:
        tile = _tile_of(src)
    item = {**_item("odd", src_path), "collection": "my-mirror"}
    photo = shared_data / "streetview" / "exif_photos" / "lund" / "01.jpg"
    report = build_shards_from_pairs([_pair(tile, photo, "odd")], iter_items([item]), tmp_path / "s", name="u",
                                     fsync=False)
    assert report.n_written == 0
    assert "unknown_collection: item 'odd': unknown collection 'my-mirror'" in report.rejections[0].reason


def test_out_of_range_bbox_names_the_region_and_file(tmp_path: Path) -> None:
    path = tmp_path / "regions.yaml"
    path.write_text("""
regions:
  fine:
    bbox: [13.1, 55.6, 13.2, 55.7]
    streetview: {kind: table, path: p.parquet}
  broken-region:
    bbox: [13.1, 95.6, 13.2, 95.7]
    streetview: {kind: table, path: p.parquet}
""")
    with pytest.raises(ValueError) as ei:
        load_regions(path)
    msg = str(ei.value)
    assert str(path) in msg and "region 'broken-region'" in msg and "invalid bbox" in msg and "95.6" in msg
