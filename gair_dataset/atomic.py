"""Atomic file writes and file locks: the one helper every stage, the trainer and the evaluation use.

Standard library only (no NumPy, GDAL, DuckDB, torch or Dagster), so both :mod:`gair_dataset` and :mod:`gair_model`
import it.

* :func:`atomic_path` yields a temporary path **unique to this process and call** (``.<name>.tmp-<pid>-<uuid>``) in
  the final file's folder; on success it is ``os.replace``-d onto the final path (a folder too: the old folder is
  moved aside first and removed after), on an error it is removed. Two runs writing the same file never share a
  temporary name, and a reader sees either the old or the new complete file, never half of one.
* :func:`atomic_write` (``writer(tmp_path)``), :func:`atomic_write_bytes`, :func:`atomic_write_text`,
  :func:`atomic_write_json` are the one-call forms.
* :func:`file_lock` is an advisory ``fcntl.flock`` lock (exclusive, or shared for readers) on a lock file; the
  pipelines hold one per region partition while a region asset writes (``pipelines.common.storage``).
* :func:`rw_file_lock` is the same with a gate that lets a waiting writer in before later readers (the published
  shard sets: read for hours, swapped at the end of a rebuild).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TMP_TAG = "tmp"


def unique_suffix() -> str:
    """``<pid>-<12 hex>``: unique to this process and call (threads of one process never collide)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def temp_path(final: str | os.PathLike[str], tag: str = TMP_TAG) -> Path:
    """A hidden sibling of ``final`` no other process or call uses: ``.<name>.<tag>-<pid>-<uuid>``."""
    final = Path(final)
    return final.with_name(f".{final.name}.{tag}-{unique_suffix()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file (every file of a folder) to disk."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                _fsync(p)
        return
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """``os.replace(tmp, final)``; a folder replaces an existing folder (moved aside, then removed)."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir() and final.is_dir() and not final.is_symlink():
        old = temp_path(final, "old")
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Write ``final`` through a unique temporary sibling, published only when the block succeeds.

    Args:
        final: The path to produce (a file, or a folder the block creates at the yielded path).
        fsync: Flush the written data (and the rename) to disk before returning.

    Yields:
        The temporary path to write (nothing exists there yet; its folder does).

    Example:
        >>> with atomic_path(out / "points.parquet") as tmp:  # doctest: +SKIP
        ...     df.to_parquet(tmp)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        publish(tmp, final)
        if fsync:
            _fsync_dir(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(final: str | os.PathLike[str], writer: Callable[[str], Any], *, fsync: bool = False) -> Path:
    """Write a file atomically: ``writer(tmp_path_as_str)``, then rename onto ``final``.

    Returns:
        The final path.
    """
    with atomic_path(final, fsync=fsync) as tmp:
        writer(str(tmp))
    return Path(final)


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Atomically write bytes."""
    with atomic_path(final, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | os.PathLike[str], text: str, *, fsync: bool = False,
                      encoding: str = "utf-8") -> Path:
    """Atomically write a text file."""
    with atomic_path(final, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(final)


def atomic_write_json(final: str | os.PathLike[str], obj: Any, *, fsync: bool = False, **dumps: Any) -> Path:
    """Atomically write ``json.dumps(obj, **dumps)`` (e.g. ``indent=1, default=str``)."""
    return atomic_write_text(final, json.dumps(obj, **dumps), fsync=fsync)


def lock_free(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`file_lock` would get ``path`` exclusively now (no one holds it); a snapshot, for tests."""
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return True
    except FileNotFoundError:
        return True


def _flock(fd: int, mode: int, on_wait: Callable[[], None] | None) -> None:
    """``flock(fd, mode)``, calling ``on_wait()`` first when it would block (to say so in a log)."""
    if on_wait is not None:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            on_wait()
    fcntl.flock(fd, mode)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, shared: bool = False,
              on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """Hold an advisory ``flock`` on ``path`` (created with its folder) for the block.

    Exclusive by default (one writer); ``shared=True`` lets readers hold it together while no writer does. The lock
    goes with the open file: it is released when the block ends, and by the OS when the process dies, so a crashed
    run never leaves a region locked. Blocks until granted; ``on_wait`` is called once before blocking.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        _flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX, on_wait)
        try:
            yield path
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def rw_file_lock(path: str | os.PathLike[str], *, shared: bool = False,
                 on_wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """A readers-writer :func:`file_lock` on ``path`` that does not let readers starve a waiting writer.

    Linux ``flock`` grants a shared lock whenever other shared holders have it, even while an exclusive request
    waits: readers that keep overlapping (training, then evaluation, then an ablation) would keep a writer waiting
    for ever. Here every taker first passes a gate (an exclusive lock on ``<path>.gate``, held only while taking
    ``path``); a writer keeps the gate while it waits, so readers arriving after it queue behind it, and the
    readers already in finish. Callers that hold several of these must take them in one order (sorted) to stay
    free of deadlocks. ``on_wait`` is called at most once, before blocking at the gate or at the lock.
    """
    path = Path(path)
    waited = False

    def once() -> None:
        nonlocal waited
        if on_wait is not None and not waited:
            waited = True
            on_wait()

    with contextlib.ExitStack() as held:
        with file_lock(path.with_name(path.name + ".gate"), on_wait=once):
            held.enter_context(file_lock(path, shared=shared, on_wait=once))
        yield path
