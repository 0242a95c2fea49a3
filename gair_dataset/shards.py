"""Deterministic WebDataset shard writing for (RS chip, SV image, location) samples.

One sample per (SV image, RS tile) pair, see DESIGN.md section 3:

* key ``<tile_id>_<sv_id>``, made of ``[A-Za-z0-9_-]`` only (WebDataset splits keys at the
  first dot, so a dotted key would silently corrupt samples);
* members ``<key>.rs.npy`` (``np.save`` of a uint16 array, no pickle: ``bands x H x W`` for one date,
  ``dates x bands x H x W`` for two or more, see :func:`gair_dataset.contract.rs_dates`),
  ``<key>.sv.jpg`` (JPEG bytes) and ``<key>.json`` (metadata, see :func:`build_sample_json`);
* shards ``<name>-%06d.tar`` with fixed tar metadata (mtime, uid, gid, names, mode), so the
  same inputs in the same order give byte-identical shards;
* every shard is written into a staging folder of its own run,
  ``<out_dir>/.staging-<host>-<pid>-<random>/``; only when the whole set is written are the previous
  set's ``shards.json``/``manifest.parquet`` removed, the new shards ``os.replace``-d into place, the
  previous set's extra shards removed and the new manifest written. Until then the previous set stays
  published, complete and untouched (a failed or killed rebuild leaves it as it was, at the cost of
  disk space for both sets meanwhile); a failed run removes its staging folder, a killed run leaves
  it behind, and a later run on the same host removes it once its process is gone (a live run's
  staging folder is never touched);
* ``manifest.parquet`` (one row per sample, in write order) and ``shards.json`` (per-shard counts,
  bytes, sha256, and the batch diversity of the write order, see :func:`distinct_tiles_per_batch`)
  are written last, atomically; their presence marks a complete shard set.

The writer does not sort: samples are written in the order they arrive, which the caller makes
deterministic (the shards step interleaves tiles, see
:func:`gair_dataset.samples.interleave_order`, so that a batch rarely holds two samples of one
tile). Keys must be unique, which the writer checks; this keeps memory flat (one key per sample).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gair_dataset import contract
from gair_dataset.atomic import atomic_path, atomic_write_text, publish, unique_suffix
from gair_dataset.contract import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MEMBER_SUFFIXES,
    SHARD_PATTERN,
    SHARDS_JSON_NAME,
)

log = logging.getLogger(__name__)

STAGING_DIRNAME = ".staging"
"""Prefix of a writer's staging folder: ``<STAGING_DIRNAME>-<host>-<pid>-<random>`` (see :func:`staging_dirname`)."""

TAR_MTIME = 946_684_800
"""Fixed member mtime (2000-01-01T00:00:00Z) so re-runs give byte-identical shards."""
TAR_MODE = 0o444


class ShardWriteError(RuntimeError):
    """Raised on a contract violation while writing shards (bad key, order, dtype)."""


def validate_key_part(part: str, what: str = "key") -> str:
    """:func:`gair_dataset.contract.validate_key_part`, raising :class:`ShardWriteError` (a writer error)."""
    try:
        return contract.validate_key_part(part, what)
    except contract.ContractError as exc:
        raise ShardWriteError(str(exc)) from None


def sample_key(tile_id: str, sv_id: str) -> str:
    """The dot-free sample key ``<tile_id>_<sv_id>``; raises :class:`ShardWriteError` on a bad part."""
    return f"{validate_key_part(tile_id, 'tile_id')}_{validate_key_part(sv_id, 'sv_id')}"


def shard_name(name: str, index: int) -> str:
    """Return the file name of shard ``index`` of shard set ``name`` (``<name>-%06d.tar``)."""
    return SHARD_PATTERN.format(name=name, index=index)


def encode_rs(rs: np.ndarray) -> bytes:
    """Serialise an RS chip as ``.npy`` bytes (uint16, C order, no pickle).

    Args:
        rs: ``bands x H x W`` (one date) or ``dates x bands x H x W`` array; integer data that fits
            uint16 is converted. A single date given as ``1 x bands x H x W`` is stored as
            ``bands x H x W`` (:func:`gair_dataset.contract.canonical_rs`).

    Returns:
        The ``.npy`` file bytes.

    Raises:
        ShardWriteError: If the array is neither 3-D nor 4-D, or its values do not fit uint16.
    """
    try:
        arr = contract.canonical_rs(np.asarray(rs))
    except contract.ContractError as exc:
        raise ShardWriteError(str(exc)) from None
    if arr.dtype != np.uint16:
        if not np.issubdtype(arr.dtype, np.integer) or (
            arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535)
        ):
            raise ShardWriteError(f"rs must be uint16 (got {arr.dtype})")
        arr = arr.astype(np.uint16)
    arr = np.ascontiguousarray(arr)
    # same bytes as np.save(..., allow_pickle=False), with fewer copies
    return _npy_header(arr.shape, arr.dtype.str) + arr.tobytes()


@functools.lru_cache(maxsize=64)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def encode_json(meta: Mapping[str, Any]) -> bytes:
    """Serialise sample metadata deterministically (sorted keys, compact, UTF-8)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), default=_json_default,
                      allow_nan=False).encode("utf-8")


@dataclass(frozen=True)
class Sample:
    """One training sample before serialisation.

    Attributes:
        key: ``<tile_id>_<sv_id>`` (see :func:`sample_key`).
        rs: uint16 ``bands x H x W`` chip, or ``dates x bands x H x W`` for several dates.
        sv_jpeg: JPEG bytes of the street-view image.
        meta: The sample JSON (see :func:`build_sample_json`).
    """

    key: str
    rs: np.ndarray
    sv_jpeg: bytes
    meta: Mapping[str, Any]


@dataclass
class ShardInfo:
    """A shard that was written and moved into place."""

    path: str
    n_samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str


@dataclass
class ShardSetInfo:
    """Result of writing a shard set."""

    out_dir: str
    name: str
    shards: list[ShardInfo] = field(default_factory=list)
    manifest_path: str | None = None
    shards_json_path: str | None = None
    batch_diversity: dict[str, Any] | None = None
    """:func:`batch_diversity` of the write order (set with the manifest)."""

    @property
    def n_samples(self) -> int:
        """Total number of samples over all shards."""
        return sum(s.n_samples for s in self.shards)

    @property
    def paths(self) -> list[str]:
        """Absolute shard paths, in order."""
        return [s.path for s in self.shards]


class _BackgroundSha256:
    """SHA-256 computed on a helper thread (``hashlib`` releases the GIL on large buffers).

    Hashing then overlaps with writing (of this shard, and of the next one: the writer asks for a shard's digest
    only when the following shard is done); the bounded queue keeps memory flat.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._q: queue.Queue[Sequence[bytes] | None] = queue.Queue(maxsize=64)
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunks := self._q.get()) is not None:
            for b in chunks:
                self._sha.update(b)

    def update(self, chunks: Sequence[bytes]) -> None:
        """Queue byte strings to hash, in order (one queue operation for all of them)."""
        self._q.put(chunks)

    def finish(self) -> None:
        """No more chunks: the thread ends once they are all hashed."""
        if not self._finished:
            self._finished = True
            self._q.put(None)

    def hexdigest(self) -> str:
        """Wait for the hash of every chunk."""
        self.finish()
        self._thread.join()
        return self._sha.hexdigest()


_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 20 blocks
_ZERO_BLOCKS = bytes(_RECORD)


def _octal(n: int, digits: int) -> bytes:
    return b"%0*o\0" % (digits - 1, n)


def _member_header(name: str, size: int) -> bytes:
    """The tar header ``tarfile`` writes in PAX format for our fixed member metadata.

    Fast path for short ASCII names (always the case for validated keys): a plain ustar header,
    byte-identical to ``tarfile``'s; anything else is delegated to ``tarfile``.
    """
    raw = name.encode("ascii", "replace")
    if len(raw) > 100 or not name.isascii() or size >= 8**11:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, TAR_MTIME, TAR_MODE, 0, 0, "", ""
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = b"".join((
        raw.ljust(100, b"\0"), _octal(TAR_MODE, 8), _octal(0, 8), _octal(0, 8), _octal(size, 12),
        _octal(TAR_MTIME, 12), b"        ", tarfile.REGTYPE, bytes(100), tarfile.POSIX_MAGIC,
        bytes(64), bytes(16), bytes(155),  # uname, gname; devmajor/devminor empty as tarfile writes them
    )).ljust(_BLOCK, b"\0")
    chksum = sum(head)
    return head[:148] + b"%06o\0" % chksum + head[155:]


_MANIFEST_FIELDS = (
    "sv_id", "tile_id", "lon", "lat", "x", "y", "col", "row", "split", "datetime", "collection",
    "platform", "crs", "processing_baseline", "harmonized", "synthetic", "region",
)


def _manifest_row(key: str, shard: str, index: int, rs_shape: Sequence[int], sv_bytes: int,
                  meta: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "shard": shard, "index_in_shard": index}
    for name in _MANIFEST_FIELDS:
        row[name] = meta.get(name)
    item_ids = meta.get("item_ids") or ([meta["item_id"]] if meta.get("item_id") else [])
    row["item_id"] = item_ids[0] if item_ids else None
    row["item_ids"] = list(item_ids)
    bbox = meta.get("bbox") or [None] * 4
    row["lon_min"], row["lat_max"], row["lon_max"], row["lat_min"] = bbox
    row["bands"] = list(meta.get("bands") or [])
    shape = [int(v) for v in rs_shape]
    row["rs_dates"] = shape[0] if len(shape) == 4 else 1
    row["rs_bands"], row["rs_height"], row["rs_width"] = shape[-3:]
    row["sv_bytes"] = sv_bytes
    return row


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"


def staging_dirname() -> str:
    """A staging folder name unique to this writer: ``.staging-<host>-<pid>-<random>``."""
    return f"{STAGING_DIRNAME}-{_host_tag()}-{unique_suffix()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_staging(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging folders of ``out_dir`` whose writer is gone; returns what was removed.

    A folder is stale when it names this host and a process that no longer exists (a killed writer), or is the
    unversioned ``.staging`` of older writers. A live writer's folder, or one of another host (whose processes
    cannot be checked from here), is left alone.
    """
    removed = []
    host = _host_tag()
    for d in Path(out_dir).glob(f"{STAGING_DIRNAME}*"):
        if not d.is_dir():
            continue
        stale = d.name == STAGING_DIRNAME
        parts = d.name.rsplit("-", 3)  # .staging, host (no '-'), pid, random
        if len(parts) == 4 and parts[0] == STAGING_DIRNAME and parts[1] == host and parts[2].isdigit():
            stale = not _pid_alive(int(parts[2]))
        if stale:
            log.info("removing stale staging folder %s (interrupted run)", d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class ShardWriter:
    """Stream samples into deterministic, atomically published ``<name>-%06d.tar`` shards.

    Use as a context manager; :meth:`close` (called on a clean exit) publishes every shard and writes
    the manifest. On an exception (:meth:`abort`) the staged shards are dropped with this writer's
    staging folder, and the set published before (if any) is left as it was. Each writer stages in a
    folder of its own, so two writers never share a temporary file; two writing the same ``out_dir`` at
    once still replace each other's shards (the pipelines serialise them with the region lock).

    Example:
        >>> with ShardWriter(out_dir, name="train", samples_per_shard=500) as w:  # doctest: +SKIP
        ...     for s in samples_sorted_by_key:
        ...         w.write(s.key, s.rs, s.sv_jpeg, s.meta)
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, name: str = "shard",
                 samples_per_shard: int = 1000, fsync: bool = True, manifest: bool = True,
                 publish_lock: contextlib.AbstractContextManager[Any] | None = None) -> None:
        """Prepare ``out_dir``: a staging folder of this writer's own (a published set is left alone until close).

        Staging folders left by killed writers of this host are removed; another live writer's never is.

        Args:
            out_dir: Output folder (created if needed).
            name: Shard set name (``[A-Za-z0-9_-]+``), shards are ``<name>-%06d.tar``.
            samples_per_shard: Maximum samples per shard (shards are never empty).
            fsync: ``fsync`` each shard before publishing it (durability on power loss).
            manifest: Write ``manifest.parquet`` and ``shards.json`` on close.
            publish_lock: Held around the swap in :meth:`close` (e.g. an exclusive lock that readers of the set
                hold shared, so that the set never changes under them); None: no lock.
        """
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.name = validate_key_part(name, "shard set name")
        self.samples_per_shard = int(samples_per_shard)
        self.fsync = fsync
        self.write_manifest = manifest
        self.publish_lock = publish_lock
        self.staging = self.out_dir / staging_dirname()
        self.info = ShardSetInfo(out_dir=str(self.out_dir), name=self.name)
        self._rows: list[dict[str, Any]] = []
        self._index = 0
        self._fh: Any = None  # open staging file of the current shard, None between shards
        self._sha: _BackgroundSha256 | None = None
        self._hashing: list[tuple[ShardInfo, _BackgroundSha256]] = []  # finished shards whose digest is pending
        self._offset = 0
        self._n_in_shard = 0
        self._first_key = ""
        self._last_key: str | None = None
        self._keys: set[str] = set()
        self._closed = False

        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.out_dir)
        self.staging.mkdir()

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing ---------------------------------------------------------------------------
    def _open_shard(self) -> None:
        path = self.staging / shard_name(self.name, self._index)
        self._fh = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in _publish_shard
        self._sha = _BackgroundSha256()
        self._offset = 0
        self._n_in_shard = 0

    def _emit(self, chunks: Sequence[bytes]) -> None:
        write = self._fh.write
        for b in chunks:
            write(b)
            self._offset += len(b)
        assert self._sha is not None
        self._sha.update(chunks)

    def _publish_shard(self) -> None:
        assert self._fh is not None and self._sha is not None
        # end of archive as tarfile writes it: two zero blocks, then pad to a whole record
        end = 2 * _BLOCK
        end += (-(self._offset + end)) % _RECORD
        self._emit((_ZERO_BLOCKS[:end] if end <= _RECORD else bytes(end),))
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        self._sha.finish()
        final = self.out_dir / shard_name(self.name, self._index)  # its place once the whole set is written
        shard = ShardInfo(path=str(final), n_samples=self._n_in_shard, bytes=self._offset, sha256="",
                          first_key=self._first_key, last_key=self._last_key or "")
        self.info.shards.append(shard)
        self._hashing.append((shard, self._sha))
        self._fh = self._sha = None
        self._index += 1
        self._settle(keep=1)  # the last shard's hash goes on while the next one is written

    def _settle(self, keep: int = 0) -> None:
        """Wait for the digests of the finished shards, all but the ``keep`` most recent."""
        while len(self._hashing) > keep:
            shard, sha = self._hashing.pop(0)
            shard.sha256 = sha.hexdigest()

    def write_members(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Write one sample given its already-encoded members (low-level).

        Args:
            key: Sample key; must not have been written before (any order otherwise).
            members: ``(suffix, bytes)`` pairs, e.g. ``("rs.npy", b"...")``; written in order.

        Raises:
            ShardWriteError: On a bad or duplicate key.
        """
        if self._closed:
            raise ShardWriteError("writer is closed")
        validate_key_part(key)
        if key in self._keys:
            raise ShardWriteError(f"duplicate key {key!r}: keys must be unique within a shard set")
        self._keys.add(key)
        if self._fh is None:
            self._open_shard()
            self._first_key = key
        chunks: list[bytes] = []
        for suffix, member in members:
            data = bytes(member)
            chunks.append(_member_header(f"{key}.{suffix}", len(data)))
            chunks.append(data)
            pad = (-len(data)) % _BLOCK
            if pad:
                chunks.append(_ZERO_BLOCKS[:pad])
        self._emit(chunks)
        self._last_key = key
        self._n_in_shard += 1
        if self._n_in_shard >= self.samples_per_shard:
            self._publish_shard()

    def write(self, key: str, rs: np.ndarray, sv_jpeg: bytes, meta: Mapping[str, Any]) -> None:
        """Write one sample.

        Args:
            key: ``<tile_id>_<sv_id>``; unique within the shard set.
            rs: uint16 ``bands x H x W`` chip, or ``dates x bands x H x W`` for several dates.
            sv_jpeg: JPEG bytes.
            meta: Sample JSON (must be JSON-serialisable, no NaN).

        Raises:
            ShardWriteError: On a contract violation.
        """
        if not sv_jpeg:
            raise ShardWriteError(f"{key}: empty sv.jpg")
        rs_bytes = encode_rs(rs)
        json_bytes = encode_json(meta)
        shard = shard_name(self.name, self._index)
        index = self._n_in_shard if self._fh is not None else 0
        self.write_members(key, (("rs.npy", rs_bytes), ("sv.jpg", sv_jpeg), ("json", json_bytes)))
        if self.write_manifest:
            shape = contract.canonical_rs(np.asarray(rs)).shape
            self._rows.append(_manifest_row(key, shard, index, shape, len(sv_jpeg), meta))

    def abort(self) -> None:
        """Stop without publishing the current shard or writing a manifest; remove this writer's staging folder."""
        if self._fh is not None:
            try:
                self._fh.close()  # the partial shard is never published
            except OSError:
                pass
            if self._sha is not None:
                self._sha.hexdigest()  # stop the hashing thread
            self._fh = self._sha = None
        self._settle()  # the other hashing threads end
        self._closed = True
        shutil.rmtree(self.staging, ignore_errors=True)

    def close(self) -> ShardSetInfo:
        """Publish the set: finish the last shard and the manifest in staging, then swap them in.

        Everything that needs disk space is written before the swap; the swap itself only renames: the previous
        set's ``shards.json`` and manifest go first (an old manifest must never describe new shards), then every
        staged shard, then the new manifest and ``shards.json`` last. A crash in between leaves no ``shards.json``:
        the set reads as absent, never as complete with mixed shards. The staging folder is removed either way.
        """
        if self._closed:
            return self.info
        try:
            if self._fh is not None and self._n_in_shard > 0:
                self._publish_shard()
            self._settle()
            self._closed = True
            if self.write_manifest:
                self._write_manifest(self.staging)
            with self.publish_lock or contextlib.nullcontext():
                for fname in (SHARDS_JSON_NAME, MANIFEST_NAME):
                    (self.out_dir / fname).unlink(missing_ok=True)
                for shard in self.info.shards:
                    publish(self.staging / Path(shard.path).name, shard.path)
                written = {Path(s.path).name for s in self.info.shards}
                for old in self.out_dir.glob(f"{self.name}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
                    if old.name not in written:
                        log.info("removing stale shard %s from an earlier run", old)
                        old.unlink()
                if self.write_manifest:
                    for fname in (MANIFEST_NAME, SHARDS_JSON_NAME):  # shards.json last: the set is complete
                        publish(self.staging / fname, self.out_dir / fname)
                    self.info.manifest_path = str(self.out_dir / MANIFEST_NAME)
                    self.info.shards_json_path = str(self.out_dir / SHARDS_JSON_NAME)
        finally:
            self._closed = True
            shutil.rmtree(self.staging, ignore_errors=True)
        return self.info

    def _write_manifest(self, folder: Path) -> None:
        """Write ``manifest.parquet`` and ``shards.json`` of the set into ``folder``."""
        self.info.batch_diversity = batch_diversity([(str(r["key"]), r.get("tile_id")) for r in self._rows])
        shards_doc = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "n_samples": self.info.n_samples,
            "n_shards": len(self.info.shards),
            "members": list(MEMBER_SUFFIXES),
            "batch_diversity": self.info.batch_diversity,
            "shards": [
                {"path": Path(s.path).name, "n_samples": s.n_samples, "bytes": s.bytes,
                 "sha256": s.sha256, "first_key": s.first_key, "last_key": s.last_key}
                for s in self.info.shards
            ],
        }
        write_manifest_parquet(self._rows, folder / MANIFEST_NAME)
        atomic_write_text(folder / SHARDS_JSON_NAME, json.dumps(shards_doc, indent=2, sort_keys=True) + "\n")


BATCH_DIVERSITY_SIZE = 256
"""Batch size at which :func:`batch_diversity` measures a shard set's write order."""


def distinct_tiles_per_batch(tile_ids: Sequence[Any], batch_size: int = BATCH_DIVERSITY_SIZE) -> float:
    """Mean number of distinct tiles per block of ``batch_size`` consecutive samples.

    Measures the order samples are stored in (not the loader's shuffle): the samples are cut into
    consecutive blocks ``[0, batch_size), [batch_size, 2 * batch_size), ...``; a trailing partial
    block is ignored unless it is the only block.

    Args:
        tile_ids: The tile of every sample, in storage order.
        batch_size: Samples per block.

    Returns:
        The mean distinct-tile count per block (``batch_size`` at best); 0.0 without samples.

    Raises:
        ValueError: If ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ids = list(tile_ids)
    if not ids:
        return 0.0
    n_full = len(ids) // batch_size
    blocks = [ids[i * batch_size:(i + 1) * batch_size] for i in range(n_full)] or [ids]
    return sum(len(set(b)) for b in blocks) / len(blocks)


def batch_diversity(key_tiles: Sequence[tuple[str, Any]],
                    batch_size: int = BATCH_DIVERSITY_SIZE) -> dict[str, Any]:
    """Distinct tiles per batch of a shard set, in key order ("before") and in write order ("after").

    Key order (``<tile_id>_<sv_id>`` sorted) groups the samples of a tile together, which is how shards
    were written before format 2; the write order is what the shards hold.

    Args:
        key_tiles: ``(key, tile_id)`` of every sample, in write order (a missing tile id counts the
            sample as its own tile).
        batch_size: Samples per batch.

    Returns:
        ``{"batch_size", "n_samples", "n_tiles", "distinct_tiles_per_batch_before",
        "distinct_tiles_per_batch_after"}`` (the two means rounded to 4 decimals).
    """
    tiles = [str(t) if t is not None else f"key:{k}" for k, t in key_tiles]
    before = [t for _, t in sorted(zip((k for k, _ in key_tiles), tiles, strict=True))]
    return {
        "batch_size": int(batch_size),
        "n_samples": len(tiles),
        "n_tiles": len(set(tiles)),
        "distinct_tiles_per_batch_before": round(distinct_tiles_per_batch(before, batch_size), 4),
        "distinct_tiles_per_batch_after": round(distinct_tiles_per_batch(tiles, batch_size), 4),
    }


def write_manifest_parquet(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write the per-sample manifest as GeoParquet (point geometry, EPSG:4326), atomically.

    Args:
        rows: One mapping per sample (see the ``ShardWriter`` manifest columns).
        path: Destination ``.parquet`` path; written to a unique temporary sibling, then renamed
            (:func:`gair_dataset.atomic.atomic_path`).
    """
    import geopandas as gpd
    import pandas as pd

    path = Path(path)
    df = pd.DataFrame(list(rows))
    if df.empty:
        df = pd.DataFrame(columns=["key", "shard", "lon", "lat"])
    lon = pd.to_numeric(df["lon"], errors="coerce")
    lat = pd.to_numeric(df["lat"], errors="coerce")
    gdf = gpd.GeoDataFrame(df, geometry=gpd.points_from_xy(lon, lat), crs="EPSG:4326")
    with atomic_path(path) as tmp:
        gdf.to_parquet(tmp, index=False)


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike[str], *, name: str = "shard",
                 samples_per_shard: int = 1000, sort: bool = False, fsync: bool = True,
                 manifest: bool = True) -> ShardSetInfo:
    """Write samples into a complete shard set (shards, then manifest).

    Args:
        samples: Samples with unique keys, written in the given order (``sort=True`` sorts them by
            key first, which materialises them all in memory; fine for small sets).
        out_dir: Output folder.
        name: Shard set name; shards are ``<name>-%06d.tar``.
        samples_per_shard: Maximum samples per shard.
        sort: Sort the samples by key first.
        fsync: ``fsync`` every shard before publishing it.
        manifest: Write ``manifest.parquet`` and ``shards.json``.

    Returns:
        What was written.
    """
    if sort:
        samples = sorted(samples, key=lambda s: s.key)
    with ShardWriter(out_dir, name=name, samples_per_shard=samples_per_shard, fsync=fsync,
                     manifest=manifest) as writer:
        for s in samples:
            writer.write(s.key, s.rs, s.sv_jpeg, s.meta)
    return writer.info


def expected_shard_count(n_samples: int, samples_per_shard: int) -> int:
    """Return how many shards ``n_samples`` samples fill (no empty shards)."""
    return math.ceil(n_samples / samples_per_shard) if n_samples > 0 else 0


def read_shards_json(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``shards.json`` of a complete shard set.

    Raises:
        FileNotFoundError: If the set is incomplete (no ``shards.json``).
    """
    return json.loads((Path(out_dir) / SHARDS_JSON_NAME).read_text())


def list_shards(out_dir: str | os.PathLike[str]) -> list[str]:
    """Absolute paths of the shards of a complete shard set, in order (from ``shards.json``)."""
    doc = read_shards_json(out_dir)
    return [str(Path(out_dir) / s["path"]) for s in doc["shards"]]


def iter_raw_samples(shard: str | os.PathLike[str], limit: int | None = None, *,
                     on_bad_member: Callable[[str], None] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` per sample of one shard, undecoded (for checks and previews).

    Members are read in memory only (never extracted to disk), and only regular files named ``<key>.<suffix>``
    (:func:`gair_dataset.contract.check_tar_member`): an absolute path, a ``..`` component, a folder, a link
    (hard or symbolic), a device or a name off the key pattern is refused before its bytes are read.

    Args:
        shard: Path of a ``.tar`` shard.
        limit: Stop after this many samples (None: all).
        on_bad_member: Called with a message for each refused member, which is then skipped; None (default):
            the first refused member raises.

    Raises:
        contract.UnsafeMemberError: For a refused member when ``on_bad_member`` is None.
    """
    with tarfile.open(shard) as tar:
        current: str | None = None
        members: dict[str, bytes] = {}
        n = 0
        for m in tar:
            try:
                key, suffix = contract.check_tar_member(m)
            except contract.UnsafeMemberError as exc:
                if on_bad_member is None:
                    raise
                on_bad_member(str(exc))
                continue
            if current is not None and key != current:
                yield current, members
                n += 1
                if limit is not None and n >= limit:
                    return
                members = {}
            current = key
            fh = tar.extractfile(m)
            members[suffix] = fh.read() if fh is not None else b""
        if current is not None:
            yield current, members
