"""The training-sample contract: keys, member names, JSON fields, file names, and a safe ``.npy`` decoder.

Shared by the writer (:mod:`gair_dataset.shards`) and the loader (:mod:`gair_model.loader`). Only the standard
library and NumPy: the model side imports this module without pulling in GDAL, DuckDB or Dagster. See DESIGN.md
section 3 and docs/DATA_CONTRACT.md.
"""

from __future__ import annotations

import io
import math
import re

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

SHARD_PATTERN = "{name}-{index:06d}.tar"
MANIFEST_NAME = "manifest.parquet"
SHARDS_JSON_NAME = "shards.json"
FORMAT_VERSION = 1


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
