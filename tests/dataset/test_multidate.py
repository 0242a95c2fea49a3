"""Multi-date samples (rs.npy as D x C x H x W) and the interleaved write order of the shards step."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from gair_dataset.bands import S2_L2A_BANDS
from gair_dataset.contract import ContractError, canonical_rs, n_dates, rs_dates, sample_dates
from gair_dataset.samples import build_shards_from_pairs, interleave_order, iter_items
from gair_dataset.shards import ShardWriter, distinct_tiles_per_batch, read_shards_json, sample_key
from gair_model import loader as loader_mod
from gair_model.loader import build_loader
from tests.dataset.test_samples import S2_IDX, _item, _pair
from tests.synthetic_shards import write_synthetic_shards

STATS = {"mean": [5000.0] * 10, "std": [2500.0] * 10}  # normalised value = DN / 10000


# -- contract helpers ---------------------------------------------------------------------------------------------
def test_rs_dates_shapes() -> None:
    one = np.zeros((2, 4, 4), np.uint16)
    three = np.zeros((3, 2, 4, 4), np.uint16)
    assert rs_dates(one).shape == (1, 2, 4, 4) and n_dates(one) == 1
    assert rs_dates(three) is three and n_dates(three) == 3
    assert canonical_rs(three[:1]).shape == (2, 4, 4) and canonical_rs(three) is three
    for bad in (np.zeros((4, 4)), np.zeros((0, 2, 4, 4)), np.zeros((1, 1, 2, 4, 4))):
        with pytest.raises(ContractError):
            rs_dates(bad)
    meta = {"item_id": "a", "datetime": "2022", "platform": "S2A", "processing_baseline": "05.10",
            "harmonized": True, "cloud_cover": 1.0}
    assert sample_dates(meta) == [meta]
    assert sample_dates({**meta, "dates": [{"item_id": "a"}, {"item_id": "b"}]}) == [{"item_id": "a"},
                                                                                     {"item_id": "b"}]


# -- loader -------------------------------------------------------------------------------------------------------
def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _meta(i: int, tile: str, n: int) -> dict:
    meta = {"sv_id": f"sv{i}", "tile_id": tile, "lon": 13.0, "lat": 55.0, "x": 0.5, "y": 0.5,
            "bands": list(S2_L2A_BANDS), "split": "train", "item_id": "d0", "item_ids": ["d0", "d1", "d2"]}
    if n > 1:
        meta["dates"] = [{"item_id": f"d{d}"} for d in range(n)]
    return meta


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 3-date samples (date d filled with (d + 1) * 1000 DN) and one old-style single-date sample."""
    out = tmp_path_factory.mktemp("multidate")
    with ShardWriter(out, name="m", samples_per_shard=10, fsync=False) as w:
        multi = np.stack([np.full((10, 8, 8), (d + 1) * 1000, np.uint16) for d in range(3)])
        w.write(sample_key("tA", "sv0"), multi, _jpeg(), _meta(0, "tA", 3))
        w.write(sample_key("tB", "sv1"), multi, _jpeg(), _meta(1, "tB", 3))
        w.write(sample_key("tC", "sv2"), np.full((10, 8, 8), 7000, np.uint16), _jpeg(), _meta(2, "tC", 1))
    return out


def _draws(shards: Path, seed: int, n: int = 200, **kw) -> list[tuple[str, int | None, float]]:
    loader = build_loader(str(shards), batch_size=10, rs_size=8, sv_size=8, resampled=True, epoch_samples=n,
                          shuffle_buffer=0, seed=seed, rs_stats=STATS, **kw)
    out = []
    for b in loader:
        for j, m in enumerate(b["meta"]):
            out.append((b["key"][j], m.get("date_index"), float(b["rs"][j].mean())))
    return out


def test_eval_reads_date_zero_and_old_samples_load(mixed_shard: Path) -> None:
    draws = _draws(mixed_shard, seed=0, n=60)
    assert len(draws) == 60
    for key, idx, mean in draws:
        if key == "tC_sv2":  # single date (C x H x W): loads as before, no date fields added
            assert idx is None and mean == pytest.approx(0.7)
        else:
            assert idx == 0 and mean == pytest.approx(0.1)  # date 0 = 1000 DN
    b = next(iter(build_loader(str(mixed_shard), batch_size=3, rs_size=8, sv_size=8, resampled=False,
                               shuffle_buffer=0, rs_stats=STATS)))
    assert b["rs"].shape == (3, 10, 8, 8)
    metas = {m["sv_id"]: m for m in b["meta"]}
    assert metas["sv0"]["date"] == {"item_id": "d0"} and "date" not in metas["sv2"]


def test_training_draws_every_date_reproducibly(mixed_shard: Path) -> None:
    a = _draws(mixed_shard, seed=5, rs_train_aug=True)
    b = _draws(mixed_shard, seed=5, rs_train_aug=True)
    assert a == b  # same seed, same dates (and same jitter)
    counts = Counter(idx for key, idx, _ in a if key != "tC_sv2")
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 20
    assert [idx for _, idx, _ in _draws(mixed_shard, seed=6, rs_train_aug=True)] != [idx for _, idx, _ in a]


def test_select_date_returns_that_date() -> None:
    rs = np.stack([np.full((2, 3, 3), d, np.uint16) for d in range(3)])
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        one, meta = loader_mod._select_date(rs, {"dates": [{"item_id": f"d{d}"} for d in range(3)]}, rng, True)
        assert one.shape == (2, 3, 3) and (one == meta["date_index"]).all()
        assert meta["date"] == {"item_id": f"d{meta['date_index']}"}
        seen.add(meta["date_index"])
    assert seen == {0, 1, 2}
    single = np.zeros((2, 3, 3), np.uint16)
    state = rng.bit_generator.state
    assert loader_mod._select_date(single, {}, rng, True) == (single, {})
    assert rng.bit_generator.state == state  # nothing drawn for a single-date sample


def test_synthetic_multidate_shards_load(tmp_path: Path) -> None:
    paths = write_synthetic_shards(tmp_path, 12, rs_size=8, sv_size=8, samples_per_shard=6, dates=3)
    with tarfile.open(paths[0]) as tf:
        first = tf.getmembers()[0]
        assert np.load(io.BytesIO(tf.extractfile(first).read()), allow_pickle=False).shape == (3, 10, 8, 8)
    b = next(iter(build_loader(paths, batch_size=4, rs_size=8, sv_size=8, resampled=True, epoch_samples=4,
                               seed=1, rs_train_aug=True)))
    assert b["rs"].shape == (4, 10, 8, 8) and all(m["date_index"] in (0, 1, 2) for m in b["meta"])


# -- shards step --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patch(shared_data: Path) -> Path:
    for p in sorted((shared_data / "rasters" / "s2_l2a_patches" / "images").glob("*.tif")):
        with rasterio.open(p) as src:
            if not (src.read() == 0).any():
                return p
    pytest.skip("need an S2 patch without zeros")


def _cloudy_scl(patch: Path, tmp_path: Path) -> Path:
    with rasterio.open(patch) as src:
        prof = src.profile
    scl = tmp_path / "scl.tif"
    with rasterio.open(scl, "w", driver="GTiff", width=128, height=128, count=1, dtype="uint8", crs=prof["crs"],
                       transform=prof["transform"] @ rasterio.Affine.scale(2)) as dst:
        dst.write(np.full((128, 128), 9, np.uint8), 1)
    return scl


def test_shards_step_writes_every_passing_date(patch: Path, shared_data: Path, tmp_path: Path) -> None:
    photos = shared_data / "streetview" / "exif_photos" / "lund"
    items = iter_items([_item("new", patch), _item("cloudy", patch, SCL={"href": str(_cloudy_scl(patch, tmp_path))}),
                        _item("old", patch, baseline="02.14"), _item("new2", patch)])
    ids = ["new", "cloudy", "nowhere", "old", "new2"]  # least cloud first: cloudy fails, nowhere is not in the catalog
    pairs = [_pair("sv01", "tM", patch, 10, 10, str(photos / "01.jpg"), ids),
             _pair("sv02", "tS", patch, 10, 10, str(photos / "02.jpg"), ["cloudy", "old"])]
    rep = build_shards_from_pairs(pairs, items, tmp_path / "all", name="d", fsync=False)
    assert rep.n_written == 2 and rep.dates_per_sample == {3: 1, 1: 1}
    with tarfile.open(rep.shards.paths[0]) as tf:
        rs = np.load(io.BytesIO(tf.extractfile("tM_sv01.rs.npy").read()), allow_pickle=False)
        meta = json.loads(tf.extractfile("tM_sv01.json").read())
        single = np.load(io.BytesIO(tf.extractfile("tS_sv02.rs.npy").read()), allow_pickle=False)
        single_meta = json.loads(tf.extractfile("tS_sv02.json").read())
    with rasterio.open(patch) as src:
        ref = src.read([S2_IDX[b] + 1 for b in S2_L2A_BANDS], window=((10, 74), (10, 74))).astype(np.int32)
    harmonised = np.clip(ref - 1000, 0, None)
    assert rs.dtype == np.uint16 and rs.shape == (3, 10, 64, 64)
    np.testing.assert_array_equal(rs[0], harmonised)  # date 0: "new" (baseline 05.10, offset removed)
    np.testing.assert_array_equal(rs[1], ref)  # date 1: "old" (baseline 02.14, no offset)
    np.testing.assert_array_equal(rs[2], harmonised)
    assert [d["item_id"] for d in meta["dates"]] == ["new", "old", "new2"]
    assert [d["harmonized"] for d in meta["dates"]] == [True, False, True]
    assert [d["processing_baseline"] for d in meta["dates"]] == ["05.10", "02.14", "05.10"]
    assert {k: meta[k] for k in ("item_id", "harmonized", "processing_baseline", "datetime", "platform",
                                 "cloud_cover")} == meta["dates"][0]
    assert meta["item_ids"] == ids
    # a tile with one passing date: C x H x W and no "dates" list, exactly as before
    assert single.shape == (10, 64, 64) and "dates" not in single_meta and single_meta["item_id"] == "old"
    np.testing.assert_array_equal(single, ref)

    two = build_shards_from_pairs(pairs, items, tmp_path / "two", name="d", fsync=False, max_dates=2)
    assert two.dates_per_sample == {2: 1, 1: 1}
    one = build_shards_from_pairs(pairs, items, tmp_path / "one", name="d", fsync=False, max_dates=1)
    assert one.dates_per_sample == {1: 2}
    with tarfile.open(one.shards.paths[0]) as tf:
        rs1 = np.load(io.BytesIO(tf.extractfile("tM_sv01.rs.npy").read()), allow_pickle=False)
        assert "dates" not in json.loads(tf.extractfile("tM_sv01.json").read())
    np.testing.assert_array_equal(rs1, harmonised)
    assert one.n_chip_reads < rep.n_chip_reads  # one date: stops at the first passing item


# -- write order --------------------------------------------------------------------------------------------------
def test_interleave_order_spreads_tiles() -> None:
    groups = [("big", [f"big{j}" for j in range(8)]), ("mid", ["mid0", "mid1", "mid2", "mid3"]),
              ("s1", ["s1"]), ("s2", ["s2"])]
    order = interleave_order(groups)
    assert sorted(order) == sorted(x for _, g in groups for x in g)
    assert interleave_order(groups) == order  # deterministic
    assert [x for x in order if x.startswith("big")] == [f"big{j}" for j in range(8)]  # a tile keeps its order
    pos = [i for i, x in enumerate(order) if x.startswith("big")]
    assert max(np.diff(pos)) <= 3  # 8 of 14 samples: spread evenly, never bunched
    tiles = [x.rstrip("0123456789") for x in order]
    assert distinct_tiles_per_batch(tiles, 4) > distinct_tiles_per_batch(sorted(tiles), 4)
    assert interleave_order([("a", [1, 2, 3])]) == [1, 2, 3]


def test_shards_step_interleaves_tiles(patch: Path, shared_data: Path, tmp_path: Path) -> None:
    photos = shared_data / "streetview" / "exif_photos" / "lund"
    items = iter_items([_item("new", patch)])
    pairs = [_pair(f"sv{t}{j}", f"t{t}", patch, 10 * t, 10 * t, str(photos / f"0{1 + j}.jpg"), ["new"])
             for t in range(4) for j in range(3)]
    rep = build_shards_from_pairs(pairs, items, tmp_path / "a", name="i", samples_per_shard=5, fsync=False)
    serial = build_shards_from_pairs(list(reversed(pairs)), items, tmp_path / "b", name="i", samples_per_shard=5,
                                     fsync=False, chip_workers=1)
    assert [Path(p).read_bytes() for p in rep.shards.paths] == [Path(p).read_bytes() for p in serial.shards.paths]
    order = []
    for p in rep.shards.paths:
        with tarfile.open(p) as tf:
            order += [m.name.split(".")[0] for m in tf.getmembers()][::3]
    assert sorted(order) == sorted(f"t{t}_sv{t}{j}" for t in range(4) for j in range(3))
    tiles = [k.split("_")[0] for k in order]
    assert all(a != b for a, b in zip(tiles, tiles[1:], strict=False))  # no two neighbours share a tile
    doc = read_shards_json(tmp_path / "a")
    assert doc["batch_diversity"] == rep.shards.batch_diversity
    bd = {k: v for k, v in doc["batch_diversity"].items() if k != "batch_size"}
    assert bd == {"n_samples": 12, "n_tiles": 4, "distinct_tiles_per_batch_before": 4.0,
                  "distinct_tiles_per_batch_after": 4.0}  # 12 samples < one batch of 256
    assert distinct_tiles_per_batch(tiles, 4) == 4.0 > distinct_tiles_per_batch(sorted(tiles), 4)
    keyed = build_shards_from_pairs(pairs, items, tmp_path / "k", name="i", fsync=False, interleave_tiles=1)
    with tarfile.open(keyed.shards.paths[0]) as tf:
        assert [m.name.split(".")[0] for m in tf.getmembers()][::3] == sorted(order)  # one tile at a time: key order
