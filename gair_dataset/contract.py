"""The training-sample contract: keys, member names, JSON fields, file names, and a safe ``.npy`` decoder.

Shared by the writer (:mod:`gair_dataset.shards`) and the loader (:mod:`gair_model.loader`). Only the standard
library and NumPy: the model side imports this module without pulling in GDAL, DuckDB or Dagster. See DESIGN.md
section 3 and docs/DATA_CONTRACT.md.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
"""Allowed characters for sample keys and their parts (WebDataset splits keys at the first dot)."""

RS_MEMBER, SV_MEMBER, JSON_MEMBER = "rs.npy", "sv.jpg", "json"
MEMBER_SUFFIXES = (RS_MEMBER, SV_MEMBER, JSON_MEMBER)
"""The only members a training sample has (and the only ones the loader decodes)."""

REQUIRED_JSON_FIELDS = ("sv_id", "lon", "lat", "tile_id", "item_id", "item_ids", "datetime", "collection",
                        "platform", "crs", "bbox", "x", "y", "bands", "processing_baseline", "split")
"""Fields every sample's JSON carries (``bbox`` is ``[lon_min, lat_max, lon_max, lat_min]``; ``x, y`` in [0, 1]
from the tile's top-left)."""

DATE_FIELDS = ("item_id", "datetime", "platform", "processing_baseline", "harmonized", "cloud_cover")
"""Fields of each entry of a multi-date sample's JSON ``dates`` list (one entry per date of ``rs.npy``, same
order); for date 0 they equal the top-level fields of the same names."""

SHARD_PATTERN = "{name}-{index:06d}.tar"
MANIFEST_NAME = "manifest.parquet"
SHARDS_JSON_NAME = "shards.json"
FORMAT_VERSION = 2
"""``shards.json`` format: 1 = single-date samples in key order; 2 = ``rs.npy`` may hold several dates
(``D x C x H x W``), samples are written in an interleaved (not key) order, ``batch_diversity`` is recorded."""


class ContractError(ValueError):
    """A key or sample does not follow the contract."""


class SampleDecodeError(ValueError):
    """A sample in a shard is malformed (missing member, bad npy/jpg/json); readers skip it."""


def validate_key_part(part: str, what: str = "key") -> str:
    """Check that ``part`` is a non-empty ``[A-Za-z0-9_-]+`` string.

    Args:
        part: The key or key component to check.
        what: Name used in the error message.

    Returns:
        ``part`` unchanged.

    Raises:
        ContractError: If ``part`` is empty or holds any other character (a dot in particular).
    """
    if not isinstance(part, str) or not KEY_PATTERN.match(part):
        hint = " (dots split WebDataset keys)" if isinstance(part, str) and "." in part else ""
        raise ContractError(f"invalid {what} {part!r}: must match [A-Za-z0-9_-]+{hint}")
    return part


def sample_key(tile_id: str, sv_id: str) -> str:
    """The deterministic, dot-free sample key ``<tile_id>_<sv_id>``.

    Raises:
        ContractError: If either part is not ``[A-Za-z0-9_-]+``.
    """
    return f"{validate_key_part(tile_id, 'tile_id')}_{validate_key_part(sv_id, 'sv_id')}"


class UnsafeMemberError(SampleDecodeError):
    """A shard's tar member is not a plain ``<key>.<suffix>`` file (absolute path, ``..``, folder, link, device).

    Readers never extract such a member (nor any member) to disk: they report it as a bad sample and skip it.
    """


_MEMBER_SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")


def check_member_name(name: str) -> tuple[str, str]:
    """Split a shard member name into ``(key, suffix)``, refusing any name that is not ``<key>.<suffix>``.

    A member name must be a bare file name (no folder, no absolute path, no ``..`` component, no backslash), its
    key (before the first dot) must match :data:`KEY_PATTERN` and its suffix must be dot-separated
    ``[A-Za-z0-9_-]+`` parts. Unknown suffixes are *not* refused here (readers ignore them).

    Raises:
        UnsafeMemberError: With a message naming the member and what is wrong with it.
    """
    if not isinstance(name, str) or not name:
        raise UnsafeMemberError(f"tar member with an empty name {name!r}")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeMemberError(f"tar member {name!r}: absolute path")
    if ".." in parts:
        raise UnsafeMemberError(f"tar member {name!r}: '..' path component")
    if len(parts) > 1:
        raise UnsafeMemberError(f"tar member {name!r}: a path, not a bare <key>.<suffix> name")
    key, dot, suffix = name.partition(".")
    if not dot or not KEY_PATTERN.match(key) or not _MEMBER_SUFFIX_PATTERN.match(suffix):
        raise UnsafeMemberError(f"tar member {name!r}: not <key>.<suffix> with a [A-Za-z0-9_-]+ key")
    return key, suffix


_MEMBER_KINDS = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
                 b"5": "directory", b"6": "FIFO"}


def check_tar_member(member: Any) -> tuple[str, str]:
    """:func:`check_member_name` for a ``tarfile.TarInfo``, which must also be a regular file.

    Raises:
        UnsafeMemberError: For a link (hard or symbolic), device, FIFO, directory or any other non-regular member,
            or a bad name.
    """
    if not member.isreg():
        kind = _MEMBER_KINDS.get(member.type, f"non-regular member (type {member.type!r})")
        target = f" -> {member.linkname!r}" if member.islnk() or member.issym() else ""
        raise UnsafeMemberError(f"tar member {member.name!r}{target}: {kind}, only regular files are read")
    return check_member_name(member.name)


def rs_dates(rs: np.ndarray) -> np.ndarray:
    """View an ``rs.npy`` array as ``D x C x H x W`` (dates first), whatever its stored form.

    The contract stores a single date as ``C x H x W`` (unchanged since format 1) and several dates as
    ``D x C x H x W`` with ``D >= 2``; this gives both the same shape (no copy).

    Args:
        rs: The decoded ``rs.npy`` array.

    Returns:
        ``rs[None]`` for a 3-D array, ``rs`` itself for a 4-D one.

    Raises:
        ContractError: If the array is neither 3-D nor 4-D with at least one date.
    """
    arr = np.asarray(rs)
    if arr.ndim == 3:
        return arr[None]
    if arr.ndim == 4 and arr.shape[0] >= 1:
        return arr
    raise ContractError(f"rs must be C x H x W or D x C x H x W (D >= 1), got shape {arr.shape}")


def n_dates(rs: np.ndarray) -> int:
    """Number of dates ``D`` of an ``rs.npy`` array (1 for ``C x H x W``); see :func:`rs_dates`."""
    return int(rs_dates(rs).shape[0])


def canonical_rs(rs: np.ndarray) -> np.ndarray:
    """The stored form of ``rs``: ``C x H x W`` for one date, ``D x C x H x W`` for ``D >= 2`` dates.

    Raises:
        ContractError: As :func:`rs_dates`.
    """
    arr = rs_dates(rs)
    return arr[0] if arr.shape[0] == 1 else arr


def sample_dates(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-date metadata of a sample, one entry per date of its ``rs.npy``, in the same order.

    A multi-date sample's JSON carries them as ``dates``; a single-date sample (and every format-1 sample) has
    no ``dates`` list, and its one entry is made of the top-level :data:`DATE_FIELDS`.

    Args:
        meta: The sample's parsed JSON.

    Returns:
        A list of dicts with the keys of :data:`DATE_FIELDS`.
    """
    dates = meta.get("dates")
    if isinstance(dates, list) and dates:
        return [dict(d) for d in dates]
    return [{f: meta.get(f) for f in DATE_FIELDS}]


_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[uif][1248])', 'fortran_order': (False|True), 'shape': \(([0-9, ]*)\), \}\s*$"
)


def decode_npy(data: bytes) -> np.ndarray:
    """Decode ``.npy`` bytes without ever unpickling (object arrays are rejected).

    The common case (numeric dtype, format 1.0/2.0 header as written by ``np.save``) is parsed with a strict
    regular expression and ``np.frombuffer`` (no ``literal_eval``); anything else goes through
    ``np.load(..., allow_pickle=False)``.

    Raises:
        SampleDecodeError: For anything that is not a plain numeric array.
    """
    try:
        if data[:6] == b"\x93NUMPY" and data[6] in (1, 2):
            hl_size = 2 if data[6] == 1 else 4
            hlen = int.from_bytes(data[8:8 + hl_size], "little")
            start = 8 + hl_size
            m = _NPY_HEADER.match(data[start:start + hlen])
            if m:
                dtype = np.dtype(m.group(1).decode())
                shape = tuple(int(v) for v in m.group(3).split(b",") if v.strip())
                count = math.prod(shape)
                arr = np.frombuffer(data, dtype=dtype, count=count, offset=start + hlen)
                return arr.reshape(shape, order="F" if m.group(2) == b"True" else "C")
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exn:  # any failure means a bad member
        raise SampleDecodeError(f"bad rs.npy: {exn}") from exn
