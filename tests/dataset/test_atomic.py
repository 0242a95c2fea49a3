"""The one atomic-write helper (gair_dataset.atomic) and the shard writer's per-run staging folders."""

import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gair_dataset.atomic import (
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    lock_free,
    rw_file_lock,
    temp_path,
)
from gair_dataset.shards import STAGING_DIRNAME, ShardWriter, remove_stale_staging, staging_dirname


def test_writes_publish_complete_files_and_leave_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "f.json"
    assert atomic_write_json(out, {"a": 1}, indent=1) == out
    assert json.loads(out.read_text()) == {"a": 1}
    atomic_write_text(out, "x")
    assert out.read_text() == "x"
    atomic_write_bytes(out, b"\x00\x01", fsync=True)
    assert out.read_bytes() == b"\x00\x01"
    atomic_write(out, lambda tmp: Path(tmp).write_text("w"))
    assert out.read_text() == "w"
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.json"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # a plain open()'s permissions


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    out = tmp_path / "f.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_temporary_names_are_unique_per_call_and_hidden(tmp_path: Path) -> None:
    names = {temp_path(tmp_path / "f.parquet").name for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(".f.parquet.tmp-") and f"-{os.getpid()}-" in n for n in names)


def test_a_folder_replaces_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "old").write_text("1")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("2")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_threads_writing_one_file_never_collide(tmp_path: Path) -> None:
    out = tmp_path / "f.bin"
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                atomic_write_bytes(out, bytes([i]) * 10_000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = out.read_bytes()
    assert len(data) == 10_000 and len(set(data)) == 1  # one writer's complete content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def _hold(path: str, seconds: float, q: "multiprocessing.Queue[float]") -> None:
    with file_lock(path):
        q.put(time.monotonic())
        time.sleep(seconds)


def test_file_lock_serialises_processes(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "r.lock"
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue[float] = ctx.Queue()
    p = ctx.Process(target=_hold, args=(str(lock), 0.5, q))
    p.start()
    held_at = q.get(timeout=30)
    with file_lock(lock):
        got = time.monotonic()
    p.join()
    assert got - held_at >= 0.45
    with file_lock(lock, shared=True), file_lock(lock, shared=True):  # readers share it
        pass


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_rw_file_lock_lets_a_waiting_writer_in_before_later_readers(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "r.shards.lock"
    gate = lock.with_name(lock.name + ".gate")
    events: list[str] = []
    waited: list[str] = []

    def take(name: str, shared: bool, hold_s: float) -> None:
        with rw_file_lock(lock, shared=shared, on_wait=lambda: waited.append(name)):
            events.append(name)
            time.sleep(hold_s)

    with rw_file_lock(lock, shared=True):  # a training run reads the set
        writer = threading.Thread(target=take, args=("writer", False, 0.2))
        writer.start()
        _wait_for(lambda: waited == ["writer"])  # the rebuild holds the gate and waits to swap its set in
        assert not lock_free(gate)
        reader = threading.Thread(target=take, args=("later reader", True, 0.0))
        reader.start()
        _wait_for(lambda: "later reader" in waited)  # queued at the gate
        # Plain flock would have let the later reader in beside the first: the writer would still be waiting.
        assert events == []
        events.append("first reader done")
    writer.join(30)
    reader.join(30)
    assert events == ["first reader done", "writer", "later reader"]
    assert waited == ["writer", "later reader"]  # each told once that it had to wait
    with rw_file_lock(lock, shared=True, on_wait=lambda: waited.append("x")), rw_file_lock(lock, shared=True):
        pass  # readers still share it, without waiting
    assert waited == ["writer", "later reader"]


def test_each_writer_stages_apart_and_keeps_live_staging(tmp_path: Path) -> None:
    live = tmp_path / staging_dirname()  # this (live) process: never removed by another writer
    live.mkdir()
    dead = tmp_path / f"{STAGING_DIRNAME}-{live.name.split('-')[1]}-999999999-abc"
    dead.mkdir()
    other_host = tmp_path / f"{STAGING_DIRNAME}-elsewhere-1-abc"
    other_host.mkdir()
    legacy = tmp_path / STAGING_DIRNAME
    legacy.mkdir()
    assert sorted(remove_stale_staging(tmp_path)) == sorted([dead, legacy])
    w = ShardWriter(tmp_path, name="s", samples_per_shard=2)
    assert w.staging != live and w.staging.name.startswith(f"{STAGING_DIRNAME}-") and w.staging.is_dir()
    assert live.is_dir() and other_host.is_dir()
    with pytest.raises(RuntimeError), w:
        w.write("a_b", np.zeros((1, 2, 2), np.uint16), b"\xff\xd8jpeg", {"sv_id": "b"})
        raise RuntimeError("boom")
    assert not w.staging.exists()  # a failed writer removes its own staging folder
    assert live.is_dir() and not list(tmp_path.glob("*.tar")) and not (tmp_path / "shards.json").exists()
