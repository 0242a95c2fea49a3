"""Turn pairs (SV point x RS tile) into WebDataset samples: chip + SV image + sample JSON.

:func:`build_shards_from_pairs` is the one call a pipeline asset needs: it joins each pair with its
tile's attributes (``tiles.parquet``, by ``tile_id``: the pairs table does not repeat them), sorts the
pairs by sample key, reads each tile's chip once (trying the pair's items least-cloudy first), validates
and normalises each SV image (perspective crop for 360 panoramas), writes the shard set, and
reports every rejected pair with a reason so that ``n_pairs == n_written + n_rejected``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gair_dataset.chips import ChipReader, ChipResult, TileSpec
from gair_dataset.shards import ShardSetInfo, ShardWriteError, ShardWriter, sample_key
from gair_dataset.signing import Signer, redact_text
from gair_dataset.svimage import normalize_sv_image, panorama_crops, read_image_uri

log = logging.getLogger(__name__)


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
                      synthetic: bool = False, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
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
    if extra:
        meta.update(extra)
    return meta


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
    n_reencoded_sv: int = 0
    n_panorama_crops: int = 0

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

    Returns:
        A :class:`BuildReport`; ``n_pairs == n_written + n_rejected``.
    """
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
    chip_kw = {"bands": bands, "out_size": out_size, "max_nodata_fraction": max_nodata_fraction,
               "max_cloud_fraction": max_cloud_fraction}
    tiles = _first_pair_per_tile(p for k, p in keyed)
    with ChipPrefetcher(tiles, items, workers=chip_workers, signer=signer, gdal_env=gdal_env,
                        **chip_kw) as chips, ShardWriter(
        out_dir, name=name, samples_per_shard=samples_per_shard, fsync=fsync
    ) as writer:
        prev = None
        for key, p in keyed:
            sv_id, tile_id = str(p["sv_id"]), str(p["tile_id"])
            if key == prev:
                report.rejections.append(Rejection(key, sv_id, tile_id, "key", "duplicate key"))
                continue
            prev = key
            chip, item = chips.get(tile_id)
            if not chip.ok or chip.array is None:
                reason = chip.rejected_reason or "no data"
                report.rejections.append(Rejection(key, sv_id, tile_id, "chip", reason))
                continue
            sv_bytes, why = _sv_for(p, fetch_image, report, sv_max_side, pano_fov_deg, pano_out_size)
            if sv_bytes is None:
                report.rejections.append(Rejection(key, sv_id, tile_id, "sv", why or "invalid"))
                continue
            meta = build_sample_json(p, item, sv_bytes, bands=chip.bands, harmonized=chip.harmonized,
                                     processing_baseline=chip.processing_baseline, synthetic=synthetic)
            writer.write(key, chip.array, sv_bytes, meta)
            report.n_written += 1
    report.n_chip_reads = chips.n_reads
    report.shards = writer.info
    log.info("shards %s: %d pairs -> %d samples, %d rejected %s", name, report.n_pairs, report.n_written,
             report.n_rejected, report.rejected_by_reason())
    return report


def _first_pair_per_tile(pairs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The first pair of each tile, in order (pairs sorted by key are grouped by tile)."""
    seen: set[str] = set()
    out = []
    for p in pairs:
        if str(p["tile_id"]) not in seen:
            seen.add(str(p["tile_id"]))
            out.append(p)
    return out


class ChipPrefetcher:
    """Reads the chips of tiles in order, up to ``2 * workers`` tiles ahead, on a bounded thread pool.

    Each worker thread owns a :class:`ChipReader` (rasterio datasets are not shared across threads).
    ``get(tile_id)`` must be called in tile order; a tile's chip is read once, trying its items in
    ``item_ids`` order (least cloudy first) until one passes the nodata/cloud limits.
    """

    def __init__(self, tiles: Sequence[Mapping[str, Any]], items: Mapping[str, Mapping[str, Any]], *,
                 workers: int = 4, signer: Signer | None = None, gdal_env: Mapping[str, Any] | None = None,
                 **chip_kw: Any) -> None:
        self.tiles = list(tiles)
        self.items = items
        self.workers = max(1, int(workers))
        self.signer, self.gdal_env, self.chip_kw = signer, gdal_env, chip_kw
        self.n_reads = 0
        self._local = threading.local()
        self._readers: list[ChipReader] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="chips")
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._next = 0
        self._current: tuple[str | None, tuple[ChipResult, Mapping[str, Any] | None] | None] = (None, None)

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

    def _fill(self) -> None:
        while self._next < len(self.tiles) and len(self._futures) < 2 * self.workers:
            p = self.tiles[self._next]
            self._futures[str(p["tile_id"])] = self._pool.submit(self._read, p)
            self._next += 1

    def _read(self, p: Mapping[str, Any]) -> tuple[ChipResult, Mapping[str, Any] | None, int]:
        tile = TileSpec.from_row(p)
        reasons, reads = [], 0
        for item_id in _as_list(p.get("item_ids")):
            item = self.items.get(str(item_id))
            if item is None:
                reasons.append(f"{item_id}: item not found")
                continue
            reads += 1
            chip = self._reader().read(item, tile, **self.chip_kw)
            if chip.ok:
                return chip, item, reads
            reasons.append(f"{item_id}: {chip.rejected_reason}")
        reason = "; ".join(reasons) if reasons else "no item_ids"
        return ChipResult(None, list(self.chip_kw.get("bands") or []), 1.0, rejected_reason=reason), None, reads

    def get(self, tile_id: str) -> tuple[ChipResult, Mapping[str, Any] | None]:
        """The chip (and the item it came from) of the next tile; tiles must be asked for in order."""
        if tile_id == self._current[0] and self._current[1] is not None:
            return self._current[1]
        future = self._futures.pop(tile_id, None)
        if future is None:
            raise KeyError(f"tile {tile_id} requested out of order")
        chip, item, reads = future.result()
        self.n_reads += reads
        self._current = (tile_id, (chip, item))
        self._fill()
        return chip, item


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
