"""Windowed reads of one RS tile ("chip") from the band assets of a STAC item.

Never reads whole scenes: every band asset is opened (locally, or over HTTP(S) through GDAL's
``/vsicurl/`` with retries and read-ahead settings) and only the tile's window is read.

* Same CRS as the tile: a plain window read; bands at another resolution (Sentinel-2 20 m) are
  resampled onto the tile grid (bilinear; nearest for classification masks); tiles crossing the
  raster edge are read ``boundless`` and filled with nodata.
* Different CRS (e.g. XYZ ``EPSG:3857`` tiles over UTM scenes): a ``WarpedVRT`` onto the tile
  grid.
* Sentinel-2 processing baseline >= 04.00: the +1000 DN offset is removed (``harmonized``).
* Chips with too much nodata (or too much cloud, from the SCL asset when there is one) are
  returned with a ``rejected_reason`` instead of an array.
* Signed URLs: a ``signer`` is applied just before opening; on HTTP 403 the href is re-signed
  once and the read retried. Signed hrefs never appear in results, exceptions or logs.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.transform import from_bounds as transform_from_bounds
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from rasterio.windows import from_bounds as window_from_bounds

from gair_dataset.bands import (
    S2_BOA_ADD_OFFSET,
    BandProfile,
    CloudMask,
    UnknownCollectionError,
    needs_s2_harmonization,
    processing_baseline,
    profile_for,
    resolve_item_bands,
)
from gair_dataset.signing import (
    Signer,
    install_redacting_log_filter,
    is_http_403,
    redact_text,
    redact_url,
    refresh_signer,
)

log = logging.getLogger(__name__)
install_redacting_log_filter()

DEFAULT_GDAL_ENV: dict[str, Any] = {
    "GDAL_HTTP_MAX_RETRY": 5,
    "GDAL_HTTP_RETRY_DELAY": 1,  # seconds, doubled by GDAL on each retry
    "GDAL_HTTP_TIMEOUT": 60,
    "GDAL_HTTP_CONNECTTIMEOUT": 15,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.jp2,.vrt",
    "CPL_VSIL_CURL_USE_HEAD": "NO",
    # SERIAL: the blocks of one read go through /vsicurl/'s process-wide byte cache, so tiles (and reader threads)
    # sharing a COG block download it once. The default parallel multi-range fetch bypasses that cache: every
    # re-opened dataset and every thread downloaded the blocks again (bench/refresh_bench.py --section remote).
    "GDAL_HTTP_MULTIRANGE": "SERIAL",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_INGESTED_BYTES_AT_OPEN": 32768,  # one request fetches the COG header
    "CPL_VSIL_CURL_CHUNK_SIZE": 262144,  # read-ahead granularity of /vsicurl/
    "CPL_VSIL_CURL_CACHE_SIZE": 64 * 1024 * 1024,  # /vsicurl/ block cache (per process)
}
"""GDAL configuration used around every read (override per reader with ``gdal_env``)."""

HARMONIZE_REJECT_FRACTION = 0.2
"""Reject a chip (``already_harmonised``) when removing the Sentinel-2 offset clips the visible bands of more than
this fraction of its valid pixels: with the offset present, blue, green and red all at or below +1000 (a negative
reflectance in each) is rare; in data already harmonised it is most dark land and water."""

VISIBLE_BANDS = frozenset({"B02", "B03", "B04", "blue", "green", "red", "coastal"})
"""Band names whose joint clipping is the already-harmonised signal (any profile's naming)."""


class ChipReadError(RuntimeError):
    """A band asset could not be opened or read (message already redacted).

    Attributes:
        href: The unsigned href that failed (None when unknown).
    """

    def __init__(self, message: str, href: str | None = None) -> None:
        super().__init__(message)
        self.href = href


@dataclass(frozen=True)
class TileSpec:
    """One tile of the tile grid: the chip's output pixel grid.

    Attributes:
        crs: Tile CRS, e.g. ``"EPSG:32633"`` (UTM grid) or ``"EPSG:3857"`` (XYZ grid).
        bounds: ``(minx, miny, maxx, maxy)`` in ``crs``.
        width: Tile width in pixels.
        height: Tile height in pixels.
        tile_id: Optional identifier (only for messages).
    """

    crs: str
    bounds: tuple[float, float, float, float]
    width: int
    height: int
    tile_id: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TileSpec:
        """Build a tile from a tiles/pairs row (``tile_crs``, ``tile_minx``... ``tile_height``)."""
        return cls(
            crs=str(row["tile_crs"]),
            bounds=(float(row["tile_minx"]), float(row["tile_miny"]), float(row["tile_maxx"]),
                    float(row["tile_maxy"])),
            width=int(row["tile_width"]),
            height=int(row["tile_height"]),
            tile_id=str(row["tile_id"]) if row.get("tile_id") is not None else None,
        )


@dataclass
class ChipResult:
    """The outcome of reading one chip.

    Attributes:
        array: uint16 ``bands x H x W`` (None when rejected).
        bands: Band names in array order.
        nodata_fraction: Fraction of pixels that are nodata in any band.
        cloud_fraction: Fraction of SCL cloud/shadow pixels, None without an SCL asset.
        harmonized: Whether the Sentinel-2 +1000 offset was removed.
        processing_baseline: ``s2:processing_baseline`` of the item, if any.
        rejected_reason: None if the chip is usable, else a short reason.
        item_id: STAC item id.
        collection: STAC collection id.
        crs: Tile CRS the chip is on.
    """

    array: np.ndarray | None
    bands: list[str]
    nodata_fraction: float
    cloud_fraction: float | None = None
    harmonized: bool = False
    processing_baseline: str | None = None
    rejected_reason: str | None = None
    item_id: str | None = None
    collection: str | None = None
    crs: str | None = None
    sources: list[str] = field(default_factory=list)
    """Unsigned, query-free hrefs that were read."""
    failed_hrefs: list[str] = field(default_factory=list)
    """Unsigned hrefs whose open or read failed (an I/O error, not a verdict on the data): see
    :meth:`ChipReader.forget_cached` before reading them again."""
    harmonize_clipped: float = 0.0
    """Fraction of the valid pixels whose visible bands all were at or below the Sentinel-2 offset (clipped to 1
    when removing it): near 0 for data that carries the offset, large for data already harmonised."""

    @property
    def ok(self) -> bool:
        """True when the chip was not rejected."""
        return self.rejected_reason is None


@dataclass(frozen=True)
class BandSource:
    """Where one output band comes from."""

    band: str
    asset: str
    href: str
    index: int  # 1-based band index inside the asset
    nodata: float | None


def _asset_nodata(asset: Mapping[str, Any], idx: int) -> float | None:
    rb = asset.get("raster:bands") or []
    if idx - 1 < len(rb) and rb[idx - 1].get("nodata") is not None:
        return float(rb[idx - 1]["nodata"])
    return None


def resolve_band_sources(item: Mapping[str, Any], bands: Sequence[str],
                         band_set: BandProfile | None = None) -> list[BandSource]:
    """Find the asset and 1-based band index of every requested band (see :func:`bands.resolve_item_bands`).

    Args:
        item: STAC item as a dict.
        bands: Band names.
        band_set: The collection's band profile (default: the item's collection's, else a generic one).

    Returns:
        One :class:`BandSource` per band, in order.

    Raises:
        KeyError: If a band cannot be found (the message names the item, the band and the keys tried).
    """
    profile = band_set or _profile_or_generic(item, bands)
    resolved = resolve_item_bands(item, bands, profile)
    if not resolved.ok:
        raise KeyError(f"item {item.get('id')!r} ({item.get('collection')}): no asset for band(s) "
                       f"{resolved.describe_missing()}")
    assets = item["assets"]
    return [BandSource(r.band, r.asset, assets[r.asset]["href"], r.index, _asset_nodata(assets[r.asset], r.index))
            for r in resolved.refs]


def _profile_or_generic(item: Mapping[str, Any], bands: Sequence[str]) -> BandProfile:
    """The item's collection's profile, or a generic one (bands looked up by name) for an unknown collection."""
    try:
        return profile_for(item.get("collection"))
    except UnknownCollectionError:
        return BandProfile(str(item.get("collection")), tuple(bands))


def harmonize_s2(arr: np.ndarray, nodata: float = 0) -> np.ndarray:
    """Remove the +1000 DN offset of baseline >= 04.00 Sentinel-2 L2A data in place.

    Valid values become ``max(v - 1000, 1)`` (a value at or below the offset is a valid dark pixel, kept apart
    from a nodata of 0); nodata stays nodata.
    """
    nod = arr == nodata
    np.maximum(arr, S2_BOA_ADD_OFFSET + 1, out=arr)
    arr -= S2_BOA_ADD_OFFSET
    arr[nod] = nodata
    return arr


def to_gdal_path(href: str) -> str:
    """Map an href to a GDAL path: ``https://`` -> ``/vsicurl/https://``, ``s3://`` -> ``/vsis3/``."""
    if href.startswith(("http://", "https://")):
        return "/vsicurl/" + href
    if href.startswith("s3://"):
        return "/vsis3/" + href[5:]
    if href.startswith("file://"):
        return href[7:]
    return href


def item_epsg_crs(item: Mapping[str, Any]) -> str | None:
    """Return the item's CRS from ``proj:code`` or ``proj:epsg`` (e.g. ``"EPSG:32633"``), if present."""
    props = item.get("properties", {})
    if props.get("proj:code"):
        return str(props["proj:code"])
    if props.get("proj:epsg"):
        return f"EPSG:{int(props['proj:epsg'])}"
    return None


_MASK_OR_ALPHA = MaskFlags.per_dataset.value | MaskFlags.alpha.value


def _mask_flag_ints(ds: Any) -> list[int]:
    """GDAL mask flags per band as ints (``mask_flag_enums`` builds slow enum lists)."""
    try:
        return [int(v) for v in ds._mask_flags()]
    except AttributeError:  # pragma: no cover - older/newer rasterio without the helper
        return [sum(f.value for f in flags) for flags in ds.mask_flag_enums]


@dataclass(frozen=True)
class _ReadPlan:
    """What to read for one item and band list, resolved once per item (not per chip).

    Attributes:
        reads: ``(href, output positions, band indexes, nodata)`` per asset.
        redacted: Unsigned, query-free hrefs of the band assets.
        cloud: ``(href, mask)`` of the cloud mask asset, or None.
        offset: DN offset to remove (Sentinel-2 baseline >= 04.00: 1000), else 0.
        baseline: The item's processing baseline.
        nodata: Nodata used when an asset declares none.
        bands: Band names in output order.
    """

    reads: list[tuple[str, list[int], list[int], float | None]]
    spans: list[slice | None]
    """Per read: its output positions as a slice when they are consecutive (read straight into the chip)."""
    redacted: tuple[str, ...]
    cloud: tuple[str, CloudMask] | None
    offset: int
    baseline: str | None
    nodata: float
    bands: tuple[str, ...]


_PLACEMENTS: dict[tuple[Any, ...], tuple[Window, bool, bool]] = {}
"""Tile placements on raster grids (:meth:`_OpenDataset.placement`), bounded."""


@dataclass
class _Facts:
    """What a chip read needs to know of a raster file, asked of GDAL once per file."""

    mask_flags: list[int]
    nodata: float | None
    crs: CRS | None
    uint16: bool
    plain: bool
    """uint8 (NAIP) or uint16 without per-dataset masks or alpha: a plain window read, converted to uint16 by GDAL
    as it reads, gives the chip (``ChipReader._plain_read``)."""
    transform: Affine
    width: int
    height: int
    same_crs: dict[str, bool] = field(default_factory=dict)
    """Tile CRS -> whether the file's CRS equals it (the answer is the file's: shared by every open of it)."""

    @classmethod
    def of(cls, ds: Any) -> _Facts:
        """Ask an open dataset."""
        mask_flags = _mask_flag_ints(ds)
        uint16 = all(d == "uint16" for d in ds.dtypes)
        plain = (uint16 or all(d == "uint8" for d in ds.dtypes)) and not any(f & _MASK_OR_ALPHA for f in mask_flags)
        return cls(mask_flags, ds.nodata, ds.crs, uint16, plain, ds.transform, ds.width, ds.height)


_FACTS: dict[tuple[Any, ...], _Facts] = {}
"""Facts of local rasters by file identity (:func:`_local_identity`), bounded: a file opened again (by another
reader thread, after the open-file cache evicted it, by a later build in the process) skips asking GDAL for its
mask flags (about 30 us per open) and comparing its CRS again."""


def _local_identity(path: str) -> tuple[Any, ...] | None:
    """``(path, device, inode, size, mtime, ctime)`` of a local file, None for remote paths (or a failed ``stat``).

    The change time moves on any rewrite or rename onto the path, even one that restores the mtime.
    """
    if path.startswith("/vsi") or "://" in path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _OpenDataset:
    """An open dataset plus facts about it that are costly to recompute per chip."""

    def __init__(self, ds: Any, identity: tuple[Any, ...] | None = None) -> None:
        self.ds = ds
        facts = _FACTS.get(identity) if identity is not None else None
        if facts is None:
            facts = _Facts.of(ds)
            if identity is not None:
                if len(_FACTS) >= 4096:
                    _FACTS.clear()
                _FACTS[identity] = facts
        self.mask_flags = facts.mask_flags
        self.nodata = facts.nodata
        self.crs = facts.crs
        self.uint16 = facts.uint16
        self.plain = facts.plain
        self.transform = facts.transform
        self._north_up = self.transform.b == 0 and self.transform.d == 0
        self.width, self.height = facts.width, facts.height
        self._grid = (tuple(self.transform)[:6], self.width, self.height)  # the CRS is compared apart (same_crs)
        self._same_crs = facts.same_crs

    def window(self, bounds: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Pixel window ``(col_off, row_off, width, height)`` of ``bounds`` (fast path for north-up grids)."""
        if not self._north_up:
            w = window_from_bounds(*bounds, transform=self.transform)
            return w.col_off, w.row_off, w.width, w.height
        t = self.transform
        minx, miny, maxx, maxy = bounds
        c0, c1 = (minx - t.c) / t.a, (maxx - t.c) / t.a
        r0, r1 = (maxy - t.f) / t.e, (miny - t.f) / t.e
        return min(c0, c1), min(r0, r1), abs(c1 - c0), abs(r1 - r0)

    def placement(self, bounds: tuple[float, float, float, float], width: int,
                  height: int) -> tuple[Window, bool, bool]:
        """``(window, inside the raster, on its pixel grid at the tile's size)`` of a tile's bounds.

        Memoised per grid (transform and size), so the single-band assets of one item (one grid) place a chip once.
        """
        key = (self._grid, bounds, width, height)
        hit = _PLACEMENTS.get(key)
        if hit is not None:
            return hit
        c0, r0, w, h = self.window(bounds)
        inside = c0 >= -1e-6 and r0 >= -1e-6 and c0 + w <= self.width + 1e-6 and r0 + h <= self.height + 1e-6
        rc0, rr0 = round(c0), round(r0)
        same_grid = (abs(c0 - rc0) < 1e-6 and abs(r0 - rr0) < 1e-6 and abs(w - width) < 1e-6
                     and abs(h - height) < 1e-6)
        window = Window(rc0, rr0, width, height) if same_grid else Window(c0, r0, w, h)
        if len(_PLACEMENTS) >= 1024:
            _PLACEMENTS.clear()
        _PLACEMENTS[key] = hit = (window, inside, same_grid)
        return hit

    def same_crs(self, key: str, crs: CRS) -> bool:
        if key not in self._same_crs:
            self._same_crs[key] = self.crs is not None and self.crs == crs
        return self._same_crs[key]


class ChipReader:
    """Reads chips, keeping a small cache of open datasets and one GDAL environment.

    Use as a context manager (``with ChipReader(signer=...) as reader: reader.read(item, tile)``)
    or call :meth:`read` directly (a GDAL environment is then entered per call).
    """

    def __init__(self, *, signer: Signer | None = None, gdal_env: Mapping[str, Any] | None = None,
                 max_open: int = 128) -> None:
        """Create a reader.

        Args:
            signer: Applied to http(s) hrefs just before opening (e.g. ``planetary_computer.sign``).
            gdal_env: Extra/overriding GDAL config options (see :data:`DEFAULT_GDAL_ENV`).
            max_open: Maximum number of datasets kept open (least recently used closed first). A tile of 3 dates
                of Sentinel-2 items with one asset per band uses ~40 files; an open dataset keeps its decoded
                blocks, so neighbouring tiles reading the same files neither re-open nor re-read them. Local files
                hold one descriptor each, per reader thread.
        """
        self.signer = signer
        self.env_options = {**DEFAULT_GDAL_ENV, **(gdal_env or {})}
        self.max_open = max_open
        self._open: OrderedDict[str, _OpenDataset] = OrderedDict()
        self._plans: OrderedDict[tuple[Any, ...], tuple[Mapping[str, Any], _ReadPlan]] = OrderedDict()
        self._env: rasterio.Env | None = None
        self.n_resigned = 0
        self._last_placement: tuple[TileSpec, tuple, Window | None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> ChipReader:
        self._env = rasterio.Env(**self.env_options)
        self._env.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close all cached datasets and leave the GDAL environment."""
        while self._open:
            self._drop(next(iter(self._open)))
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    # -- dataset cache ----------------------------------------------------------------------
    def _sign(self, href: str) -> str:
        if self.signer is not None and href.startswith(("http://", "https://")):
            return self.signer(href)
        return href

    def _drop(self, href: str) -> None:
        entry = self._open.pop(href, None)
        if entry is not None:
            try:
                entry.ds.close()
            except Exception:  # noqa: BLE001 - closing a broken handle
                pass

    def _dataset(self, href: str, *, fresh: bool = False) -> _OpenDataset:
        if not fresh and href in self._open:
            self._open.move_to_end(href)
            return self._open[href]
        self._drop(href)
        path = to_gdal_path(self._sign(href))
        identity = _local_identity(path)
        ds = rasterio.open(path)
        if identity is not None and _local_identity(path) != identity:
            identity = None  # replaced while being opened: which version is open is unknown, so nothing is cached
        entry = _OpenDataset(ds, identity)
        self._open[href] = entry
        while len(self._open) > self.max_open:
            self._drop(next(iter(self._open)))
        return entry

    def _with_dataset(self, href: str, fn: Callable[[_OpenDataset], Any]) -> Any:
        """Run ``fn(dataset)``; on HTTP 403 re-sign once with a fresh token and retry; redact all errors."""
        message = None
        for attempt in range(2):
            try:
                return fn(self._dataset(href, fresh=attempt > 0))
            except (RasterioError, OSError) as exn:
                self._drop(href)
                if attempt == 0 and self.signer is not None and is_http_403(exn):
                    log.info("HTTP 403 on %s: re-signing once with a fresh token", redact_url(href))
                    refresh_signer(self.signer, href)  # a cached token the server refuses is dropped
                    self.n_resigned += 1
                    continue
                message = f"{type(exn).__name__}: {redact_text(str(exn))}"
                break
        # Raised outside the except block so that no exception context carries the signed href.
        raise ChipReadError(f"cannot read {redact_url(href)}: {message}", href)

    def drop(self, hrefs: Sequence[str]) -> None:
        """Close the datasets open on these (unsigned) hrefs, if any."""
        for href in hrefs:
            self._drop(href)

    def forget_cached(self, hrefs: Sequence[str]) -> None:
        """Close these hrefs and drop what GDAL's process-wide ``/vsicurl/`` cache holds for them.

        GDAL neither retries a range answer cut mid-body nor forgets it: the short bytes stay cached for the
        process, so every later read of that part of the file fails too. Opening one handle with
        ``CPL_VSIL_CURL_NON_CACHED`` set makes GDAL invalidate that URL's cached regions and size when the
        handle closes. Call this only while no other thread is inside a GDAL read (the cache is shared).

        Args:
            hrefs: Unsigned hrefs, as in :attr:`ChipResult.failed_hrefs`; local paths are ignored.
        """
        for href in hrefs:
            self._drop(href)
            path = to_gdal_path(self._sign(href))
            if not path.startswith("/vsi"):
                continue
            prefix = path[:path.index("/", 1) + 1]  # "/vsicurl/", "/vsis3/": GDAL splits the option at ":"
            try:
                with rasterio.Env(**{**self.env_options, "CPL_VSIL_CURL_NON_CACHED": prefix}), rasterio.open(path):
                    pass
            except (RasterioError, OSError):  # the handle was opened and closed all the same
                log.debug("reopening %s to clear its cached bytes failed", redact_url(href))

    # -- reading ----------------------------------------------------------------------------
    def read(self, item: Mapping[str, Any], tile: TileSpec, *, bands: Sequence[str] | None = None,
             out_size: int | None = None, max_nodata_fraction: float = 0.1,
             max_cloud_fraction: float | None = 0.1,
             cloud_classes: Sequence[int] | None = None, harmonize: bool = True,
             raise_on_error: bool = False) -> ChipResult:
        """Read one chip; see :func:`read_chip` for the arguments."""
        if self._env is None:
            with rasterio.Env(**self.env_options):
                return self._read(item, tile, bands, out_size, max_nodata_fraction, max_cloud_fraction,
                                  cloud_classes, harmonize, raise_on_error)
        return self._read(item, tile, bands, out_size, max_nodata_fraction, max_cloud_fraction,
                          cloud_classes, harmonize, raise_on_error)

    def _read(self, item: Mapping[str, Any], tile: TileSpec, bands: Sequence[str] | None,
              out_size: int | None, max_nodata_fraction: float, max_cloud_fraction: float | None,
              cloud_classes: Sequence[int] | None, harmonize: bool, raise_on_error: bool) -> ChipResult:
        collection = item.get("collection")
        result = ChipResult(array=None, bands=list(bands or ()), nodata_fraction=1.0, item_id=item.get("id"),
                            collection=collection, crs=tile.crs)
        try:
            plan = self._plan(item, bands, harmonize)
        except KeyError as exn:  # UnknownCollectionError or a missing band
            kind = "unknown_collection" if isinstance(exn, UnknownCollectionError) else "missing_band"
            result.rejected_reason = f"{kind}: item {item.get('id')!r}: {exn.args[0]}"
            return result
        result.bands = list(plan.bands)
        result.processing_baseline = plan.baseline
        result.sources = list(plan.redacted)
        height, width = (out_size, out_size) if out_size else (tile.height, tile.width)
        dst_crs = _parse_crs(tile.crs)
        try:
            out, invalid = self._read_bands(plan, tile, dst_crs, height, width)
            if max_cloud_fraction is not None and plan.cloud is not None:
                result.cloud_fraction = self._cloud_fraction(plan.cloud, tile, dst_crs, height, width, invalid,
                                                             cloud_classes)
                result.sources = sorted({*result.sources, redact_url(plan.cloud[0])})
        except ChipReadError as exn:
            if raise_on_error:
                raise
            result.rejected_reason = f"read_error: {exn}"
            result.failed_hrefs = [exn.href] if exn.href else []
            return result
        result.harmonized = plan.offset > 0
        n = invalid.size
        result.nodata_fraction = np.count_nonzero(invalid) / n if n else 1.0
        if result.nodata_fraction > max_nodata_fraction:
            result.rejected_reason = f"nodata_fraction {result.nodata_fraction:.3f} > {max_nodata_fraction}"
            return result
        if plan.offset:
            result.harmonize_clipped = _clipped_fraction(out, plan.bands, invalid)
            if result.harmonize_clipped > HARMONIZE_REJECT_FRACTION:
                result.rejected_reason = (
                    f"already_harmonised: removing the +{plan.offset} offset of baseline {plan.baseline} left "
                    f"{result.harmonize_clipped:.3f} of tile {tile.tile_id or ''} with every visible band at or "
                    f"below 0: item {item.get('id')!r} may already be harmonised; if so, set offset_removed: true "
                    f"in the band profile of {collection!r} (or the item property earthsearch:boa_offset_applied)")
                log.warning("item %s: %s", item.get("id"), result.rejected_reason)
                return result
        if result.cloud_fraction is not None and max_cloud_fraction is not None \
                and result.cloud_fraction > max_cloud_fraction:
            result.rejected_reason = f"cloud_fraction {result.cloud_fraction:.3f} > {max_cloud_fraction}"
            return result
        if result.nodata_fraction:
            out[:, invalid] = plan.nodata
        result.array = out
        return result

    def _read_bands(self, plan: _ReadPlan, tile: TileSpec, dst_crs: CRS, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
        """Every band of a plan onto the tile grid, harmonised: ``(bands x H x W, invalid)``.

        Zero-nodata reads (the common case) are checked for zeros once over the whole chip, and the offset is
        removed once, after every read.
        """
        several = len(plan.reads) > 1
        out = np.empty((len(plan.bands), height, width), dtype=np.uint16) if several else None
        invalid: np.ndarray | None = None
        zeros_of: list[list[int]] = []  # output positions whose nodata is "any zero"
        for (href, positions, indexes, nodata), span in zip(plan.reads, plan.spans, strict=True):
            target = None if out is None or span is None else out[span]  # read straight into ``out``
            data = self._plain_read(href, indexes, tile, dst_crs, height, width, nodata, plan.nodata, target)
            bad = None
            if data is None:
                data, bad = self._read_asset(href, indexes, tile, dst_crs, height, width, nodata,
                                             plan.nodata, Resampling.bilinear, target)
            if out is None:
                out = data  # one asset holds every band: no copy
            elif data is not target:
                out[positions] = data
            if bad is None:
                zeros_of.append(positions)
            elif invalid is None:
                invalid = bad  # a fresh mask of this read: owned here
            else:
                invalid |= bad
        assert out is not None
        if zeros_of:
            every = len(zeros_of) == len(plan.reads)
            zeros = _zeros(out if every else out[[i for pos in zeros_of for i in pos]])
            invalid = zeros if invalid is None else invalid | zeros
        assert invalid is not None
        if plan.offset:
            _remove_offset(out, plan.offset)
        return out, invalid

    def _plain_read(self, href: str, indexes: list[int], tile: TileSpec, dst_crs: CRS, height: int, width: int,
                    nodata: float | None, default_nodata: float, target: np.ndarray | None) -> np.ndarray | None:
        """The hot path of a warm reader, or None for anything else.

        A window read of an open uint8 or uint16, zero-nodata, unmasked asset whose grid the tile lies on. None
        sends the read to :meth:`_read_asset`, which opens, re-signs after a 403 and reports errors.
        """
        entry = self._open.get(href)
        if entry is None or not entry.plain:
            return None
        src_nodata = nodata if nodata is not None else entry.nodata
        if (default_nodata if src_nodata is None else src_nodata) != 0:
            return None
        if not entry.same_crs(tile.crs, dst_crs):
            return None
        # The bands of one chip usually share a grid: place the tile once per chip, not once per band asset.
        last = self._last_placement
        if last is not None and last[0] is tile and last[1] == entry._grid:
            window = last[2]
        else:
            win, inside, same_grid = entry.placement(tile.bounds, width, height)
            window = win if inside and same_grid else None
            self._last_placement = (tile, entry._grid, window)
        if window is None:
            return None
        self._open.move_to_end(href)
        try:
            if entry.uint16:
                return entry.ds.read(indexes, window=window, out=target)
            if target is None:
                return entry.ds.read(indexes, window=window, out_dtype=np.uint16)  # GDAL converts uint8 as it reads
        except (RasterioError, OSError):
            pass  # the general path retries once (re-signing on a 403) and reports the error redacted
        return None

    def _cloud_fraction(self, cloud: tuple[str, CloudMask], tile: TileSpec, dst_crs: CRS, height: int,
                        width: int, invalid: np.ndarray, classes: Sequence[int] | None) -> float:
        href, mask = cloud
        qa, qa_bad = self._read_asset(href, [1], tile, dst_crs, height, width, mask.nodata, mask.nodata,
                                      Resampling.nearest)
        valid = ~(invalid | (_zeros(qa) if qa_bad is None else qa_bad))
        n_valid = int(np.count_nonzero(valid))
        if mask.bits:
            bits = sum(1 << b for b in mask.bits)
            cloudy = (qa[0] & bits) != 0
        else:
            cloudy = np.isin(qa[0], np.asarray(classes if classes is not None else mask.classes))
        return float(np.count_nonzero(cloudy & valid)) / n_valid if n_valid else 1.0

    def _plan(self, item: Mapping[str, Any], bands: Sequence[str] | None, harmonize: bool) -> _ReadPlan:
        """The read plan of an item, cached per (item object, bands, harmonize).

        Band resolution itself is cached per (collection, bands, asset-key signature) in
        :func:`gair_dataset.bands.resolve_item_bands`, so items of one catalog share it.
        """
        key = (id(item), None if bands is None else tuple(bands), harmonize)
        hit = self._plans.get(key)
        if hit is not None and hit[0] is item:
            return hit[1]
        try:
            profile = profile_for(item.get("collection"))
        except UnknownCollectionError:
            if bands is None:
                raise
            profile = BandProfile(str(item.get("collection")), tuple(bands))
        wanted = profile.bands if bands is None else tuple(bands)
        sources = resolve_band_sources(item, wanted, profile)
        by_href: dict[str, list[int]] = {}
        for i, src in enumerate(sources):
            by_href.setdefault(src.href, []).append(i)
        resolved = resolve_item_bands(item, wanted, profile)
        cloud = None
        if resolved.cloud_asset is not None and profile.cloud is not None:
            cloud = (item["assets"][resolved.cloud_asset]["href"], profile.cloud)
        plan = _ReadPlan(
            reads=[(href, pos, [sources[p].index for p in pos], sources[pos[0]].nodata)
                   for href, pos in by_href.items()],
            spans=[slice(pos[0], pos[0] + len(pos)) if pos == list(range(pos[0], pos[0] + len(pos))) else None
                   for pos in by_href.values()],
            redacted=tuple(sorted({redact_url(src.href) for src in sources})),
            cloud=cloud,
            offset=S2_BOA_ADD_OFFSET if harmonize and needs_s2_harmonization(item, profile) else 0,
            baseline=processing_baseline(item),
            nodata=profile.nodata,
            bands=tuple(wanted),
        )
        self._plans[key] = (item, plan)  # keeps ``item`` alive, so its id cannot be reused
        while len(self._plans) > 256:
            self._plans.popitem(last=False)
        return plan

    def _read_asset(self, href: str, indexes: list[int], tile: TileSpec, dst_crs: CRS, height: int,
                    width: int, nodata: float | None, default_nodata: float, resampling: Resampling,
                    target: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Read ``indexes`` of one asset onto the tile grid as uint16 (no harmonisation: see :meth:`_read_bands`).

        ``target``: a uint16 ``len(indexes) x height x width`` view to read into when the read is a plain
        window read of uint16 data (the returned data is then ``target`` itself).

        Returns:
            ``(data, invalid)``: invalid are the asset's nodata/masked pixels, None for "its zeros" (see
            :func:`_invalid`).
        """

        def read(entry: _OpenDataset) -> tuple[np.ndarray, np.ndarray | None]:
            src = entry.ds
            if entry.crs is None:
                raise ChipReadError(f"{redact_url(href)} has no CRS (no georeferencing): it cannot be placed on "
                                    f"tile {tile.tile_id or ''} ({tile.crs}); fix the file or its item")
            src_nodata = nodata if nodata is not None else entry.nodata
            if src_nodata is None:
                src_nodata = default_nodata
            has_mask = bool(entry.mask_flags[indexes[0] - 1] & _MASK_OR_ALPHA)
            if entry.same_crs(tile.crs, dst_crs):
                window, inside, same_grid = entry.placement(tile.bounds, width, height)
                rs = Resampling.nearest if same_grid else resampling
                if inside and same_grid:
                    if target is not None and entry.uint16:
                        data = src.read(indexes, window=window, out=target)
                    else:
                        data = src.read(indexes, window=window)
                    masks = src.read_masks(indexes, window=window) if has_mask else None
                else:
                    kw: dict[str, Any] = {"window": window, "out_shape": (len(indexes), height, width),
                                          "resampling": rs}
                    if not inside:
                        kw.update(boundless=True, fill_value=src_nodata)
                    data = src.read(indexes, **kw)
                    masks = src.read_masks(indexes, **{k: v for k, v in kw.items() if k != "fill_value"}) \
                        if has_mask else None
            else:
                dst_transform = transform_from_bounds(*tile.bounds, width, height)
                with WarpedVRT(src, crs=dst_crs, transform=dst_transform, width=width, height=height,
                               resampling=resampling, src_nodata=src_nodata, nodata=src_nodata) as vrt:
                    data = vrt.read(indexes)
                    masks = vrt.read_masks(indexes) if has_mask else None
            bad = _invalid(data, src_nodata, masks)
            return _to_uint16(data), bad

        return self._with_dataset(href, read)


def _invalid(data: np.ndarray, src_nodata: float, masks: np.ndarray | None) -> np.ndarray | None:
    """The invalid (nodata or masked) pixels of one read, or None for "the zeros" (unsigned data, nodata 0, no mask).

    None lets the caller find the zeros of every band of a chip in one pass (:func:`_zeros`) instead of per read.
    """
    if data.dtype.kind == "u" and src_nodata == 0:
        if masks is None:
            return None
        bad = _zeros(data)
    elif np.isnan(src_nodata):
        bad = np.isnan(data).any(axis=0)
    else:
        nd = data.dtype.type(src_nodata) if data.dtype.kind in "ui" and float(src_nodata).is_integer() else src_nodata
        bad = (data == nd).any(axis=0)
    if masks is not None:
        bad |= np.any(masks == 0, axis=0)
    return bad


def _zeros(data: np.ndarray) -> np.ndarray:
    """Pixels where any band is 0 (unsigned data: the minimum over bands is 0)."""
    return (data[0] if len(data) == 1 else data.min(axis=0)) == 0


def _remove_offset(data: np.ndarray, offset: int) -> None:
    """Remove the Sentinel-2 offset in place.

    Valid values at or below it (negative reflectance: water and shadow in the infrared bands) become 1, never 0,
    so that 0 stays the chip's nodata. Invalid pixels are set to nodata by the caller afterwards.
    """
    np.maximum(data, offset + 1, out=data)
    data -= offset


def _clipped_fraction(out: np.ndarray, bands: Sequence[str], invalid: np.ndarray) -> float:
    """Fraction of the valid pixels whose visible bands (all bands without one) were clipped to 1 by the offset."""
    idx = [i for i, b in enumerate(bands) if b in VISIBLE_BANDS] or list(range(len(bands)))
    clipped = np.all(out[idx] <= 1, axis=0)
    n_valid = invalid.size - np.count_nonzero(invalid)
    return float(np.count_nonzero(clipped & ~invalid) / n_valid) if n_valid else 0.0


@functools.lru_cache(maxsize=256)
def _parse_crs(crs: str) -> CRS:
    return CRS.from_user_input(crs)


def _to_uint16(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint16:
        return data
    if data.dtype == np.uint8:
        return data.astype(np.uint16)
    if np.issubdtype(data.dtype, np.floating):
        data = np.nan_to_num(data, nan=0.0)
        return np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    return np.clip(data, 0, 65535).astype(np.uint16)


def read_chip(item: Mapping[str, Any], tile: TileSpec, *, bands: list[str] | None = None,
              out_size: int | None = None, signer: Signer | None = None, max_nodata_fraction: float = 0.1,
              max_cloud_fraction: float | None = 0.1, cloud_classes: Sequence[int] | None = None,
              harmonize: bool = True, gdal_env: Mapping[str, Any] | None = None,
              raise_on_error: bool = False) -> ChipResult:
    """Read one tile of a STAC item as a uint16 ``bands x H x W`` chip (one-shot helper).

    For many chips, reuse a :class:`ChipReader` (it keeps datasets open).

    Args:
        item: STAC item dict (Planetary Computer / Earth Search schema).
        tile: The tile (CRS, bounds, pixel grid).
        bands: Band names; default: the collection's band set (Sentinel-2 L2A 10 bands, NAIP
            R,G,B,NIR, Landsat C2 L2 blue..swir22).
        out_size: Output ``out_size x out_size`` instead of the tile's own grid.
        signer: Href signer for http(s) assets (re-signed once on HTTP 403).
        max_nodata_fraction: Reject chips with more nodata than this.
        max_cloud_fraction: Reject chips with more SCL cloud/shadow than this (None: no check).
        cloud_classes: Classes counted as cloud (default: the profile's, SCL 3, 8, 9, 10).
        harmonize: Remove the Sentinel-2 baseline >= 04.00 offset.
        gdal_env: Extra GDAL config options.
        raise_on_error: Raise :class:`ChipReadError` on I/O errors instead of rejecting.

    Returns:
        A :class:`ChipResult` (``rejected_reason`` set when unusable).
    """
    with ChipReader(signer=signer, gdal_env=gdal_env, max_open=8) as reader:
        return reader.read(item, tile, bands=bands, out_size=out_size,
                           max_nodata_fraction=max_nodata_fraction, max_cloud_fraction=max_cloud_fraction,
                           cloud_classes=cloud_classes, harmonize=harmonize, raise_on_error=raise_on_error)


def tile_from_center(crs: str, x: float, y: float, size_px: int, resolution: float,
                     tile_id: str | None = None) -> TileSpec:
    """Build a square tile of ``size_px`` pixels of ``resolution`` centred on ``(x, y)`` in ``crs``."""
    half = size_px * resolution / 2.0
    return TileSpec(crs, (x - half, y - half, x + half, y + half), size_px, size_px, tile_id)


__all__ = [
    "DEFAULT_GDAL_ENV", "BandSource", "ChipReadError", "ChipReader", "ChipResult", "TileSpec",
    "harmonize_s2", "item_epsg_crs", "needs_s2_harmonization", "processing_baseline", "read_chip",
    "resolve_band_sources", "tile_from_center", "to_gdal_path",
]
