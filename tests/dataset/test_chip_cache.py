"""The per-tile chip cache: a rebuild reads only tiles whose items, grid or settings changed, and writes the same
shards byte for byte as a build without the cache."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from gair_dataset.chip_cache import CachedTile, ChipCache, item_digest, tile_key
from gair_dataset.samples import build_shards_from_pairs, iter_items
from tests.dataset.test_multidate import _cloudy_scl
from tests.dataset.test_samples import _item, _pair


@pytest.fixture(scope="module")
def patch(shared_data: Path) -> Path:
    return shared_data / "rasters" / "s2_l2a_patches" / "images" / "patch_252161.tif"


def _shard_bytes(report) -> list[bytes]:
    return [Path(p).read_bytes() for p in report.shards.paths]


def _build(pairs, items, out: Path, cache: ChipCache | None, **kw):
    return build_shards_from_pairs(pairs, items, out, name="c", samples_per_shard=4, fsync=False, chip_cache=cache,
                                   **kw)


def test_rebuild_reads_only_changed_tiles_and_writes_the_same_shards(patch: Path, shared_data: Path,
                                                                    tmp_path: Path) -> None:
    photos = shared_data / "streetview" / "exif_photos" / "lund"
    scl = {"SCL": {"href": str(_cloudy_scl(patch, tmp_path))}}
    items = iter_items([_item("a", patch), _item("b", patch), _item("cloudy", patch, **scl)])
    pairs = [_pair(f"sv{t}{j}", f"t{t}", patch, 20 * t, 20 * t, str(photos / f"0{1 + j}.jpg"),
                   ["cloudy"] if t == 3 else (["a"] if t < 2 else ["b"])) for t in range(4) for j in range(2)]
    plain = _build(pairs, items, tmp_path / "plain", None)
    cache = ChipCache(tmp_path / "cache")
    first = _build(pairs, items, tmp_path / "first", cache)
    assert first.n_chip_reads == plain.n_chip_reads == 4 and first.n_cached_tiles == 0
    assert len(cache.keys()) == 4  # three tiles with a chip, one rejected for its clouds (a verdict on the data)
    assert _shard_bytes(first) == _shard_bytes(plain) and first.n_written == 6

    again = _build(pairs, items, tmp_path / "again", ChipCache(tmp_path / "cache"))
    assert again.n_chip_reads == 0 and again.n_cached_tiles == 4
    assert _shard_bytes(again) == _shard_bytes(plain)
    assert [r.reason for r in again.rejections] == [r.reason for r in plain.rejections]  # the cloudy tile, as read

    changed = copy.deepcopy(items)
    changed["b"]["properties"]["updated"] = "2026-12-01T00:00:00Z"  # the catalog changed item b only
    after = _build(pairs, changed, tmp_path / "after", ChipCache(tmp_path / "cache"))
    assert after.n_chip_reads == 1 and after.n_cached_tiles == 3  # tile t2 (item b) read again
    assert _shard_bytes(after) == _shard_bytes(_build(pairs, changed, tmp_path / "after-plain", None))
    assert len(ChipCache(tmp_path / "cache").keys()) == 4  # the entry of the old item b pruned

    fewer = _build(pairs[:4], changed, tmp_path / "fewer", ChipCache(tmp_path / "cache"))
    assert fewer.n_chip_reads == 0 and len(ChipCache(tmp_path / "cache").keys()) == 2  # tiles t0, t1 kept


def test_key_covers_grid_items_and_settings(patch: Path) -> None:
    item = _item("a", patch)
    digests = {"a": item_digest(item)}
    tile = _pair("sv", "t", patch, 0, 0, "x.jpg", ["a"])
    settings = {"bands": None, "out_size": 64, "max_nodata_fraction": 0.1, "max_dates": None}
    key = tile_key(tile, digests, settings)
    assert key == tile_key(dict(tile), {"a": item_digest(copy.deepcopy(item))}, dict(settings))  # canonical
    assert key != tile_key({**tile, "tile_minx": tile["tile_minx"] + 10}, digests, settings)
    assert key != tile_key({**tile, "item_ids": ["a", "a2"]}, digests, settings)
    assert key != tile_key(tile, {"a": item_digest({**item, "assets": {}})}, settings)
    assert key != tile_key(tile, digests, {**settings, "max_nodata_fraction": 0.2})
    assert key == tile_key({**tile, "sv_id": "other", "lon": 0.0}, digests, settings)  # a pair's own fields: no


def test_corrupt_entry_is_a_miss_and_is_replaced(tmp_path: Path) -> None:
    cache = ChipCache(tmp_path)
    tile = CachedTile(array=np.arange(8, dtype=np.uint16).reshape(2, 2, 2), item_ids=["a"], bands=["B02", "B03"],
                      harmonized=True, processing_baseline="05.10", dates=[{"item_id": "a"}])
    cache.put("k", tile)
    got = cache.get("k")
    assert got is not None and np.array_equal(got.array, tile.array) and got.bands == ["B02", "B03"]
    (tmp_path / "k.npz").write_bytes(b"not a zip")
    assert cache.get("k") is None and cache.misses == 1
    cache.put("k", tile)
    assert cache.get("k") is not None
    assert cache.prune(["other"]) == 1 and cache.keys() == []


def test_a_cache_that_cannot_be_written_does_not_fail_the_build(patch: Path, shared_data: Path,
                                                                tmp_path: Path) -> None:
    photos = shared_data / "streetview" / "exif_photos" / "lund"
    items = iter_items([_item("a", patch)])
    pairs = [_pair("sv0", "t0", patch, 0, 0, str(photos / "01.jpg"), ["a"])]
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    rep = _build(pairs, items, tmp_path / "out", ChipCache(blocked))
    assert rep.n_written == 1 and rep.n_chip_reads == 1 and rep.n_cached_tiles == 0


def test_item_digest_follows_the_band_profile_and_local_files(patch: Path, tmp_path: Path) -> None:
    import os
    import shutil

    from gair_dataset.bands import BandProfile, clear_user_profiles, register_profile

    local = tmp_path / "p.tif"
    shutil.copy(patch, local)
    item = {**_item("a", local), "collection": "my-tiles"}
    before = item_digest(item)
    try:
        register_profile(BandProfile("my-tiles", ("B02", "B03")))  # declared in the regions file
        with_profile = item_digest(item)
        register_profile(BandProfile("my-tiles", ("B02", "B03"), nodata=65535))  # the profile edited
        assert len({before, with_profile, item_digest(item)}) == 3
    finally:
        clear_user_profiles()
    assert item_digest(item) == before
    os.utime(local, ns=(1, 1))  # the local raster rewritten in place (here: only its time)
    assert item_digest(item) != before


def test_a_tile_whose_read_fails_twice_is_counted_unrecovered(patch: Path, shared_data: Path,
                                                              tmp_path: Path) -> None:
    photos = shared_data / "streetview" / "exif_photos" / "lund"
    items = iter_items([_item("a", patch), _item("gone", tmp_path / "missing.tif")])
    pairs = [_pair("sv0", "t0", patch, 0, 0, str(photos / "01.jpg"), ["a"]),
             _pair("sv1", "t1", patch, 20, 20, str(photos / "02.jpg"), ["gone"])]
    rep = _build(pairs, items, tmp_path / "out", ChipCache(tmp_path / "cache"))
    assert rep.n_written == 1 and rep.n_chip_retries == 1 and rep.n_unrecovered_tiles == 1
    assert len(ChipCache(tmp_path / "cache").keys()) == 1  # the failed tile is not cached
