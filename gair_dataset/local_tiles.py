"""A folder of GeoTIFFs as a STAC catalog: one item per file, made with rio-stac (no hand-written STAC JSON).

Each ``*.tif`` / ``*.tiff`` under the folder becomes an item (id: the file name without its suffix) with one asset
holding every band of the file: projection fields (``proj:code``, ``proj:shape``, ``proj:transform``,
``proj:bbox``, from ``rio_stac.create_stac_item``), ``eo:bands`` (band names, see :func:`band_names`) and
``raster:bands`` (data type, nodata, resolution; no statistics, so no pixel is read). With ``tile_grid: {kind:
item}`` every file is then its own tile. The search filters the items like a STAC API (``matches``), except that
an item without a cloud cover (user tiles rarely have one) passes a ``max_cloud_cover`` filter.

Datetime of a file, first found: the ``datetime`` setting (one date for every file), a date in the file name
(``YYYYMMDD`` or ``YYYY-MM-DD``, optionally followed by ``THHMMSS``), the ``TIFFTAG_DATETIME`` tag or a
``datetime`` tag. A file with none is refused with its path.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import rasterio
from rio_stac import create_stac_item

from gair_dataset.bands import (
    LANDSAT_C2_L2_BANDS,
    NAIP_BANDS,
    S2_COMMON_NAMES,
    S2_L2A_ALL_BANDS,
    S2_L2A_BANDS,
)
from gair_dataset.stac_catalog import SearchParams, StacSearchError, matches

log = logging.getLogger(__name__)

#: File suffixes read as GeoTIFFs (case-insensitive).
GEOTIFF_SUFFIXES = (".tif", ".tiff")
#: Default band names by band count, per collection (when the file's band descriptions are not band names).
_S2_BY_COUNT = {12: S2_L2A_ALL_BANDS, 10: S2_L2A_BANDS}
_DEFAULT_BANDS: dict[str, dict[int, tuple[str, ...]]] = {
    "sentinel-2-l2a": _S2_BY_COUNT, "sentinel-2-c1-l2a": _S2_BY_COUNT, "sentinel-s2-l2a-cogs": _S2_BY_COUNT,
    "naip": {4: NAIP_BANDS},
    "landsat-c2-l2": {6: LANDSAT_C2_L2_BANDS}, "landsat-8-c2-l2": {6: LANDSAT_C2_L2_BANDS},
}
_COMMON_NAMES: dict[str, str] = {**S2_COMMON_NAMES, "R": "red", "G": "green", "B": "blue", "NIR": "nir",
                                  **{b: b for b in LANDSAT_C2_L2_BANDS}}
_NAME_DATE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?:T(\d{2}):?(\d{2}):?(\d{2}))?(?!\d)")


@dataclass(frozen=True)
class FolderCatalog:
    """Settings of a folder-of-GeoTIFFs catalog.

    Attributes:
        path: the folder (searched recursively).
        collection: collection id of every item; None: the search's collection (the region's ``collections``
            must then name exactly one).
        datetime: an ISO date or date-time given to every file; None: from each file's name or tags.
        bands: band names of every file, in band order; None: see :func:`band_names`.
        asset: asset key of the file; None: ``image`` for NAIP (its one band asset), else ``data``.
    """

    path: Path
    collection: str | None = None
    datetime: str | None = None
    bands: tuple[str, ...] | None = None
    asset: str | None = None

    def files(self) -> list[Path]:
        """The GeoTIFFs under the folder, sorted by path.

        Raises:
            StacSearchError: the folder does not exist or holds no GeoTIFF.
        """
        if not self.path.is_dir():
            raise StacSearchError(f"GeoTIFF folder not found: {self.path}")
        found = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in GEOTIFF_SUFFIXES
                       and not p.name.startswith("."))
        if not found:
            raise StacSearchError(f"no GeoTIFF (*.tif, *.tiff) under {self.path}")
        return found


def band_names(count: int, descriptions: Sequence[str | None], collection: str,
               given: Sequence[str] | None = None) -> list[str]:
    """Names of a file's bands, in band order.

    The ``bands`` setting when given; else the file's band descriptions when each is a band name of the collection
    (e.g. ``B02``); else the collection's band list of that length (Sentinel-2 L2A: 12 bands ``B01..B12``, 10 bands
    the GAIR order; NAIP: ``R, G, B, NIR``; Landsat C2 L2: 6 bands); else ``b1..bN``.

    Raises:
        ValueError: ``given`` does not have one name per band.
    """
    if given:
        if len(given) != count:
            raise ValueError(f"{len(given)} band names given ({', '.join(given)}) for {count} bands")
        return list(given)
    by_count = _DEFAULT_BANDS.get(collection, {})
    known = {b for names in by_count.values() for b in names}
    if descriptions and all(d in known for d in descriptions) and len(set(descriptions)) == count:
        return [str(d) for d in descriptions]
    return list(by_count.get(count, [f"b{i}" for i in range(1, count + 1)]))


def _file_datetime(path: Path, tags: dict[str, str], given: str | None) -> dt.datetime:
    """The acquisition time of a file: the setting, a date in its name, or a tag (UTC when no zone is given)."""

    def utc(t: dt.datetime) -> dt.datetime:
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)

    if given:
        try:
            return utc(dt.datetime.fromisoformat(given.replace("Z", "+00:00")))
        except ValueError as exc:
            raise ValueError(f"datetime setting {given!r} is not an ISO date or date-time") from exc
    m = _NAME_DATE.search(path.stem)
    if m:
        try:
            y, mo, d, h, mi, sec = (int(v) if v is not None else 0 for v in m.groups())
            return utc(dt.datetime(y, mo, d, h, mi, sec))
        except ValueError:
            pass  # digits that are not a date (e.g. 20231399): try the tags
    for key in ("TIFFTAG_DATETIME", "datetime", "DATETIME"):
        value = tags.get(key)
        if value:
            text = value.strip()
            for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
                try:
                    return utc(dt.datetime.strptime(text, fmt))
                except ValueError:
                    continue
            try:
                return utc(dt.datetime.fromisoformat(text.replace("Z", "+00:00")))
            except ValueError:
                continue
    raise ValueError(f"{path}: no datetime: set the catalog's datetime, put a date (YYYYMMDD or YYYY-MM-DD) in the "
                     f"file name, or a TIFFTAG_DATETIME tag")


def _cloud_cover(tags: dict[str, str]) -> float | None:
    for key in ("eo:cloud_cover", "cloud_cover", "CLOUD_COVER"):
        if tags.get(key) not in (None, ""):
            try:
                value = float(tags[key])
            except ValueError:
                continue
            if math.isfinite(value):
                return value
    return None


def file_item(path: Path, catalog: FolderCatalog, collection: str) -> dict[str, Any]:
    """The STAC item (dict) of one GeoTIFF: rio-stac's item with the projection fields, plus eo and raster bands.

    Raises:
        ValueError: the file has no CRS, no datetime, or a band count that does not match the ``bands`` setting;
            the message names the file.
    """
    asset_key = catalog.asset or ("image" if collection == "naip" else "data")  # NAIP's own key for its one asset
    with rasterio.open(path) as ds:
        if ds.crs is None:
            raise ValueError(f"{path}: the GeoTIFF has no CRS (an item tile needs one)")
        try:
            names = band_names(ds.count, list(ds.descriptions), collection, catalog.bands)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        tags = {**ds.tags(), **ds.tags(ns="IMAGE_STRUCTURE")}
        when = _file_datetime(path, tags, catalog.datetime)
        item = create_stac_item(ds, input_datetime=when, collection=collection, id=path.stem, asset_name=asset_key,
                                asset_roles=["data"], asset_href=str(path.resolve()), with_proj=True).to_dict()
        nodata = ds.nodata
        raster_bands = [{"data_type": dtype, "spatial_resolution": float(abs(ds.res[0])),
                         **({"nodata": nodata} if nodata is not None and math.isfinite(nodata) else {})}
                        for dtype in ds.dtypes]
    eo_bands = [{"name": n, **({"common_name": _COMMON_NAMES[n]} if n in _COMMON_NAMES else {})} for n in names]
    asset = item["assets"][asset_key]
    asset.update({"eo:bands": eo_bands, "raster:bands": raster_bands})
    item["stac_extensions"] = sorted({*item.get("stac_extensions", []),
                                      "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                                      "https://stac-extensions.github.io/raster/v1.1.0/schema.json"})
    item["links"] = []  # rio-stac's collection link is a bare id, not a resolvable href
    cloud = _cloud_cover(tags)
    if cloud is not None:
        item["properties"]["eo:cloud_cover"] = cloud
    item["properties"]["gair:source"] = "geotiff-folder"
    return item


def folder_items(catalog: FolderCatalog, collection: str) -> list[dict[str, Any]]:
    """One item per GeoTIFF of the folder, in path order.

    Raises:
        StacSearchError: the folder is missing or empty, a file cannot be made an item (the message names it), or
            two files share a name (an item id must be unique).
    """
    items: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for path in catalog.files():
        if path.stem in seen:
            raise StacSearchError(f"two GeoTIFFs give the item id {path.stem!r}: {seen[path.stem]} and {path}; "
                                  f"item ids (file names without suffix) must be unique")
        seen[path.stem] = path
        try:
            items.append(file_item(path, catalog, collection))
        except (ValueError, rasterio.errors.RasterioError) as exc:
            why = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            raise StacSearchError(f"GeoTIFF folder {catalog.path}: a file cannot be made a STAC item: {why}") from exc
    return items


def search_folder(catalog: FolderCatalog, params: SearchParams) -> list[dict[str, Any]]:
    """Search a folder of GeoTIFFs like a STAC API (:func:`gair_dataset.stac_catalog.search_local`'s result format).

    Returns:
        Matching items, sorted by datetime then id, at most ``params.max_items``. An item without a cloud cover
        passes the ``max_cloud_cover`` filter.

    Raises:
        StacSearchError: no collection can be chosen, or the folder cannot be read (see :func:`folder_items`).
    """
    collection = catalog.collection
    if collection is None:
        if len(params.collections) != 1:
            raise StacSearchError(f"GeoTIFF folder {catalog.path}: give its collection (the search names "
                                  f"{len(params.collections)} collections: {', '.join(params.collections)})")
        collection = params.collections[0]
    no_cloud_filter = replace(params, max_cloud_cover=None)
    found = []
    for item in folder_items(catalog, collection):
        cloud = item["properties"].get("eo:cloud_cover")
        if not matches(item, no_cloud_filter if cloud is None else params):
            continue
        found.append(item)
    found.sort(key=lambda it: (it["properties"]["datetime"], it["id"]))
    if params.max_items is not None:
        found = found[: params.max_items]
    log.info("GeoTIFF folder %s: %d item(s) match", catalog.path, len(found))
    return found


__all__ = ["FolderCatalog", "band_names", "file_item", "folder_items", "search_folder"]
