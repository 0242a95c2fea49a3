"""Deterministic, atomic shard writing (gair_dataset.shards)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest

from gair_dataset.shards import (
    STAGING_DIRNAME,
    TAR_MTIME,
    Sample,
    ShardWriteError,
    ShardWriter,
    batch_diversity,
    distinct_tiles_per_batch,
    encode_rs,
    expected_shard_count,
    list_shards,
    read_shards_json,
    sample_key,
    write_shards,
)
from tests.synthetic_shards import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


def _samples(n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tile, sv = f"t{i // 3:03d}", f"sv-{i:05d}"
        meta = {"sv_id": sv, "tile_id": tile, "lon": 10 + i * 1e-3, "lat": 50.0, "x": 0.25, "y": 0.75,
                "col": 1, "row": 3, "split": "train" if i % 5 else "val", "item_ids": ["itm"],
                "bbox": [10.0, 50.1, 10.1, 50.0], "bands": ["B02", "B03"], "synthetic": True}
        out.append(Sample(sample_key(tile, sv), rng.integers(0, 9000, (2, 8, 8), dtype=np.uint16),
                          bytes(rng.integers(0, 255, 100 + i, dtype=np.uint8)), meta))
    return out


def _sha(p: str | Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_keys_are_dot_free() -> None:
    assert sample_key("z14_8529_5974", "sv-01_a") == "z14_8529_5974_sv-01_a"
    for tile, sv in (("t.1", "a"), ("t", "img.jpg"), ("", "a"), ("t", "a/b"), ("t", "ä")):
        with pytest.raises(ShardWriteError):
            sample_key(tile, sv)


def test_byte_identical_reruns_and_layout(tmp_path: Path) -> None:
    a = write_shards(_samples(25), tmp_path / "a", name="train", samples_per_shard=10)
    b = write_shards(list(reversed(_samples(25))), tmp_path / "b", name="train", samples_per_shard=10,
                     sort=True)
    assert [Path(p).name for p in a.paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [_sha(p) for p in a.paths] == [_sha(p) for p in b.paths]
    assert [s.sha256 for s in a.shards] == [_sha(p) for p in a.paths]
    assert read_shards_json(tmp_path / "a") == read_shards_json(tmp_path / "b")
    doc = read_shards_json(tmp_path / "a")
    assert [s["n_samples"] for s in doc["shards"]] == [10, 10, 5] and doc["n_samples"] == 25
    assert [s["bytes"] for s in doc["shards"]] == [os.path.getsize(p) for p in a.paths]
    assert list_shards(tmp_path / "a") == a.paths
    assert not list((tmp_path / "a").glob(f"{STAGING_DIRNAME}*"))
    with tarfile.open(a.paths[0]) as tf:
        members = tf.getmembers()
    first = _samples(1)[0].key
    assert [m.name for m in members[:3]] == [f"{first}.{s}" for s in ("rs.npy", "sv.jpg", "json")]
    meta = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members}
    assert meta == {(TAR_MTIME, 0, 0, "", "", 0o444)}


def test_members_round_trip(tmp_path: Path) -> None:
    samples = _samples(4)
    info = write_shards(samples, tmp_path, samples_per_shard=100)
    with tarfile.open(info.paths[0]) as tf:
        data = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    for s in samples:
        arr = np.load(io.BytesIO(data[f"{s.key}.rs.npy"]), allow_pickle=False)
        assert arr.dtype == np.uint16 and np.array_equal(arr, s.rs)
        assert data[f"{s.key}.sv.jpg"] == s.sv_jpeg
        assert json.loads(data[f"{s.key}.json"]) == s.meta


def test_no_empty_shards_and_exact_multiples(tmp_path: Path) -> None:
    empty = write_shards([], tmp_path / "e", samples_per_shard=10)
    assert empty.paths == [] and list(Path(tmp_path / "e").glob("*.tar")) == []
    assert read_shards_json(tmp_path / "e")["n_shards"] == 0
    exact = write_shards(_samples(20), tmp_path / "x", samples_per_shard=10)
    assert len(exact.paths) == 2 == expected_shard_count(20, 10)
    assert all(s.n_samples == 10 for s in exact.shards)


def test_order_and_dtype_contract(tmp_path: Path) -> None:
    s = _samples(2)
    # any order is written as given (the caller's order is the shard order); keys must be unique
    info = write_shards([s[1], s[0]], tmp_path / "o")
    with tarfile.open(info.paths[0]) as tf:
        assert [m.name.split(".")[0] for m in tf.getmembers()][::3] == [s[1].key, s[0].key]
    with pytest.raises(ShardWriteError, match="duplicate"):
        write_shards([s[0], s[1], s[0]], tmp_path / "d")
    with pytest.raises(ShardWriteError):
        encode_rs(np.full((1, 2, 2), -1, np.int32))
    with pytest.raises(ShardWriteError):
        encode_rs(np.zeros((2, 2), np.uint16))
    with pytest.raises(ShardWriteError):
        encode_rs(np.zeros((1, 1, 2, 2, 2), np.uint16))
    assert np.load(io.BytesIO(encode_rs(np.ones((1, 2, 2), np.uint8))), allow_pickle=False).dtype == np.uint16
    # several dates: D x C x H x W; a single date given as 1 x C x H x W is stored as C x H x W
    multi = np.arange(3 * 2 * 4 * 4, dtype=np.uint16).reshape(3, 2, 4, 4)
    np.testing.assert_array_equal(np.load(io.BytesIO(encode_rs(multi)), allow_pickle=False), multi)
    assert encode_rs(multi[:1]) == encode_rs(multi[0])
    # a failed run publishes nothing it had not completed and writes no manifest
    assert not (tmp_path / "d" / "shards.json").exists()


def test_distinct_tiles_per_batch_hand_computed() -> None:
    # blocks of 4: [a a b c] -> 3, [c c c c] -> 1, [d e f g] -> 4; the trailing [a] is ignored: (3 + 1 + 4) / 3
    ids = list("aabc") + list("cccc") + list("defg") + ["a"]
    assert distinct_tiles_per_batch(ids, 4) == pytest.approx(8 / 3)
    assert distinct_tiles_per_batch(list("aab"), 4) == 2.0  # fewer samples than a batch: one partial block
    assert distinct_tiles_per_batch([], 4) == 0.0
    assert distinct_tiles_per_batch(list("abab"), 1) == 1.0
    with pytest.raises(ValueError):
        distinct_tiles_per_batch(ids, 0)
    # before = key order (tile-grouped), after = the order given
    written = [("a_1", "a"), ("b_1", "b"), ("a_2", "a"), ("b_2", "b")]
    assert batch_diversity(written, 2) == {
        "batch_size": 2, "n_samples": 4, "n_tiles": 2,
        "distinct_tiles_per_batch_before": 1.0, "distinct_tiles_per_batch_after": 2.0}


def test_shards_json_records_batch_diversity(tmp_path: Path) -> None:
    samples = _samples(9)  # tiles t000..t002, three samples each, in key order
    info = write_shards([samples[i] for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)], tmp_path, samples_per_shard=4)
    doc = read_shards_json(tmp_path)
    assert doc["format_version"] == 2
    want = {"batch_size": 256, "n_samples": 9, "n_tiles": 3, "distinct_tiles_per_batch_before": 3.0,
            "distinct_tiles_per_batch_after": 3.0}
    assert doc["batch_diversity"] == want == info.batch_diversity
    assert batch_diversity([(s.key, s.meta["tile_id"]) for s in samples], 3)["distinct_tiles_per_batch_before"] == 1.0
    man = gpd.read_parquet(info.manifest_path)
    assert list(man["key"]) == [samples[i].key for i in (0, 3, 6, 1, 4, 7, 2, 5, 8)]
    assert set(man["rs_dates"]) == {1}


def test_multi_date_manifest_columns(tmp_path: Path) -> None:
    s = _samples(2)
    multi = Sample(s[0].key, np.stack([s[0].rs, s[0].rs + 1, s[0].rs + 2]), s[0].sv_jpeg, s[0].meta)
    info = write_shards([multi, s[1]], tmp_path)
    man = gpd.read_parquet(info.manifest_path)
    assert list(man["rs_dates"]) == [3, 1]
    assert list(man["rs_bands"]) == [2, 2] and list(man["rs_height"]) == [8, 8] and list(man["rs_width"]) == [8, 8]


def test_rerun_replaces_stale_shards_and_manifest(tmp_path: Path) -> None:
    write_shards(_samples(30), tmp_path, name="s", samples_per_shard=10)
    assert len(list(tmp_path.glob("s-*.tar"))) == 3
    info = write_shards(_samples(12), tmp_path, name="s", samples_per_shard=10)
    assert sorted(p.name for p in tmp_path.glob("s-*.tar")) == ["s-000000.tar", "s-000001.tar"]
    assert read_shards_json(tmp_path)["n_samples"] == 12 == info.n_samples


def test_manifest_geoparquet(tmp_path: Path) -> None:
    info = write_shards(_samples(7), tmp_path, name="m", samples_per_shard=3)
    man = gpd.read_parquet(info.manifest_path)
    assert len(man) == 7 and man.crs.to_epsg() == 4326
    assert list(man["key"]) == sorted(man["key"])
    assert {"key", "shard", "index_in_shard", "sv_id", "tile_id", "lon", "lat", "x", "y", "split",
            "item_id", "lon_min", "rs_bands", "rs_height", "sv_bytes"} <= set(man.columns)
    assert list(man["shard"]) == ["m-000000.tar"] * 3 + ["m-000001.tar"] * 3 + ["m-000002.tar"]
    assert list(man["index_in_shard"]) == [0, 1, 2, 0, 1, 2, 0]
    assert man.geometry.x.iloc[2] == pytest.approx(man["lon"].iloc[2])


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from gair_dataset import shards as S
    orig = S.ShardWriter.write_members
    written = []
    def stuck(self, key, members):  # the writer stops for good after sample N (argv[3]): it is killed there
        orig(self, key, members)
        written.append(key)
        if len(written) == int(sys.argv[3]):
            time.sleep(600)
    S.ShardWriter.write_members = stuck
    from tests.synthetic_shards import write_synthetic_shards
    write_synthetic_shards(sys.argv[1], int(sys.argv[2]), rs_size=16, sv_size=16,
                           samples_per_shard=10, seed=5)
    """
)


@pytest.mark.slow
def test_sigkill_mid_rebuild_leaves_the_previous_set_intact_and_rerun_matches(tmp_path: Path) -> None:
    ref = write_synthetic_shards(tmp_path / "ref", 50, rs_size=16, sv_size=16, samples_per_shard=10, seed=5)
    out = tmp_path / "killed"
    old = write_synthetic_shards(out, 30, rs_size=16, sv_size=16, samples_per_shard=10, seed=9)  # published before
    old_files = {p.name: _sha(p) for p in out.iterdir() if p.is_file()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", _KILL_SCRIPT, str(out), "50", "25"]  # stuck midway through the third shard
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    try:
        while not list(out.glob(f"{STAGING_DIRNAME}-*-{proc.pid}-*/synthetic-000002.tar")):  # two staged shards done
            assert proc.poll() is None, "writer finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.2)  # it writes on up to its 25th sample and stays there
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # the set published before is still there, complete and byte for byte the same
    assert {p.name: _sha(p) for p in out.iterdir() if p.is_file()} == old_files
    assert [Path(p).name for p in old] == sorted(p.name for p in out.glob("*.tar"))
    staged = sorted(p.name for p in out.glob(f"{STAGING_DIRNAME}-*-{proc.pid}-*/*.tar"))
    assert staged[:3] == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
    rerun = write_synthetic_shards(out, 50, rs_size=16, sv_size=16, samples_per_shard=10, seed=5)
    assert [_sha(p) for p in rerun] == [_sha(p) for p in ref]
    assert not list(out.glob(f"{STAGING_DIRNAME}*"))  # the killed run's staging folder is gone with it
    assert read_shards_json(out) == read_shards_json(tmp_path / "ref")


def test_failed_rebuild_keeps_the_previous_set(tmp_path: Path) -> None:
    write_shards(_samples(30), tmp_path, name="s", samples_per_shard=10)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    samples = _samples(25)
    with pytest.raises(ShardWriteError, match="duplicate"):
        write_shards([*samples, samples[0]], tmp_path, name="s", samples_per_shard=10)  # fails after two shards
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(f"{STAGING_DIRNAME}*"))
    assert read_shards_json(tmp_path)["n_samples"] == 30


@pytest.mark.parametrize("key_len", [10, 93, 120])
def test_tar_bytes_identical_to_tarfile(tmp_path: Path, key_len: int) -> None:
    rng = np.random.default_rng(key_len)
    members = []
    with ShardWriter(tmp_path / "ours", name="x", samples_per_shard=100, manifest=False) as w:
        for i in range(3):
            key = f"k{i}".ljust(key_len, "a")
            m = [("rs.npy", bytes(rng.integers(0, 255, 700 + 513 * i, dtype=np.uint8))),
                 ("sv.jpg", bytes(rng.integers(0, 255, 512 * i + 1, dtype=np.uint8))), ("json", b"{}")]
            w.write_members(key, m)
            members += [(f"{key}.{s}", d) for s, d in m]
    ref = tmp_path / "ref.tar"
    with tarfile.open(ref, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = (
                len(data), TAR_MTIME, 0o444, 0, 0, "", "")
            tf.addfile(ti, io.BytesIO(data))
    assert (tmp_path / "ours" / "x-000000.tar").read_bytes() == ref.read_bytes()
    assert w.info.shards[0].sha256 == _sha(ref) and w.info.shards[0].bytes == ref.stat().st_size


def test_rebuild_waits_for_readers_before_swapping_the_set_in(tmp_path: Path) -> None:
    """A reader holding the set's lock shared keeps the published set unchanged; the rebuild swaps in after."""
    import threading

    from gair_dataset.atomic import file_lock, lock_free

    out, lock = tmp_path / "set", tmp_path / "set.lock"
    write_shards(_samples(30), out, name="s", samples_per_shard=10)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    errors: list[BaseException] = []

    def rebuild() -> None:
        try:
            with ShardWriter(out, name="s", samples_per_shard=10, publish_lock=file_lock(lock)) as w:
                for s in _samples(12, seed=1):
                    w.write(s.key, s.rs, s.sv_jpeg, s.meta)
        except BaseException as exn:  # noqa: BLE001 - reported below
            errors.append(exn)

    with file_lock(lock, shared=True):  # a training run reading the set
        writer = threading.Thread(target=rebuild)
        writer.start()
        deadline = time.monotonic() + 30
        while len(list(out.glob(f"{STAGING_DIRNAME}-*/s-*.tar"))) < 2:  # both new shards staged
            assert time.monotonic() < deadline and writer.is_alive()
            time.sleep(0.01)
        writer.join(0.3)
        assert writer.is_alive()  # waiting for the reader
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    writer.join(30)
    assert not writer.is_alive() and not errors
    assert read_shards_json(out)["n_samples"] == 12 and sorted(p.name for p in out.glob("*.tar")) == \
        ["s-000000.tar", "s-000001.tar"]
    assert lock_free(lock) and not list(out.glob(f"{STAGING_DIRNAME}*"))


def test_a_swap_that_cannot_start_keeps_the_previous_set_and_removes_staging(tmp_path: Path) -> None:
    import contextlib

    write_shards(_samples(30), tmp_path, name="s", samples_per_shard=10)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    @contextlib.contextmanager
    def full_disk():
        raise OSError(28, "No space left on device")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="No space"):
        with ShardWriter(tmp_path, name="s", samples_per_shard=10, publish_lock=full_disk()) as w:
            for s in _samples(12, seed=1):
                w.write(s.key, s.rs, s.sv_jpeg, s.meta)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(f"{STAGING_DIRNAME}*"))
