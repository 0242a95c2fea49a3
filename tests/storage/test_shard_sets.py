"""Shard sets on a loopback S3: publish marker-last, list, stream into the loader, interrupted and stale publishes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gair_dataset import object_store
from gair_dataset.contract import MANIFEST_NAME, SHARDS_JSON_NAME
from gair_model.loader import build_dataset, compute_rs_stats, resolve_shards
from tests.synthetic_shards import write_synthetic_shards

torch.set_num_threads(1)


def _objects(bucket_url: str, prefix: str) -> list[str]:
    fs, root = object_store.filesystem(object_store.join(bucket_url, prefix))
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


def _batches(spec: str | Path) -> list[dict]:
    return list(build_dataset(str(spec), batch_size=8, rs_size=16, sv_size=24, resampled=False, shuffle_buffer=0,
                              split_by_node=False))


@pytest.fixture(scope="module")
def local_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("region-a")
    write_synthetic_shards(out, 40, rs_size=16, sv_size=24, samples_per_shard=16, seed=5, name="region-a")
    return out


def test_publish_list_and_stream_equal_the_local_read(s3, local_set: Path) -> None:
    bucket = s3.new_bucket()
    url = f"{bucket}/sets/region-a/"
    result = object_store.publish_shard_set(local_set, url)
    local_doc = json.loads((local_set / SHARDS_JSON_NAME).read_text())
    tars = [s["path"] for s in local_doc["shards"]]
    assert len(tars) == 3 and result.uploaded == [*tars, MANIFEST_NAME] and result.removed == []
    assert result.url == url and result.bytes_uploaded == sum(
        (local_set / n).stat().st_size for n in result.uploaded)
    assert _objects(bucket, "sets/region-a") == sorted([*tars, MANIFEST_NAME, SHARDS_JSON_NAME])
    assert object_store.read_bytes(object_store.join(url, tars[1])) == (local_set / tars[1]).read_bytes()

    assert object_store.read_shards_json(url) == local_doc
    listed = object_store.list_shard_sets(f"{bucket}/sets")
    assert [(s.url, s.name, s.n_samples, s.n_shards) for s in listed] == [
        (f"{bucket}/sets/region-a", "region-a", 40, 3)]
    assert resolve_shards(url) == [f"{bucket}/sets/region-a/{t}" for t in tars]

    remote, local = _batches(url), _batches(local_set)
    assert [b["key"] for b in remote] == [b["key"] for b in local]
    assert sum(len(b["key"]) for b in remote) == 40
    for rb, lb in zip(remote, local, strict=True):
        for name in ("rs", "sv", "lonlat", "rel_xy"):
            assert torch.equal(rb[name], lb[name]), name
        assert rb["meta"] == lb["meta"]
    assert compute_rs_stats(url, splits=None) == compute_rs_stats(str(local_set), splits=None)


def test_republish_is_a_no_op_and_a_smaller_set_removes_stale_tars(s3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    url = f"{bucket}/region-b"
    write_synthetic_shards(tmp_path, 30, rs_size=16, sv_size=24, samples_per_shard=10, seed=1, name="region-b")
    first = object_store.publish_shard_set(tmp_path, url)
    assert len(first.uploaded) == 4 and not first.unchanged  # 3 tars + manifest

    again = object_store.publish_shard_set(tmp_path, url)
    assert again.unchanged and again.uploaded == [] and again.bytes_uploaded == 0

    # The region shrinks: the writer drops region-b-000002.tar locally; the publish must drop it remotely too,
    # after the new marker, and the remote set must then read as the new one.
    write_synthetic_shards(tmp_path, 15, rs_size=16, sv_size=24, samples_per_shard=10, seed=2, name="region-b")
    smaller = object_store.publish_shard_set(tmp_path, url)
    assert smaller.removed == ["region-b-000002.tar"]
    assert _objects(bucket, "region-b") == ["manifest.parquet", "region-b-000000.tar", "region-b-000001.tar",
                                            "shards.json"]
    assert object_store.read_shards_json(url)["n_samples"] == 15
    assert [k for b in _batches(url) for k in b["key"]] == [k for b in _batches(tmp_path) for k in b["key"]]


def test_interrupted_publish_leaves_no_set(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.new_bucket()
    url = f"{bucket}/region-c/"
    old = tmp_path / "old"
    write_synthetic_shards(old, 20, rs_size=16, sv_size=24, samples_per_shard=10, seed=3, name="region-c")
    object_store.publish_shard_set(old, url)
    new = tmp_path / "new"
    write_synthetic_shards(new, 30, rs_size=16, sv_size=24, samples_per_shard=10, seed=4, name="region-c")

    # The upload of the second tar fails (a dropped connection): every other request reaches the real server.
    # (fsspec caches the filesystem instance, so the publish below uses this very object.)
    fs, _ = object_store.filesystem(url)
    assert object_store.filesystem(url)[0] is fs
    real_put = fs.put_file

    def failing_put(lpath, rpath, *args, **kwargs):
        if str(rpath).endswith("region-c-000001.tar"):
            raise ConnectionResetError("connection reset by peer")
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", failing_put)
    with pytest.raises(object_store.ObjectStoreError, match="region-c/ failed: ConnectionResetError"):
        object_store.publish_shard_set(new, url)
    # The old marker went first and the new one was never written: readers see no set (not a mix of two).
    assert SHARDS_JSON_NAME not in _objects(bucket, "region-c")
    assert "region-c-000000.tar" in _objects(bucket, "region-c")  # uploaded before the failure
    with pytest.raises(FileNotFoundError, match=r"no shards\.json"):
        object_store.read_shards_json(url)
    with pytest.raises(FileNotFoundError):
        resolve_shards(url)
    assert object_store.list_shard_sets(bucket) == []

    monkeypatch.setattr(fs, "put_file", real_put)
    retry = object_store.publish_shard_set(new, url)
    assert len(retry.uploaded) == 4
    assert object_store.read_shards_json(url) == json.loads((new / SHARDS_JSON_NAME).read_text())
    assert sum(len(b["key"]) for b in _batches(url)) == 30


def test_incomplete_local_set_is_not_published(s3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    write_synthetic_shards(tmp_path, 8, rs_size=16, sv_size=24, samples_per_shard=4, seed=0, name="region-d")
    (tmp_path / SHARDS_JSON_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        object_store.publish_shard_set(tmp_path, f"{bucket}/region-d")
    assert _objects(bucket, "") == []


def test_epoch_size_of_a_published_set_comes_from_its_shards_json(s3, local_set: Path) -> None:
    from gair_model.training.data import epoch_size_from_shards

    bucket = s3.new_bucket()
    url = f"{bucket}/sets/region-a/"
    object_store.publish_shard_set(local_set, url)
    urls = resolve_shards(url)
    assert epoch_size_from_shards(urls) == 40 == epoch_size_from_shards(resolve_shards(str(local_set)))
    assert epoch_size_from_shards(urls[:2]) == 32  # 16 + 16 of the three shards (16, 16, 8)
    assert epoch_size_from_shards([*urls, *resolve_shards(str(local_set))]) == 80  # remote and local mixed
    assert epoch_size_from_shards([f"{bucket}/nowhere/region-a/region-a-000000.tar"]) is None  # no marker: unknown
