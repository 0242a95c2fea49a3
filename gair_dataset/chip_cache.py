"""A per-tile cache of chips, so that a region rebuilt after a few catalog changes re-reads only the changed tiles.

A tile's entry is keyed by everything its chips are read from: the tile's grid (CRS, bounds, size), its
``item_ids`` in order, each of those STAC items as stored (unsigned; a changed ``updated`` time, asset or property
changes the key), the chip settings (bands, output size, nodata/cloud limits, dates) and :data:`CACHE_VERSION`
(bumped whenever the way chips are read changes). Equal keys hence mean equal chips. An entry holds the stacked
chip array and what the sample JSON needs of it (bands, harmonisation, baselines, date entries), or the reason the
tile was rejected by its data (nodata, clouds, already harmonised): an I/O failure is never cached.

Entries are ``<key>.npz`` files written atomically (``np.savez``, no pickle); a corrupt or unreadable entry is a
miss (and is replaced). :meth:`ChipCache.prune` keeps only the entries a build used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gair_dataset.atomic import atomic_path
from gair_dataset.bands import profile_data

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Part of every key: bump it when chip reading changes what a chip holds (old entries then miss)."""

TILE_FIELDS = ("tile_crs", "tile_minx", "tile_miny", "tile_maxx", "tile_maxy", "tile_width", "tile_height")


@dataclass
class CachedTile:
    """What the shard writer needs of a tile's chips.

    Attributes:
        array: ``C x H x W`` (one date) or ``D x C x H x W`` uint16; None when the tile was rejected.
        item_ids: The item of each date, in date order.
        bands: Band names of the chips.
        harmonized: Whether date 0 had the Sentinel-2 offset removed.
        processing_baseline: Date 0's processing baseline.
        dates: One sample-JSON date entry per date.
        rejected_reason: Why no date passed (None when the tile has chips).
    """

    array: np.ndarray | None
    item_ids: list[str]
    bands: list[str]
    harmonized: bool
    processing_baseline: str | None
    dates: list[dict[str, Any]]
    rejected_reason: str | None = None


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return list(v)


def _local_files(item: Mapping[str, Any]) -> list[list[Any]]:
    """``[href, size, mtime_ns]`` of the item's local asset files (a remote href is its own version)."""
    out = []
    for asset in (item.get("assets") or {}).values():
        href = str((asset or {}).get("href") or "")
        if not href or "://" in href.replace("file://", "", 1):
            continue
        try:
            st = os.stat(href.replace("file://", "", 1))
        except OSError:
            out.append([href, -1, -1])
            continue
        out.append([href, st.st_size, st.st_mtime_ns])
    return sorted(out)


def item_digest(item: Mapping[str, Any] | None) -> str | None:
    """sha256 hex of what a chip read takes from an item (None for a missing item), once per item, not per tile.

    The item's canonical JSON, its collection's band profile (bands to assets, nodata, offset handling, cloud
    mask: editable in the regions file) and the size and time of its local asset files (rewritten in place, they
    are read again).
    """
    if item is None:
        return None
    doc = {"item": item, "profile": profile_data(item.get("collection")), "files": _local_files(item)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tile_key(tile: Mapping[str, Any], item_digests: Mapping[str, str | None], settings: Mapping[str, Any]) -> str:
    """The cache key of a tile's chips (sha256 hex of a canonical JSON document).

    Args:
        tile: The tile row (``tile_*`` fields and ``item_ids``).
        item_digests: :func:`item_digest` of the unsigned STAC items by id (a missing id is part of the key).
        settings: The chip settings (bands, out_size, limits, max_dates, ...).
    """
    ids = [str(i) for i in _as_list(tile.get("item_ids"))]
    doc = {
        "version": CACHE_VERSION,
        "tile": {f: _plain(tile.get(f)) for f in TILE_FIELDS},
        "items": [[i, item_digests.get(i)] for i in ids],
        "settings": {k: _plain(v) for k, v in sorted(settings.items())},
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (tuple, np.ndarray)):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


class ChipCache:
    """Cached tiles under one folder (one per region)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        """Use ``root`` (created on the first write)."""
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # the counters: readers run on several threads

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> CachedTile | None:
        """The cached tile, or None (absent or unreadable: then it counts as a miss)."""
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode("utf-8"))
                array = z["array"] if meta.get("has_array") else None
            tile = CachedTile(array=array, item_ids=list(meta["item_ids"]), bands=list(meta["bands"]),
                              harmonized=bool(meta["harmonized"]), processing_baseline=meta["processing_baseline"],
                              dates=list(meta["dates"]), rejected_reason=meta.get("rejected_reason"))
        except FileNotFoundError:
            self._count(hit=False)
            return None
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exn:
            log.warning("chip cache entry %s unreadable (%s): reading the tile again", path.name, exn)
            self._count(hit=False)
            return None
        self._count(hit=True)
        return tile

    def _count(self, *, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def put(self, key: str, tile: CachedTile) -> None:
        """Store a tile (atomically: readers see the old entry, or none, or the whole new one)."""
        meta = {"item_ids": tile.item_ids, "bands": tile.bands, "harmonized": tile.harmonized,
                "processing_baseline": tile.processing_baseline, "dates": tile.dates,
                "rejected_reason": tile.rejected_reason, "has_array": tile.array is not None}
        self.root.mkdir(parents=True, exist_ok=True)
        # An open file, not the temporary path: np.savez would append ".npz" to a name not ending with it.
        with atomic_path(self._path(key)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, array=tile.array if tile.array is not None else np.zeros(0, np.uint16),
                     meta=np.frombuffer(json.dumps(meta, default=str).encode("utf-8"), dtype=np.uint8))

    def prune(self, keep: Iterable[str]) -> int:
        """Remove every entry whose key is not in ``keep``; returns how many were removed."""
        wanted = set(keep)
        removed = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.glob("*.npz"):
            if path.stem not in wanted:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def keys(self) -> Sequence[str]:
        """Keys of the stored entries."""
        return sorted(p.stem for p in self.root.glob("*.npz")) if self.root.is_dir() else []
