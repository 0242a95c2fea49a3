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
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.transform import from_bounds as transform_from_bounds
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from rasterio.windows import from_bounds as window_from_bounds

from gair_dataset.bands import (
    S2_BOA_ADD_OFFSET,
    S2_COMMON_NAMES,
    S2_HARMONIZE_BASELINE,
    S2_SCL_CLOUD_CLASSES,
    BandSet,
    band_set_for,
)
from gair_dataset.signing import Signer, install_redacting_log_filter, is_http_403, redact_text, redact_url

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
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_INGESTED_BYTES_AT_OPEN": 32768,  # one request fetches the COG header
    "CPL_VSIL_CURL_CHUNK_SIZE": 262144,  # read-ahead granularity of /vsicurl/
    "CPL_VSIL_CURL_CACHE_SIZE": 64 * 1024 * 1024,  # /vsicurl/ block cache (per process)
}
"""GDAL configuration used around every read (override per reader with ``gdal_env``)."""

_MASK_CLASSES_NEAREST = {"SCL", "qa_pixel", "Fmask", "scl"}


class ChipReadError(RuntimeError):
    """A band asset could not be opened or read (message already redacted)."""


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


_BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "R": ("red",), "G": ("green",), "B": ("blue",), "NIR": ("nir", "nir08"),
    **{b: (c,) for b, c in S2_COMMON_NAMES.items()},
}


def _eo_names(band: Mapping[str, Any]) -> set[str]:
    return {str(v).lower() for k in ("name", "common_name") if (v := band.get(k))}


def _asset_nodata(asset: Mapping[str, Any], idx: int) -> float | None:
    rb = asset.get("raster:bands") or []
    if idx - 1 < len(rb) and rb[idx - 1].get("nodata") is not None:
        return float(rb[idx - 1]["nodata"])
    return None


def resolve_band_sources(item: Mapping[str, Any], bands: Sequence[str],
                         band_set: BandSet | None = None) -> list[BandSource]:
    """Find the asset and 1-based band index of every requested band.

    Looks first at the band set's asset for the band (e.g. ``B04`` -> asset ``B04``, NAIP ``R``
    -> asset ``image`` band 1), selecting inside multi-band assets by ``eo:bands`` name or common
    name; otherwise searches every asset's ``eo:bands`` for the name (e.g. one 12-band GeoTIFF
    asset listing ``B01..B12``).

    Args:
        item: STAC item as a dict.
        bands: Band names.
        band_set: The collection's band set, if known.

    Returns:
        One :class:`BandSource` per band, in order.

    Raises:
        KeyError: If a band cannot be found.
    """
    assets: Mapping[str, Mapping[str, Any]] = item.get("assets", {})
    # one pass over the assets: eo:bands name/common name -> (asset, index), first match wins
    by_name: dict[str, tuple[str, int]] = {}
    for k, asset in assets.items():
        for i, b in enumerate(asset.get("eo:bands") or (), start=1):
            for n in _eo_names(b):
                by_name.setdefault(n, (k, i))
    out: list[BandSource] = []
    for band in bands:
        wanted = (band.lower(), *_BAND_ALIASES.get(band, ()))
        key = band_set.asset_for_band.get(band, band) if band_set else band
        hit: tuple[str, int] | None = None
        if key in assets:
            eo = assets[key].get("eo:bands") or ()
            if len(eo) <= 1:
                hit = (key, 1)
            else:
                hit = next(((key, i) for i, b in enumerate(eo, start=1) if _eo_names(b) & set(wanted)), None)
        if hit is None:  # an asset named after an alias (Earth Search v1: "blue", "nir08"...)
            hit = next(((a, 1) for a in wanted[1:] if a in assets
                        and len(assets[a].get("eo:bands") or ()) <= 1), None)
        if hit is None:
            hit = next((by_name[n] for n in wanted if n in by_name), None)
        if hit is None:
            raise KeyError(f"band {band!r} not found in the assets of item {item.get('id')!r}")
        asset = assets[hit[0]]
        out.append(BandSource(band, hit[0], asset["href"], hit[1], _asset_nodata(asset, hit[1])))
    return out


def processing_baseline(item: Mapping[str, Any]) -> str | None:
    """Return the item's ``s2:processing_baseline`` (e.g. ``"05.10"``) or None."""
    pb = item.get("properties", {}).get("s2:processing_baseline")
    return None if pb is None else str(pb)


def needs_s2_harmonization(item: Mapping[str, Any]) -> bool:
    """Whether a Sentinel-2 L2A item carries the +1000 DN offset (baseline >= 04.00).

    Earth Search v1 items that already removed it say so (``earthsearch:boa_offset_applied``).
    """
    if item.get("properties", {}).get("earthsearch:boa_offset_applied") is True:
        return False
    pb = processing_baseline(item)
    if pb is None:
        return False
    try:
        return float(pb) >= float(S2_HARMONIZE_BASELINE)
    except ValueError:
        return pb >= S2_HARMONIZE_BASELINE


def harmonize_s2(arr: np.ndarray, nodata: float = 0) -> np.ndarray:
    """Remove the +1000 DN offset of baseline >= 04.00 Sentinel-2 L2A data in place.

    Values become ``max(v - 1000, 0)``; nodata stays nodata.
    """
    nod = (arr == nodata) if nodata != 0 else None
    np.maximum(arr, S2_BOA_ADD_OFFSET, out=arr)  # values below the offset clip to 0 (and 0 stays 0)
    arr -= S2_BOA_ADD_OFFSET
    if nod is not None:
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
    """Which assets to read for a band list: (href, output positions, band indexes, nodata)."""

    reads: list[tuple[str, list[int], list[int], float | None]]
    redacted: tuple[str, ...]


class _OpenDataset:
    """An open dataset plus facts about it that are costly to recompute per chip."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.mask_flags = _mask_flag_ints(ds)
        self.nodata = ds.nodata
        self.transform = ds.transform
        self._north_up = self.transform.b == 0 and self.transform.d == 0
        self._same_crs: dict[str, bool] = {}

    def window(self, bounds: tuple[float, float, float, float]) -> Window:
        """Pixel window of ``bounds`` (fast path for north-up grids)."""
        if not self._north_up:
            return window_from_bounds(*bounds, transform=self.transform)
        t = self.transform
        minx, miny, maxx, maxy = bounds
        c0, c1 = (minx - t.c) / t.a, (maxx - t.c) / t.a
        r0, r1 = (maxy - t.f) / t.e, (miny - t.f) / t.e
        return Window(min(c0, c1), min(r0, r1), abs(c1 - c0), abs(r1 - r0))

    def same_crs(self, key: str, crs: CRS) -> bool:
        if key not in self._same_crs:
            self._same_crs[key] = self.ds.crs is not None and self.ds.crs == crs
        return self._same_crs[key]


class ChipReader:
    """Reads chips, keeping a small cache of open datasets and one GDAL environment.

    Use as a context manager (``with ChipReader(signer=...) as reader: reader.read(item, tile)``)
    or call :meth:`read` directly (a GDAL environment is then entered per call).
    """

    def __init__(self, *, signer: Signer | None = None, gdal_env: Mapping[str, Any] | None = None,
                 max_open: int = 16) -> None:
        """Create a reader.

        Args:
            signer: Applied to http(s) hrefs just before opening (e.g. ``planetary_computer.sign``).
            gdal_env: Extra/overriding GDAL config options (see :data:`DEFAULT_GDAL_ENV`).
            max_open: Maximum number of datasets kept open.
        """
        self.signer = signer
        self.env_options = {**DEFAULT_GDAL_ENV, **(gdal_env or {})}
        self.max_open = max_open
        self._open: OrderedDict[str, _OpenDataset] = OrderedDict()
        self._plans: dict[tuple[int, tuple[str, ...]], tuple[Mapping[str, Any], _ReadPlan]] = {}
        self._env: rasterio.Env | None = None
        self.n_resigned = 0

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
        entry = _OpenDataset(rasterio.open(to_gdal_path(self._sign(href))))
        self._open[href] = entry
        while len(self._open) > self.max_open:
            self._drop(next(iter(self._open)))
        return entry

    def _with_dataset(self, href: str, fn: Callable[[_OpenDataset], Any]) -> Any:
        """Run ``fn(dataset)``; on HTTP 403 re-sign once and retry; redact all errors."""
        message = None
        for attempt in range(2):
            try:
                return fn(self._dataset(href, fresh=attempt > 0))
            except (RasterioError, OSError) as exn:
                self._drop(href)
                if attempt == 0 and self.signer is not None and is_http_403(exn):
                    log.info("HTTP 403 on %s: re-signing once", redact_url(href))
                    self.n_resigned += 1
                    continue
                message = f"{type(exn).__name__}: {redact_text(str(exn))}"
                break
        # Raised outside the except block so that no exception context carries the signed href.
        raise ChipReadError(f"cannot read {redact_url(href)}: {message}")

    # -- reading ----------------------------------------------------------------------------
    def read(self, item: Mapping[str, Any], tile: TileSpec, *, bands: Sequence[str] | None = None,
             out_size: int | None = None, max_nodata_fraction: float = 0.1,
             max_cloud_fraction: float | None = 0.1,
             cloud_classes: Sequence[int] = S2_SCL_CLOUD_CLASSES, harmonize: bool = True,
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
              cloud_classes: Sequence[int], harmonize: bool, raise_on_error: bool) -> ChipResult:
        collection = item.get("collection")
        try:
            band_set: BandSet | None = band_set_for(str(collection))
        except KeyError:
            band_set = None
        if bands is None:
            if band_set is None:
                raise KeyError(f"unknown collection {collection!r}: pass bands=[...]")
            bands = band_set.bands
        bands = list(bands)
        result = ChipResult(
            array=None, bands=bands, nodata_fraction=1.0, processing_baseline=processing_baseline(item),
            item_id=item.get("id"), collection=collection, crs=tile.crs,
        )
        height, width = (out_size, out_size) if out_size else (tile.height, tile.width)
        default_nodata = band_set.nodata if band_set else 0
        try:
            plan = self._plan(item, bands, band_set)
        except KeyError as exn:
            result.rejected_reason = f"missing_band: {exn.args[0]}"
            return result
        result.sources = list(plan.redacted)
        dst_crs = _parse_crs(tile.crs)

        out: np.ndarray | None = None
        invalid: np.ndarray | None = None
        try:
            for href, positions, indexes, nodata in plan.reads:
                data, bad = self._read_asset(href, indexes, tile, dst_crs, height, width, nodata,
                                             default_nodata, Resampling.bilinear)
                if len(plan.reads) == 1:
                    out, invalid = data, bad  # one asset holds every band, in order: no copy
                else:
                    if out is None or invalid is None:
                        out = np.empty((len(bands), height, width), dtype=np.uint16)
                        invalid = np.zeros((height, width), dtype=bool)
                    out[positions] = data
                    invalid |= bad
            assert out is not None and invalid is not None
            cloud_fraction = None
            cloud_asset = band_set.cloud_asset if band_set else None
            if max_cloud_fraction is not None and cloud_asset and cloud_asset in item.get("assets", {}):
                scl_href = item["assets"][cloud_asset]["href"]
                scl, scl_bad = self._read_asset(scl_href, [1], tile, dst_crs, height, width, 0, 0,
                                                Resampling.nearest)
                valid = ~(invalid | scl_bad)
                n_valid = int(valid.sum())
                cloudy = np.isin(scl[0], np.asarray(cloud_classes)) & valid
                cloud_fraction = float(cloudy.sum()) / n_valid if n_valid else 1.0
                result.cloud_fraction = cloud_fraction
                result.sources = sorted({*result.sources, redact_url(scl_href)})
        except ChipReadError as exn:
            if raise_on_error:
                raise
            result.rejected_reason = f"read_error: {exn}"
            return result

        result.nodata_fraction = np.count_nonzero(invalid) / invalid.size if invalid.size else 1.0
        if result.nodata_fraction > max_nodata_fraction:
            result.rejected_reason = (
                f"nodata_fraction {result.nodata_fraction:.3f} > {max_nodata_fraction}"
            )
            return result
        if result.cloud_fraction is not None and max_cloud_fraction is not None \
                and result.cloud_fraction > max_cloud_fraction:
            result.rejected_reason = f"cloud_fraction {result.cloud_fraction:.3f} > {max_cloud_fraction}"
            return result
        if invalid.any():
            out[:, invalid] = default_nodata
        if harmonize and band_set is not None and band_set.harmonize_s2 and needs_s2_harmonization(item):
            harmonize_s2(out, default_nodata)
            result.harmonized = True
        result.array = out
        return result

    def _plan(self, item: Mapping[str, Any], bands: list[str], band_set: BandSet | None) -> _ReadPlan:
        """Band sources grouped per asset, cached per (item object, bands)."""
        key = (id(item), tuple(bands))
        hit = self._plans.get(key)
        if hit is not None and hit[0] is item:
            return hit[1]
        sources = resolve_band_sources(item, bands, band_set)
        by_href: dict[str, list[int]] = {}
        for i, src in enumerate(sources):
            by_href.setdefault(src.href, []).append(i)
        plan = _ReadPlan(
            reads=[(href, pos, [sources[p].index for p in pos], sources[pos[0]].nodata)
                   for href, pos in by_href.items()],
            redacted=tuple(sorted({redact_url(src.href) for src in sources})),
        )
        self._plans[key] = (item, plan)  # keeps ``item`` alive, so its id cannot be reused
        while len(self._plans) > 256:
            self._plans.pop(next(iter(self._plans)))
        return plan

    def _read_asset(self, href: str, indexes: list[int], tile: TileSpec, dst_crs: CRS, height: int,
                    width: int, nodata: float | None, default_nodata: float,
                    resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:
        """Read ``indexes`` of one asset onto the tile grid; returns (data, invalid-mask)."""

        def read(entry: _OpenDataset) -> tuple[np.ndarray, np.ndarray]:
            src = entry.ds
            src_nodata = nodata if nodata is not None else entry.nodata
            if src_nodata is None:
                src_nodata = default_nodata
            same_crs = entry.same_crs(tile.crs, dst_crs)
            has_mask = bool(entry.mask_flags[indexes[0] - 1] & _MASK_OR_ALPHA)
            if same_crs:
                window = entry.window(tile.bounds)
                inside = (window.col_off >= -1e-6 and window.row_off >= -1e-6
                          and window.col_off + window.width <= src.width + 1e-6
                          and window.row_off + window.height <= src.height + 1e-6)
                same_grid = _is_integer_window(window) and int(round(window.width)) == width \
                    and int(round(window.height)) == height
                if same_grid:
                    window = Window(round(window.col_off), round(window.row_off), width, height)
                rs = Resampling.nearest if same_grid else resampling
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
            if np.isnan(src_nodata):
                bad = np.isnan(data).any(axis=0)
            elif data.dtype.kind == "u" and src_nodata == 0:
                bad = data.min(axis=0) == 0  # unsigned: any band == 0  <=>  min == 0
            else:
                nd = data.dtype.type(src_nodata) if data.dtype.kind in "ui" and float(src_nodata).is_integer() \
                    else src_nodata
                bad = (data == nd).any(axis=0)
            if masks is not None:
                bad |= np.any(masks == 0, axis=0)
            return _to_uint16(data), bad

        return self._with_dataset(href, read)


@functools.lru_cache(maxsize=256)
def _parse_crs(crs: str) -> CRS:
    return CRS.from_user_input(crs)


def _is_integer_window(w: Window, tol: float = 1e-6) -> bool:
    return all(abs(v - round(v)) < tol for v in (w.col_off, w.row_off, w.width, w.height))


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
              max_cloud_fraction: float | None = 0.1, cloud_classes: Sequence[int] = S2_SCL_CLOUD_CLASSES,
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
        cloud_classes: SCL classes counted as cloud.
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
