"""Turn pairs (SV point x RS tile) into WebDataset samples: chip + SV image + sample JSON.

:func:`build_shards_from_pairs` is the one call a pipeline asset needs: it joins each pair with its
tile's attributes (``tiles.parquet``, by ``tile_id``: the pairs table does not repeat them), sorts the
pairs by sample key, reads each tile's chips once (up to ``max_dates`` of the tile's items that pass the
nodata/cloud limits, least cloudy first: the sample's ``rs.npy`` holds every date), validates and
normalises each SV image (perspective crop for 360 panoramas), writes the shard set with the tiles of
each window of ``interleave_tiles`` tiles interleaved (:func:`interleave_order`, so that consecutive
samples come from different tiles), and reports every rejected pair with a reason so that
``n_pairs == n_written + n_rejected``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from gair_dataset.chip_cache import CachedTile, ChipCache, item_digest, tile_key
from gair_dataset.chips import ChipReader, ChipResult, TileSpec
from gair_dataset.shards import ShardSetInfo, ShardWriteError, ShardWriter, sample_key
from gair_dataset.signing import Signer, redact_text
from gair_dataset.svimage import normalize_sv_image, panorama_crops, read_image_uri

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_INTERLEAVE_TILES = 512
"""Tiles interleaved together by the shards step (their chips are held in memory meanwhile)."""


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    try:
        return list(v)
    except TypeError:
        return [v]


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def build_sample_json(pair: Mapping[str, Any], item: Mapping[str, Any] | None, sv_bytes: bytes, *,
                      bands: Sequence[str], harmonized: bool, processing_baseline: str | None = None,
                      synthetic: bool = False, extra: Mapping[str, Any] | None = None,
                      dates: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Build the per-sample JSON of the data contract from a pairs row and its STAC item.

    Args:
        pair: One row of ``pairs.parquet`` joined with its tile's row of ``tiles.parquet`` (``sv_id,
            lon, lat, tile_id, x, y, col, row, split, region`` from the pair; ``grid, tile_crs, lon_min,
            lat_max, lon_max, lat_min, item_ids, collection`` from the tile).
        item: The STAC item the chip was read from (None for synthetic data).
        sv_bytes: The ``sv.jpg`` bytes written with the sample (their size is recorded).
        bands: Band names of ``rs.npy`` in order.
        harmonized: Whether the Sentinel-2 offset was removed from the chip.
        processing_baseline: ``s2:processing_baseline`` of the item.
        synthetic: Mark the sample as synthetic.
        extra: More fields to add (must be JSON-serialisable).
        dates: Per-date entries (:func:`date_entry`) of a multi-date ``rs.npy``, date 0 first (``item``
            is date 0's item). Written as ``dates`` only when there are two or more: a single-date
            sample's JSON is unchanged.

    The street-view provenance columns of the points table (``source, license, attribution, source_url``), when
    the pair carries them non-null, become ``sv_source, sv_license, sv_attribution, sv_source_url``; a pair from a
    file source has none, so its JSON is unchanged.

    Returns:
        The JSON-ready dict.
    """
    props = (item or {}).get("properties", {})
    item_ids = [str(i) for i in _as_list(pair.get("item_ids"))]
    item_id = (item or {}).get("id") or (item_ids[0] if item_ids else None)
    if item_id is not None and item_id not in item_ids:
        item_ids = [str(item_id), *item_ids]
    meta: dict[str, Any] = {
        "sv_id": str(pair["sv_id"]),
        "lon": float(pair["lon"]),
        "lat": float(pair["lat"]),
        "tile_id": str(pair["tile_id"]),
        "item_id": item_id,
        "item_ids": item_ids,
        "datetime": props.get("datetime") or (item or {}).get("datetime"),
        "collection": (item or {}).get("collection") or pair.get("collection"),
        "platform": props.get("platform") or props.get("constellation"),
        "crs": str(pair.get("tile_crs")) if pair.get("tile_crs") is not None else None,
        "grid": pair.get("grid"),
        "bbox": [float(pair["lon_min"]), float(pair["lat_max"]), float(pair["lon_max"]),
                 float(pair["lat_min"])],
        "x": float(pair["x"]),
        "y": float(pair["y"]),
        "col": int(pair["col"]),
        "row": int(pair["row"]),
        "bands": list(bands),
        "processing_baseline": processing_baseline,
        "harmonized": bool(harmonized),
        "split": pair.get("split"),
        "region": pair.get("region"),
        "heading": _num(pair.get("heading")),
        "captured_at": None if pair.get("captured_at") is None else str(pair.get("captured_at")),
        "cloud_cover": _num(props.get("eo:cloud_cover")),
        "sv_bytes": len(sv_bytes),
        "synthetic": bool(synthetic),
    }
    if dates is not None and len(dates) >= 2:
        meta["dates"] = [dict(d) for d in dates]
    for key in ("source", "license", "attribution", "source_url"):  # SV provenance (API sources), when known
        value = pair.get(key)
        if value is not None and not pd.isna(value):  # None, NaN and pd.NA (nullable string columns) are unknown
            meta[f"sv_{key}"] = str(value)
    if extra:
        meta.update(extra)
    return meta


def date_entry(item: Mapping[str, Any] | None, chip: ChipResult) -> dict[str, Any]:
    """One entry of a sample JSON's ``dates`` list (:data:`gair_dataset.contract.DATE_FIELDS`).

    Args:
        item: The STAC item the date's chip was read from.
        chip: That chip.

    Returns:
        ``{item_id, datetime, platform, processing_baseline, harmonized, cloud_cover}``, built like the
        top-level fields of :func:`build_sample_json`.
    """
    item = item or {}
    props = item.get("properties", {})
    return {
        "item_id": item.get("id") or chip.item_id,
        "datetime": props.get("datetime") or item.get("datetime"),
        "platform": props.get("platform") or props.get("constellation"),
        "processing_baseline": chip.processing_baseline,
        "harmonized": bool(chip.harmonized),
        "cloud_cover": _num(props.get("eo:cloud_cover")),
    }


@dataclass
class Rejection:
    """A pair that did not become a sample."""

    key: str
    sv_id: str
    tile_id: str
    stage: str  # "key" | "tile" | "chip" | "sv" | "item"
    reason: str


@dataclass
class BuildReport:
    """What :func:`build_shards_from_pairs` did."""

    n_pairs: int = 0
    n_written: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    shards: ShardSetInfo | None = None
    n_chip_reads: int = 0
    n_chip_retries: int = 0
    """Tiles read a second time after an I/O error (a connection cut mid-read, say)."""
    n_unrecovered_tiles: int = 0
    """Tiles whose read failed again after the retry (rejected, or short of a date): not a verdict on the data."""
    n_cached_tiles: int = 0
    """Tiles whose chips came from the chip cache (not read)."""
    n_chip_resigned: int = 0
    """Chip reads refused with HTTP 403 (an expired or revoked signature) and re-signed with a fresh token."""
    n_reencoded_sv: int = 0
    n_panorama_crops: int = 0
    dates_per_sample: Counter[int] = field(default_factory=Counter)
    """Samples written per number of dates in their ``rs.npy``."""

    @property
    def n_rejected(self) -> int:
        """Number of rejected pairs."""
        return len(self.rejections)

    def rejected_by_reason(self) -> dict[str, int]:
        """Count rejections per ``stage: first word of the reason`` (for metadata and logs)."""
        return dict(Counter(f"{r.stage}: {r.reason.split(':')[0].split(' ')[0]}" for r in self.rejections))


def _pair_records(pairs: Any) -> list[dict[str, Any]]:
    if hasattr(pairs, "to_dict"):
        df = pairs.drop(columns=["geometry"], errors="ignore") if hasattr(pairs, "drop") else pairs
        return df.to_dict("records")
    return [dict(p) for p in pairs]


def tiles_by_id(tiles: Any) -> dict[str, dict[str, Any]]:
    """Index tile rows (``tiles.parquet`` as a (Geo)DataFrame, or row mappings) by ``tile_id``, without geometry."""
    out: dict[str, dict[str, Any]] = {}
    for t in _pair_records(tiles):
        t.pop("geometry", None)
        out[str(t["tile_id"])] = t
    return out


def build_shards_from_pairs(
    pairs: Any, items: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike[str], *,
    tiles: Any = None, name: str = "shard", samples_per_shard: int = 1000, bands: Sequence[str] | None = None,
    out_size: int | None = None, signer: Signer | None = None, max_nodata_fraction: float = 0.1,
    max_cloud_fraction: float | None = 0.1, sv_max_side: int | None = 1024, pano_fov_deg: float = 90.0,
    pano_out_size: int = 512, synthetic: bool = False, gdal_env: Mapping[str, Any] | None = None,
    fetch_image: Callable[[str], bytes] = read_image_uri, fsync: bool = True, chip_workers: int = 4,
    max_dates: int | None = None, interleave_tiles: int = DEFAULT_INTERLEAVE_TILES,
    publish_lock: contextlib.AbstractContextManager[Any] | None = None, chip_cache: ChipCache | None = None,
) -> BuildReport:
    """Build a shard set from pairs, skipping and reporting unusable pairs.

    Args:
        pairs: ``pairs.parquet`` as a (Geo)DataFrame or an iterable of row mappings.
        items: STAC items (dicts, unsigned hrefs) by item id.
        out_dir: Shard set folder.
        tiles: ``tiles.parquet`` (a (Geo)DataFrame or row mappings): each pair is joined with its tile's row by
            ``tile_id`` (the pair's own columns win), which gives the chip window and the JSON's CRS, bbox,
            grid, item ids and collection. A pair whose tile is missing is rejected (stage ``tile``). None:
            the pairs rows already carry those columns.
        name: Shard set name (``<name>-%06d.tar``).
        samples_per_shard: Maximum samples per shard.
        bands: Band names (default: the collection's band set).
        out_size: Chip side length (default: the tile's own grid).
        signer: Href signer for remote assets (e.g. ``planetary_computer.sign``).
        max_nodata_fraction: Chip nodata limit.
        max_cloud_fraction: Chip SCL cloud limit (None: no check).
        sv_max_side: Longest side of stored SV images.
        pano_fov_deg: Field of view of the perspective crop cut from 360 panoramas (centred on
            the pair's ``heading`` when present, else the panorama centre).
        pano_out_size: Side of that crop.
        synthetic: Mark every sample as synthetic.
        gdal_env: Extra GDAL options for the chip reader.
        fetch_image: ``uri -> bytes`` (default: local path or http(s)).
        fsync: ``fsync`` shards before publishing.
        chip_workers: Threads reading chips ahead of the writer (each with its own reader); this also
            bounds the number of concurrent remote reads. 1 reads in the calling thread's order only.
        max_dates: Dates per sample: a tile's chip is read from every item of its ``item_ids`` (least
            cloudy first) that passes the nodata/cloud limits, up to this many; the sample's ``rs.npy``
            is ``C x H x W`` for one date, ``D x C x H x W`` for ``D >= 2``. None: every passing item (the
            tile grid already keeps at most ``items_per_tile`` per tile). 1 gives single-date samples.
        interleave_tiles: Tiles (in key order) whose samples are interleaved together by
            :func:`interleave_order`; their chips are held in memory until the window is written
            (about ``interleave_tiles x dates x C x H x W x 2`` bytes). 1 keeps the key order.
        publish_lock: Held while the finished set replaces the published one (see :class:`ShardWriter`).
        chip_cache: Tiles whose chips were read before from the same items and settings come from it (and
            every tile read is stored); after a successful build it keeps only this build's tiles.

    Returns:
        A :class:`BuildReport`; ``n_pairs == n_written + n_rejected``.
    """
    if max_dates is not None and max_dates < 1:
        raise ValueError("max_dates must be >= 1 (or None)")
    if interleave_tiles < 1:
        raise ValueError("interleave_tiles must be >= 1")
    report = BuildReport()
    tile_index = None if tiles is None else tiles_by_id(tiles)
    keyed: list[tuple[str, dict[str, Any]]] = []
    for row in _pair_records(pairs):
        report.n_pairs += 1
        try:
            key = sample_key(str(row["tile_id"]), str(row["sv_id"]))
        except ShardWriteError as exn:
            report.rejections.append(
                Rejection("", str(row.get("sv_id")), str(row.get("tile_id")), "key", str(exn)))
            continue
        record = row
        if tile_index is not None:
            tile = tile_index.get(str(row["tile_id"]))
            if tile is None:
                report.rejections.append(Rejection(key, str(row["sv_id"]), str(row["tile_id"]), "tile",
                                                   "missing: tile_id not in the tile table"))
                continue
            record = {**tile, **row}  # the pair's own columns win (split is in both)
        keyed.append((key, record))
    keyed.sort(key=lambda kp: kp[0])
    # Group by tile (tiles in key order, a tile's pairs in key order); duplicates of a key are rejected.
    by_tile: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    prev = None
    for key, p in keyed:
        if key == prev:
            report.rejections.append(Rejection(key, str(p["sv_id"]), str(p["tile_id"]), "key", "duplicate key"))
            continue
        prev = key
        by_tile.setdefault(str(p["tile_id"]), []).append((key, p))
    tile_ids = list(by_tile)
    chip_kw = {"bands": bands, "out_size": out_size, "max_nodata_fraction": max_nodata_fraction,
               "max_cloud_fraction": max_cloud_fraction}
    with ChipPrefetcher([by_tile[t][0][1] for t in tile_ids], items, workers=chip_workers, signer=signer,
                        gdal_env=gdal_env, max_dates=max_dates, cache=chip_cache, **chip_kw) as chips, ShardWriter(
        out_dir, name=name, samples_per_shard=samples_per_shard, fsync=fsync, publish_lock=publish_lock
    ) as writer:
        for start in range(0, len(tile_ids), interleave_tiles):
            window: dict[str, TileChips] = {}
            groups: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []
            for tile_id in tile_ids[start:start + interleave_tiles]:
                tc = chips.get(tile_id)
                if not tc.ok:
                    for key, p in by_tile[tile_id]:
                        report.rejections.append(Rejection(key, str(p["sv_id"]), tile_id, "chip",
                                                           tc.rejected_reason or "no data"))
                    continue
                window[tile_id] = tc
                groups.append((tile_id, by_tile[tile_id]))
            for key, p in interleave_order(groups):
                sv_id, tile_id = str(p["sv_id"]), str(p["tile_id"])
                tc = window[tile_id]
                sv_bytes, why = _sv_for(p, fetch_image, report, sv_max_side, pano_fov_deg, pano_out_size)
                if sv_bytes is None:
                    report.rejections.append(Rejection(key, sv_id, tile_id, "sv", why or "invalid"))
                    continue
                chip0 = tc.chips[0]
                meta = build_sample_json(p, tc.items[0], sv_bytes, bands=chip0.bands, harmonized=chip0.harmonized,
                                         processing_baseline=chip0.processing_baseline, synthetic=synthetic,
                                         dates=tc.dates)
                assert tc.array is not None
                writer.write(key, tc.array, sv_bytes, meta)
                report.n_written += 1
                report.dates_per_sample[len(tc.chips)] += 1
    report.n_chip_reads = chips.n_reads
    report.n_chip_retries = chips.n_retries
    report.n_chip_resigned = chips.n_resigned
    report.n_unrecovered_tiles = chips.n_unrecovered
    report.n_cached_tiles = chips.keep_cached()  # only after a build that succeeded
    report.shards = writer.info
    log.info("shards %s: %d pairs -> %d samples (dates per sample %s), %d rejected %s", name, report.n_pairs,
             report.n_written, dict(sorted(report.dates_per_sample.items())), report.n_rejected,
             report.rejected_by_reason())
    return report


def _phase(tile_id: str) -> float:
    """A deterministic pseudo-random fraction in [0, 1) per tile (BLAKE2b, stable across runs and platforms)."""
    digest = hashlib.blake2b(tile_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def interleave_order(groups: Sequence[tuple[str, Sequence[T]]]) -> list[T]:
    """Deterministically interleave the samples of several tiles so that a tile's samples lie far apart.

    Each tile's ``k`` samples are spread evenly over the output: sample ``j`` (in the given order) sits at
    ``(j + phase) / k``, where ``phase`` in [0, 1) is a hash of the tile id (so single-sample tiles are
    scattered, not bunched at the start), and the output is sorted by that position (ties: phase, then tile
    id, then ``j``). A tile with ``k`` of the ``n`` samples thus recurs about every ``n / k`` samples, the
    widest spacing possible, and no randomness is involved: the same groups give the same order.

    Args:
        groups: ``(tile_id, samples)`` per tile; tile ids must be distinct.

    Returns:
        Every sample of every group, interleaved.
    """
    ranked: list[tuple[float, float, str, int, int, int]] = []
    for g, (tile_id, members) in enumerate(groups):
        k, phase = len(members), _phase(tile_id)
        ranked.extend(((j + phase) / k, phase, tile_id, j, g, j) for j in range(k))
    ranked.sort()
    return [groups[g][1][j] for *_, g, j in ranked]


@dataclass
class TileChips:
    """The chips of one tile: one per date that passed the limits, date 0 the least cloudy.

    Attributes:
        chips: The passing chips (their arrays are dropped once stacked into ``array``).
        items: The STAC item of each chip.
        array: ``C x H x W`` for one date, ``D x C x H x W`` for ``D >= 2`` (None when rejected).
        dates: One :func:`date_entry` per chip.
        rejected_reason: Why no chip passed (None when there is at least one).
    """

    chips: list[ChipResult]
    items: list[Mapping[str, Any] | None]
    array: np.ndarray | None
    dates: list[dict[str, Any]]
    rejected_reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when at least one date passed."""
        return self.rejected_reason is None and self.array is not None


class ChipPrefetcher:
    """Reads the chips of tiles in order, up to ``2 * workers`` tiles ahead, on a bounded thread pool.

    Each worker thread owns a :class:`ChipReader` (rasterio datasets are not shared across threads).
    ``get(tile_id)`` must be called in tile order; a tile's chips are read once, trying its items in
    ``item_ids`` order (least cloudy first) and keeping every one that passes the nodata/cloud limits, up
    to ``max_dates`` (None: all). A tile whose read failed on I/O (not on its data) is read once more by
    ``get``, in the calling thread once every read in flight has finished, with GDAL's cached bytes of the
    failed files dropped first: the tile order, hence the output, is the same as a read that never failed.
    """

    def __init__(self, tiles: Sequence[Mapping[str, Any]], items: Mapping[str, Mapping[str, Any]], *,
                 workers: int = 4, signer: Signer | None = None, gdal_env: Mapping[str, Any] | None = None,
                 max_dates: int | None = None, cache: ChipCache | None = None, **chip_kw: Any) -> None:
        self.tiles = list(tiles)
        self._rows = {str(p["tile_id"]): p for p in self.tiles}
        self.items = items
        self.workers = max(1, int(workers))
        self.max_dates = max_dates
        self.signer, self.gdal_env, self.chip_kw = signer, gdal_env, chip_kw
        self.n_reads = 0
        self.n_retries = 0
        self.n_unrecovered = 0
        self.cache = cache
        self.cache_keys: set[str] = set()  # of every tile asked for (pruning keeps these)
        self._settings = {**chip_kw, "max_dates": max_dates}
        self._digests: dict[str, str | None] | None = None
        self._local = threading.local()
        self._readers: list[ChipReader] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="chips")
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._next = 0
        self._current: tuple[str | None, TileChips | None] = (None, None)

    def __enter__(self) -> ChipPrefetcher:
        self._fill()
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in self._futures.values():
            f.cancel()
        self._pool.shutdown(wait=True)
        for reader in self._readers:
            reader.close()

    def _reader(self) -> ChipReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = ChipReader(signer=self.signer, gdal_env=self.gdal_env)
            with self._lock:
                self._readers.append(reader)
        return reader

    @property
    def n_resigned(self) -> int:
        """Reads re-signed after an HTTP 403, over every reader thread."""
        with self._lock:
            return sum(r.n_resigned for r in self._readers)

    def _fill(self) -> None:
        while self._next < len(self.tiles) and len(self._futures) < 2 * self.workers:
            p = self.tiles[self._next]
            self._futures[str(p["tile_id"])] = self._pool.submit(self._read, p)
            self._next += 1

    def _read(self, p: Mapping[str, Any]) -> tuple[TileChips, int, list[str]]:
        """A tile's chips: from the cache when its key is there, else read (and stored unless a read failed)."""
        if self.cache is None:
            return self._read_tile(p)
        key = tile_key(p, self._item_digests(), self._settings)
        with self._lock:
            self.cache_keys.add(key)
        hit = self.cache.get(key)
        if hit is not None:
            return self._from_cache(hit), 0, []
        tc, reads, failed = self._read_tile(p)
        if not failed:
            try:
                self.cache.put(key, CachedTile(
                    array=tc.array, item_ids=[str((it or {}).get("id")) for it in tc.items],
                    bands=list(tc.chips[0].bands) if tc.chips else [],
                    harmonized=bool(tc.chips[0].harmonized) if tc.chips else False,
                    processing_baseline=tc.chips[0].processing_baseline if tc.chips else None,
                    dates=tc.dates, rejected_reason=tc.rejected_reason))
            except OSError as exn:  # the cache only saves work: the build goes on (a full disk fails the shards)
                log.warning("chip cache: tile %s not stored: %s", p.get("tile_id"), exn)
        return tc, reads, failed

    def _item_digests(self) -> dict[str, str | None]:
        with self._lock:
            if self._digests is None:
                self._digests = {i: item_digest(it) for i, it in self.items.items()}
            return self._digests

    def keep_cached(self) -> int:
        """Prune the cache to the tiles of this build; returns how many tiles came from it (0 without a cache)."""
        if self.cache is None:
            return 0
        removed = self.cache.prune(self.cache_keys)
        if removed:
            log.info("chip cache: %d entries of tiles no longer built (or read from other items) removed", removed)
        return self.cache.hits

    def _from_cache(self, hit: CachedTile) -> TileChips:
        if hit.rejected_reason is not None or hit.array is None:
            return TileChips([], [], None, [], rejected_reason=hit.rejected_reason or "no data")
        chips = [ChipResult(array=None, bands=list(hit.bands), nodata_fraction=0.0,
                            harmonized=hit.harmonized if d == 0 else bool(entry.get("harmonized")),
                            processing_baseline=hit.processing_baseline if d == 0 else entry.get("processing_baseline"),
                            item_id=iid)
                 for d, (iid, entry) in enumerate(zip(hit.item_ids, hit.dates, strict=True))]
        return TileChips(chips, [self.items.get(iid) for iid in hit.item_ids], hit.array, hit.dates)

    def _read_tile(self, p: Mapping[str, Any]) -> tuple[TileChips, int, list[str]]:
        tile = TileSpec.from_row(p)
        reasons: list[str] = []
        failed: list[str] = []
        reads = 0
        chips: list[ChipResult] = []
        used: list[Mapping[str, Any] | None] = []
        for item_id in _as_list(p.get("item_ids")):
            if self.max_dates is not None and len(chips) >= self.max_dates:
                break
            item = self.items.get(str(item_id))
            if item is None:
                reasons.append(f"{item_id}: item not found")
                continue
            reads += 1
            chip = self._reader().read(item, tile, **self.chip_kw)
            failed.extend(chip.failed_hrefs)
            if not chip.ok or chip.array is None:
                reasons.append(f"{item_id}: {chip.rejected_reason}")
                continue
            first = chips[0].array if chips else None
            if first is not None and (chip.array.shape != first.shape or chip.bands != chips[0].bands):
                reasons.append(f"{item_id}: shape/bands differ from date 0")
                continue
            chips.append(chip)
            used.append(item)
        if not chips:
            reason = "; ".join(reasons) if reasons else "no item_ids"
            return TileChips([], [], None, [], rejected_reason=reason), reads, failed
        dates = [date_entry(item, chip) for chip, item in zip(chips, used, strict=True)]
        if len(chips) == 1:
            array = chips[0].array
        else:
            array = np.stack([c.array for c in chips if c.array is not None])
            for c in chips:
                c.array = None  # stacked: keep one copy of the pixels
        return TileChips(chips, used, array, dates), reads, failed

    def get(self, tile_id: str) -> TileChips:
        """The chips (one per date, and their items) of the next tile; tiles must be asked for in order."""
        if tile_id == self._current[0] and self._current[1] is not None:
            return self._current[1]
        future = self._futures.pop(tile_id, None)
        if future is None:
            raise KeyError(f"tile {tile_id} requested out of order")
        tc, reads, failed = future.result()
        self.n_reads += reads
        if failed:
            tc = self._read_again(tile_id, failed)
        self._current = (tile_id, tc)
        self._fill()
        return tc


    def _read_again(self, tile_id: str, failed: list[str]) -> TileChips:
        """Read a tile again after an I/O error, alone: no other read runs while GDAL's cache is cleared."""
        wait(list(self._futures.values()))  # the worker threads are idle (nothing new is submitted meanwhile)
        for other in self._readers:
            other.drop(failed)
        self._reader().forget_cached(failed)  # the calling thread's own reader
        log.info("tile %s: %d file(s) failed to read; reading the tile again", tile_id, len(set(failed)))
        self.n_retries += 1
        tc, reads, still = self._read(self._rows[tile_id])
        self.n_reads += reads
        if still:
            self.n_unrecovered += 1
            log.warning("tile %s: read failed again: %s", tile_id, tc.rejected_reason or "a date was lost")
        return tc


def _sv_for(p: Mapping[str, Any], fetch: Callable[[str], bytes], report: BuildReport, max_side: int | None,
            fov: float, out_size: int) -> tuple[bytes | None, str | None]:
    uri = p.get("image_uri")
    if not uri:
        return None, "missing: no image_uri"
    try:
        data = fetch(str(uri))
    except Exception as exn:  # noqa: BLE001 - any fetch failure rejects this pair only
        return None, f"unreadable: {type(exn).__name__}: {redact_text(str(exn))}"
    res = normalize_sv_image(data, max_side=max_side)
    if not res.ok:
        return None, res.rejected_reason
    if res.equirectangular:
        heading = _num(p.get("heading"))
        try:
            crops = panorama_crops(data, headings=(heading if heading is not None else 0.0,), fov_deg=fov,
                                   out_size=out_size, relative=heading is None)
        except ValueError as exn:
            return None, f"panorama: {exn}"
        report.n_panorama_crops += 1
        return crops[0][1], None
    if res.reencoded:
        report.n_reencoded_sv += 1
    return res.jpeg, None


def iter_items(items: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Index STAC items by id (accepts a FeatureCollection dict or an iterable of items)."""
    features: Iterable[Mapping[str, Any]] = (
        items["features"] if isinstance(items, Mapping) and "features" in items else items  # type: ignore[assignment]
    )
    return {str(it["id"]): it for it in features}
