"""Pairs -> shards end to end on real rasters and photos (gair_dataset.samples)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.warp import transform_bounds

from gair_dataset.bands import S2_L2A_ALL_BANDS, S2_L2A_BANDS
from gair_dataset.samples import build_sample_json, build_shards_from_pairs, iter_items
from gair_model.loader import build_loader

CONTRACT_KEYS = {"sv_id", "lon", "lat", "tile_id", "item_ids", "datetime", "collection", "platform", "crs",
                 "bbox", "x", "y", "bands", "processing_baseline", "harmonized", "split", "synthetic"}
S2_IDX = {b: i for i, b in enumerate(S2_L2A_ALL_BANDS)}


def _item(item_id: str, href: Path | str, baseline: str = "05.10", **assets: dict) -> dict:
    return {"id": item_id, "collection": "sentinel-2-l2a",
            "properties": {"datetime": "2022-07-01T10:00:00Z", "platform": "Sentinel-2B",
                           "s2:processing_baseline": baseline, "eo:cloud_cover": 3.5},
            "assets": {"data": {"href": str(href), "eo:bands": [{"name": b} for b in S2_L2A_ALL_BANDS]},
                       **assets}}


def _pair(sv_id: str, tile_id: str, patch: Path, col: int, row: int, image_uri: str, item_ids: list[str],
          x: float = 0.25, y: float = 0.5, split: str = "train", size: int = 64) -> dict:
    with rasterio.open(patch) as src:
        t = src.transform
        crs = src.crs
    minx, maxy = t @ (col, row)
    maxx, miny = t @ (col + size, row + size)
    lon_min, lat_min, lon_max, lat_max = transform_bounds(crs, "EPSG:4326", minx, miny, maxx, maxy)
    return {"sv_id": sv_id, "tile_id": tile_id, "lon": lon_min + x * (lon_max - lon_min),
            "lat": lat_max - y * (lat_max - lat_min), "image_uri": image_uri, "heading": None,
            "captured_at": "2021-07-29T11:16:42", "grid": "utm", "tile_crs": crs.to_string(),
            "tile_minx": minx, "tile_miny": miny, "tile_maxx": maxx, "tile_maxy": maxy, "tile_width": size,
            "tile_height": size, "lon_min": lon_min, "lat_max": lat_max, "lon_max": lon_max,
            "lat_min": lat_min,
            "x": x, "y": y, "col": int(x * size), "row": int(y * size), "item_ids": item_ids,
            "collection": "sentinel-2-l2a", "split": split, "region": "test"}


@pytest.fixture(scope="module")
def patches(shared_data: Path) -> list[Path]:
    good = []
    for p in sorted((shared_data / "rasters" / "s2_l2a_patches" / "images").glob("*.tif")):
        with rasterio.open(p) as src:
            if (src.read() > 1000).all():
                good.append(p)
    if len(good) < 2:
        pytest.skip("need two S2 patches without zeros")
    return good[:2]


def test_build_sample_json_contract(patches: list[Path]) -> None:
    pair = _pair("sv1", "tileA", patches[0], 0, 0, "/x.jpg", ["itemA", "itemB"])
    meta = build_sample_json(pair, _item("itemB", patches[0]), b"abc", bands=list(S2_L2A_BANDS),
                             harmonized=True, processing_baseline="05.10")
    assert CONTRACT_KEYS <= set(meta)
    assert meta["item_id"] == "itemB" and meta["item_ids"] == ["itemA", "itemB"]
    assert meta["bbox"] == [pair["lon_min"], pair["lat_max"], pair["lon_max"], pair["lat_min"]]
    assert meta["bbox"][0] < meta["bbox"][2] and meta["bbox"][1] > meta["bbox"][3]
    assert meta["platform"] == "Sentinel-2B" and meta["crs"] == pair["tile_crs"]
    assert meta["sv_bytes"] == 3 and meta["synthetic"] is False and meta["heading"] is None


def test_pairs_to_shards_with_failures(patches: list[Path], shared_data: Path, tmp_path: Path) -> None:
    photos = shared_data / "streetview" / "exif_photos" / "lund"
    pano = shared_data / "streetview" / "panoramas" / "1.jpg"
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((photos / "03.jpg").read_bytes()[:5000])
    corrupt_tif = tmp_path / "corrupt.tif"
    corrupt_tif.write_bytes(b"II*\x00" + b"\x00" * 100)
    # SCL: everything cloudy -> itemCloudy is rejected and the next item is used
    with rasterio.open(patches[0]) as src:
        prof = src.profile
    scl = tmp_path / "scl.tif"
    with rasterio.open(scl, "w", driver="GTiff", width=128, height=128, count=1, dtype="uint8",
                       crs=prof["crs"],
                       transform=prof["transform"] @ rasterio.Affine.scale(2)) as dst:
        dst.write(np.full((128, 128), 9, np.uint8), 1)
    items = iter_items([
        _item("itemA", patches[0]),
        _item("itemA_old", patches[0], baseline="02.14"),
        _item("itemCloudy", patches[0], SCL={"href": str(scl)}),
        _item("itemB", patches[1]),
        _item("itemCorrupt", corrupt_tif),
        _item("itemMissing", tmp_path / "missing.tif"),
    ])
    pairs = [
        _pair("sv01", "tA", patches[0], 10, 10, str(photos / "01.jpg"), ["itemA"]),
        _pair("sv02", "tA", patches[0], 10, 10, str(photos / "02.jpg"), ["itemA"], x=0.9, y=0.1),
        _pair("sv03", "tA", patches[0], 10, 10, str(truncated), ["itemA"]),
        _pair("sv04", "tA2", patches[0], 100, 100, str(tmp_path / "nope.jpg"), ["itemA_old"]),
        _pair("sv05", "tA3", patches[0], 100, 20, str(pano), ["itemCloudy", "itemA_old"], split="val"),
        _pair("sv06", "tB", patches[1], 50, 60, str(photos / "04.jpg"), ["itemB"], split="test"),
        _pair("sv07", "tC", patches[1], 0, 0, str(photos / "05.jpg"), ["itemCorrupt"]),
        _pair("sv08", "tD", patches[1], 0, 0, str(photos / "06.jpg"), ["itemMissing"]),
        _pair("sv09", "tE", patches[1], 0, 0, str(photos / "07.jpg"), ["itemNotInCatalog"]),
        _pair("sv.10", "tB", patches[1], 0, 0, str(photos / "08.jpg"), ["itemB"]),  # dotted id
        _pair("sv11", "tB", patches[1], 0, 0, str(photos / "09.jpg"), ["itemB"]),
    ]
    report = build_shards_from_pairs(list(reversed(pairs)), items, tmp_path / "out", name="t",
                                     samples_per_shard=2, pano_out_size=128, fsync=False)
    # One chip thread gives the same shards, byte for byte, as the default prefetching pool.
    serial = build_shards_from_pairs(list(reversed(pairs)), items, tmp_path / "serial", name="t",
                                     samples_per_shard=2, pano_out_size=128, fsync=False, chip_workers=1)
    assert [Path(p).read_bytes() for p in serial.shards.paths] == [Path(p).read_bytes() for p in report.shards.paths]
    assert serial.n_chip_reads == report.n_chip_reads
    assert report.n_pairs == 11 == report.n_written + report.n_rejected
    assert report.n_written == 5  # sv01 sv02 sv05 sv06 sv11
    by_sv = {r.sv_id: r for r in report.rejections}
    assert set(by_sv) == {"sv03", "sv04", "sv07", "sv08", "sv09", "sv.10"}
    assert by_sv["sv03"].stage == "sv" and by_sv["sv03"].reason.startswith("corrupt")
    assert by_sv["sv04"].stage == "sv" and by_sv["sv04"].reason.startswith("unreadable")
    assert by_sv["sv07"].stage == "chip" and "read_error" in by_sv["sv07"].reason
    assert by_sv["sv08"].stage == "chip" and "read_error" in by_sv["sv08"].reason
    assert by_sv["sv09"].stage == "chip" and "item not found" in by_sv["sv09"].reason
    assert by_sv["sv.10"].stage == "key"
    assert sum(report.rejected_by_reason().values()) == report.n_rejected
    assert report.n_panorama_crops == 1
    assert len(report.shards.paths) == 3  # 5 samples, 2 per shard, no empty shard

    written = {}
    loader = build_loader(str(tmp_path / "out"), batch_size=2, rs_size=64, sv_size=32, resampled=False,
                          shuffle_buffer=0)
    for b in loader:
        for k, m in zip(b["key"], b["meta"], strict=True):
            written[k] = m
    assert sorted(written) == ["tA3_sv05", "tA_sv01", "tA_sv02", "tB_sv06", "tB_sv11"]
    by_id = {p["sv_id"]: p for p in pairs}
    for key, meta in written.items():
        assert CONTRACT_KEYS <= set(meta)
        p = by_id[meta["sv_id"]]
        assert key == f"{p['tile_id']}_{p['sv_id']}"
        assert (meta["lon"], meta["lat"], meta["x"], meta["y"], meta["split"]) == (
            p["lon"], p["lat"], p["x"], p["y"], p["split"])
        assert meta["bands"] == list(S2_L2A_BANDS) and meta["crs"] == p["tile_crs"]
    assert written["tA3_sv05"]["item_id"] == "itemA_old" and not written["tA3_sv05"]["harmonized"]
    assert written["tA_sv01"]["item_id"] == "itemA" and written["tA_sv01"]["harmonized"]

    # rs.npy of tA equals the harmonised reference window; sv.jpg of sv01 is the original photo
    with tarfile.open(tmp_path / "out" / "t-000000.tar") as tf:
        rs = np.load(io.BytesIO(tf.extractfile("tA_sv01.rs.npy").read()), allow_pickle=False)
        sv = tf.extractfile("tA_sv01.sv.jpg").read()
    with rasterio.open(patches[0]) as src:
        ref = src.read([S2_IDX[b] + 1 for b in S2_L2A_BANDS], window=((10, 74), (10, 74))).astype(np.int32)
    np.testing.assert_array_equal(rs, np.clip(ref - 1000, 0, None))
    assert sv == (photos / "01.jpg").read_bytes()


TILE_COLUMNS = ("grid", "tile_crs", "tile_minx", "tile_miny", "tile_maxx", "tile_maxy", "tile_width", "tile_height",
                "lon_min", "lat_max", "lon_max", "lat_min", "item_ids", "collection")


def test_slim_pairs_joined_with_tiles_give_the_same_shards(patches: list[Path], shared_data: Path,
                                                           tmp_path: Path) -> None:
    """The pairs table carries only the point, tile_id, offsets, split, region: the tile comes from tiles.parquet."""
    photos = shared_data / "streetview" / "exif_photos" / "lund"
    items = iter_items([_item("itemA", patches[0]), _item("itemB", patches[1])])
    full = [
        _pair("sv01", "tA", patches[0], 10, 10, str(photos / "01.jpg"), ["itemA"]),
        _pair("sv02", "tA", patches[0], 10, 10, str(photos / "02.jpg"), ["itemA"], x=0.9, y=0.1),
        _pair("sv03", "tB", patches[1], 50, 60, str(photos / "04.jpg"), ["itemB"], split="test"),
    ]
    tiles = pd.DataFrame([{"tile_id": p["tile_id"], **{c: p[c] for c in TILE_COLUMNS}, "split": p["split"],
                           "n_items": 1, "block_id": "b0", "geometry": b"\x00"} for p in full])
    tiles = tiles.drop_duplicates("tile_id")
    slim_rows = [{k: v for k, v in p.items() if k not in TILE_COLUMNS} for p in full]
    slim = pd.DataFrame([*slim_rows, {**slim_rows[0], "sv_id": "sv04", "tile_id": "tNowhere"}])  # its tile is missing
    assert not set(TILE_COLUMNS) & set(slim.columns)

    want = build_shards_from_pairs(full, items, tmp_path / "full", name="t", fsync=False)
    got = build_shards_from_pairs(slim, items, tmp_path / "slim", tiles=tiles, name="t", fsync=False)
    assert want.n_written == got.n_written == 3 and got.n_pairs == 4 == got.n_written + got.n_rejected
    assert [(r.sv_id, r.stage) for r in got.rejections] == [("sv04", "tile")]
    assert got.rejections[0].reason.startswith("missing")
    # Same chips, same JSON, byte for byte: the join restores every field the sample needs.
    assert [Path(p).read_bytes() for p in got.shards.paths] == [Path(p).read_bytes() for p in want.shards.paths]
    with tarfile.open(got.shards.paths[0]) as tf:
        meta = json.loads(tf.extractfile("tB_sv03.json").read())
    tile_b = tiles.set_index("tile_id").loc["tB"]
    assert meta["crs"] == tile_b["tile_crs"] and meta["grid"] == "utm" and meta["item_ids"] == ["itemB"]
    assert meta["bbox"] == [tile_b["lon_min"], tile_b["lat_max"], tile_b["lon_max"], tile_b["lat_min"]]
    assert (meta["split"], meta["region"], meta["col"], meta["row"]) == ("test", "test", full[2]["col"],
                                                                         full[2]["row"])
