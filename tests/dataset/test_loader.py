"""Tests for the shared WebDataset loader (gair_model.loader)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gair_dataset.bands import S2_L2A_BANDS
from gair_dataset.shards import ShardWriter, sample_key
from gair_model import loader as loader_mod
from gair_model.loader import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_loader,
    compute_rs_stats,
    decode_sv,
    resolve_shards,
)
from tests.synthetic_shards import write_synthetic_shards


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("synth")
    return write_synthetic_shards(out, 90, rs_size=32, sv_size=48, samples_per_shard=32, seed=3)


def _all(loader) -> list[dict]:
    return list(loader)


def test_batch_contract(synth: list[str]) -> None:
    loader = build_loader(synth, batch_size=8, rs_size=24, sv_size=40, resampled=False, shuffle_buffer=0)
    batches = _all(loader)
    b = batches[0]
    assert set(b) == {"rs", "sv", "lonlat", "rel_xy", "key", "meta"}
    assert b["rs"].shape == (8, 10, 24, 24) and b["rs"].dtype == torch.float32
    assert b["sv"].shape == (8, 3, 40, 40) and b["sv"].dtype == torch.float32
    assert b["lonlat"].shape == (8, 2) and b["lonlat"].dtype == torch.float32
    assert b["rel_xy"].shape == (8, 2) and b["rel_xy"].dtype == torch.float32
    assert isinstance(b["key"], list) and isinstance(b["meta"], list) and isinstance(b["meta"][0], dict)
    assert 0.0 <= float(b["rs"].min()) and float(b["rs"].max()) <= 1.0
    assert float(b["rel_xy"].min()) >= 0.0 and float(b["rel_xy"].max()) <= 1.0
    # one pass, in key order without shuffling, last partial batch kept
    keys = [k for bb in batches for k in bb["key"]]
    assert len(keys) == 90 and keys == sorted(keys)
    assert batches[-1]["rs"].shape[0] == 90 - 8 * 11


def test_round_trip_every_field(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    metas, arrays, jpegs = {}, {}, {}
    with ShardWriter(tmp_path, name="rt", samples_per_shard=3) as w:
        for i in range(7):
            key = sample_key(f"tile-{i // 2}", f"sv_{i:03d}")
            rs = rng.integers(0, 10000, size=(10, 16, 16), dtype=np.uint16)
            img = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), "RGB")
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            meta = {"sv_id": f"sv_{i:03d}", "tile_id": f"tile-{i // 2}", "lon": 13.1 + i * 1e-4,
                    "lat": 52.5 - i * 1e-4, "x": i / 7, "y": 1 - i / 7, "col": i, "row": 7 - i,
                    "bbox": [13.0, 52.6, 13.2, 52.4], "crs": "EPSG:32633", "item_ids": ["a", "b"],
                    "datetime": "2023-05-01T10:00:00Z", "collection": "sentinel-2-l2a",
                    "platform": "Sentinel-2A", "bands": list(S2_L2A_BANDS), "processing_baseline": "05.09",
                    "harmonized": True, "split": "train", "synthetic": True, "nested": {"ü": [1, 2.5, None]}}
            w.write(key, rs, buf.getvalue(), meta)
            metas[key], arrays[key], jpegs[key] = meta, rs, buf.getvalue()
    stats = {"mean": [5000.0] * 10, "std": [2500.0] * 10}  # lo = 0, hi = 10000
    loader = build_loader(str(tmp_path), batch_size=4, rs_size=16, sv_size=20, resampled=False,
                          shuffle_buffer=0, rs_stats=stats)
    seen = 0
    for b in loader:
        for j, key in enumerate(b["key"]):
            seen += 1
            assert b["meta"][j] == metas[key]
            expect_rs = arrays[key].astype(np.float32) / 10000.0
            np.testing.assert_allclose(b["rs"][j].numpy(), expect_rs, rtol=1e-6)
            m = metas[key]
            assert b["lonlat"][j].tolist() == pytest.approx([m["lon"], m["lat"]], abs=1e-5)
            assert b["rel_xy"][j].tolist() == pytest.approx([m["x"], m["y"]], abs=1e-6)
            sv = decode_sv(jpegs[key], 20).astype(np.float32) / 255.0
            expect = (sv - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
            np.testing.assert_allclose(b["sv"][j].permute(1, 2, 0).numpy(), expect, atol=1e-5)
    assert seen == 7


def test_rs_normalisation_clips_to_two_std(tmp_path: Path) -> None:
    rs = np.array([0, 500, 1000, 1500, 2000, 2500, 3000, 60000], dtype=np.uint16).reshape(1, 1, 8)
    rs = np.repeat(np.repeat(rs, 8, axis=1), 1, axis=0)
    with ShardWriter(tmp_path, name="n", manifest=False) as w:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG")
        w.write("t_s", rs, buf.getvalue(), {"lon": 0, "lat": 0, "x": 0.5, "y": 0.5, "bands": ["B04"]})
    b = next(iter(build_loader(str(tmp_path), batch_size=1, rs_size=8, sv_size=8, rs_bands=1,
                               resampled=False, shuffle_buffer=0,
                               rs_stats={"mean": [1500.0], "std": [500.0]})))
    # lo = 500, hi = 2500
    np.testing.assert_allclose(b["rs"][0, 0, 0].numpy(), [0, 0, 0.25, 0.5, 0.75, 1, 1, 1], atol=1e-6)


def test_default_stats_and_band_count_check(synth: list[str]) -> None:
    b = next(iter(build_loader(synth, batch_size=2, rs_size=8, sv_size=8, resampled=False, shuffle_buffer=0)))
    assert b["rs"].shape == (2, 10, 8, 8)
    with pytest.raises(loader_mod.LoaderConfigError):
        next(iter(build_loader(synth, batch_size=2, rs_size=8, sv_size=8, rs_bands=4, resampled=False)))
    with pytest.raises(loader_mod.LoaderConfigError):
        build_loader(synth, batch_size=2, rs_size=8, sv_size=8, rs_stats={"mean": [1.0], "std": [1.0]})


def test_splits_filter(synth: list[str]) -> None:
    metas = []
    for b in build_loader(synth, batch_size=5, rs_size=8, sv_size=8, resampled=False, splits=("val", "test")):
        metas += b["meta"]
    assert metas and {m["split"] for m in metas} <= {"val", "test"}
    n_train = sum(len(b["key"]) for b in build_loader(synth, batch_size=5, rs_size=8, sv_size=8,
                                                       resampled=False, splits=("train",)))
    assert n_train + len(metas) == 90


def test_resampled_epochs_deterministic_and_different(synth: list[str]) -> None:
    def keys(seed: int) -> list[list[str]]:
        loader = build_loader(synth, batch_size=6, rs_size=8, sv_size=8, resampled=True, epoch_samples=30,
                              seed=seed, shuffle_buffer=20, sv_train_aug=True, rs_train_aug=True)
        assert loader.num_batches == 5 and loader.num_samples == 30
        return [[k for b in loader for k in b["key"]] for _ in range(2)]

    a, b = keys(0), keys(0)
    assert a == b
    assert len(a[0]) == 30 and a[0] != a[1]
    assert keys(1) != a


def test_sv_train_aug_changes_pixels_not_geometry_of_rs(synth: list[str]) -> None:
    common = dict(batch_size=4, rs_size=16, sv_size=16, resampled=False, shuffle_buffer=0)
    plain = next(iter(build_loader(synth, **common)))
    aug = next(iter(build_loader(synth, sv_train_aug=True, **common)))
    assert plain["key"] == aug["key"]
    assert torch.equal(plain["rs"], aug["rs"])  # RS never augmented unless rs_train_aug
    assert not torch.allclose(plain["sv"], aug["sv"])


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _good_members(key: str) -> dict[str, bytes]:
    npy = io.BytesIO()
    np.save(npy, np.ones((10, 4, 4), np.uint16) * 1000)
    jpg = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(jpg, "JPEG")
    meta = {"lon": 1.0, "lat": 2.0, "x": 0.1, "y": 0.2, "bands": list(S2_L2A_BANDS), "split": "train"}
    return {f"{key}.rs.npy": npy.getvalue(), f"{key}.sv.jpg": jpg.getvalue(),
            f"{key}.json": json.dumps(meta).encode()}


def test_loader_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load must never be called by the loader")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    members = _good_members("ok_a")
    members["ok_a.pyd"] = b"\x80\x04K\x01."  # a pickle member next to a good sample: ignored
    members["ok_a.pth"] = b"not really torch"
    # a sample whose rs.npy holds an object array (needs pickle): rejected, not unpickled
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bad = _good_members("ok_b")
    bad["ok_b.rs.npy"] = obj.getvalue()
    members.update(bad)
    members["only_c.pickle"] = b"\x80\x04K\x01."  # a sample made only of pickle: ignored
    members.update(_good_members("ok_d"))
    _tar_with(tmp_path / "evil-000000.tar", members)
    keys = [k for b in build_loader(str(tmp_path / "evil-000000.tar"), batch_size=8, rs_size=4, sv_size=8,
                                    resampled=False, shuffle_buffer=0) for k in b["key"]]
    assert keys == ["ok_a", "ok_d"]


def test_corrupt_members_skipped(tmp_path: Path) -> None:
    members = _good_members("a1")
    m2 = _good_members("a2")
    m2["a2.sv.jpg"] = m2["a2.sv.jpg"][:40]  # truncated JPEG
    m3 = _good_members("a3")
    m3["a3.json"] = b"{not json"
    m4 = _good_members("a4")
    del m4["a4.sv.jpg"]  # missing member
    for m in (m2, m3, m4):
        members.update(m)
    members.update(_good_members("a5"))
    _tar_with(tmp_path / "c-000000.tar", members)
    keys = [k for b in build_loader(str(tmp_path / "c-000000.tar"), batch_size=8, rs_size=4, sv_size=8,
                                    resampled=False, shuffle_buffer=0) for k in b["key"]]
    assert keys == ["a1", "a5"]


def test_resolve_shards_forms(synth: list[str]) -> None:
    folder = str(Path(synth[0]).parent)
    assert resolve_shards(folder) == synth
    assert resolve_shards(folder + "/synthetic-*.tar") == synth
    assert resolve_shards(folder + "/synthetic-{000000..000002}.tar") == synth
    with pytest.raises(FileNotFoundError):
        resolve_shards(folder + "/nothing-*.tar")


def test_compute_rs_stats(synth: list[str]) -> None:
    st = compute_rs_stats(synth, bands=10)
    assert len(st["mean"]) == 10 and all(s > 0 for s in st["std"])
    b = next(iter(build_loader(synth, batch_size=4, rs_size=8, sv_size=8, resampled=False, rs_stats=st)))
    assert 0.2 < float(b["rs"].mean()) < 0.8


@pytest.mark.slow
def test_multiworker_loader(synth: list[str]) -> None:
    loader = build_loader(synth, batch_size=5, rs_size=8, sv_size=8, resampled=False, num_workers=2,
                          shuffle_buffer=10)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 90


def test_resampled_with_no_matching_split_raises_instead_of_hanging(
        synth: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_mod, "MAX_CONSECUTIVE_SKIPS", 200)
    loader = build_loader(synth, batch_size=4, rs_size=8, sv_size=8, resampled=True, splits=("nope",))
    with pytest.raises(loader_mod.LoaderConfigError, match="in a row"):
        next(iter(loader))
