"""STAC item discovery: a live STAC API (pystac-client) and local catalogs, with one result format.

Both return plain item dicts (STAC Item JSON) whose asset hrefs are absolute and **unsigned**: any
Shared Access Signature query string (Planetary Computer) is stripped before an item leaves this module,
so items can be written to disk, logs and metadata safely. Sign late, just before a read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import geopandas as gpd
import shapely
from shapely.geometry import box, shape

from gair_dataset.atomic import atomic_path
from gair_dataset.bands import processing_baseline
from gair_dataset.geo import check_bbox
from gair_dataset.signing import redact_text, strip_token_params

log = logging.getLogger(__name__)

PLANETARY_COMPUTER_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"


class StacSearchError(RuntimeError):
    """The catalog could not be searched (unreachable, HTTP error after retries, unreadable file)."""


@dataclass(frozen=True)
class SearchParams:
    """What to search for.

    Attributes:
        collections: collection ids, e.g. ``["sentinel-2-l2a"]``.
        bbox: ``[west, south, east, north]`` in EPSG:4326 (or None when ``intersects`` is given).
        intersects: a GeoJSON geometry (EPSG:4326) instead of a bbox.
        datetime: an RFC 3339 interval such as ``"2021-01-01/2023-12-31"``; None for any time.
        max_cloud_cover: keep items with ``eo:cloud_cover`` <= this (percent); None for no limit.
        max_items: stop after this many items (None: all pages).
        limit: page size requested from the API.
    """

    collections: tuple[str, ...]
    bbox: tuple[float, float, float, float] | None = None
    intersects: dict | None = None
    datetime: str | None = None
    max_cloud_cover: float | None = None
    max_items: int | None = 500
    limit: int = 100
    extra: dict = field(default_factory=dict)
    conforms_to: tuple[str, ...] = ()
    """Conformance classes to assume for an API whose landing page lacks them (pystac-client
    ``add_conforms_to`` names: ``ITEM_SEARCH``, ``QUERY``, ``FILTER``, ...), e.g. Earth Search v0."""

    def __post_init__(self) -> None:
        if not self.collections:
            raise ValueError("at least one collection is required")
        if self.bbox is None and self.intersects is None:
            raise ValueError("a bbox or an intersects geometry is required")
        if self.bbox is not None:
            object.__setattr__(self, "bbox", check_bbox(self.bbox))
        if self.max_cloud_cover is not None and not 0 <= self.max_cloud_cover <= 100:
            raise ValueError(f"max_cloud_cover must be within 0..100, got {self.max_cloud_cover}")

    def area(self):
        """The search area as a shapely geometry."""
        if self.intersects is not None:
            return shape(self.intersects)
        assert self.bbox is not None  # __post_init__ requires one of the two
        return box(*self.bbox)

    def describe(self) -> dict:
        """A JSON-friendly description (for logs and metadata)."""
        d = asdict(self)
        d["collections"] = list(self.collections)
        d["conforms_to"] = list(self.conforms_to)
        d["bbox"] = list(self.bbox) if self.bbox else None
        if self.intersects is not None:  # a summary: a detailed boundary would flood logs and metadata
            geom = self.area()
            digest = hashlib.sha256(json.dumps(self.intersects, sort_keys=True).encode()).hexdigest()[:12]
            d["intersects"] = {"type": geom.geom_type, "vertices": int(shapely.get_num_coordinates(geom)),
                               "bounds": [round(v, 6) for v in geom.bounds], "sha256": digest}
        return d


def strip_sas_token(href: str) -> str:
    """Remove signature/token query parameters from a URL, keep the rest (fragment included)."""
    return strip_token_params(href, keep_fragment=True)


def unsign_item(item: dict) -> dict:
    """Return a copy of an item dict in which no URL carries a SAS token.

    Every URL anywhere in the item is cleaned (asset and link hrefs, nested ones such as
    ``assets.*.alternate.*.href``, and URL-valued properties), not only the top-level hrefs.
    """

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        if isinstance(node, str) and "?" in node and "://" in node:
            return strip_sas_token(node)
        return node

    return clean(json.loads(json.dumps(item)))


def item_epsg(item: dict) -> int | None:
    """The item's EPSG code from ``proj:epsg`` / ``proj:code`` (item or first asset that has one)."""
    candidates = [item.get("properties", {})] + list(item.get("assets", {}).values())
    for src in candidates:
        if src.get("proj:epsg") is not None:
            return int(src["proj:epsg"])
        code = src.get("proj:code")
        if isinstance(code, str) and code.upper().startswith("EPSG:"):
            return int(code.split(":")[1])
    return None


def _parse_dt(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _interval(dt: str | None) -> tuple[datetime | None, datetime | None]:
    if not dt:
        return None, None
    if "/" not in dt:
        t = _parse_dt(dt if "T" in dt else f"{dt}T00:00:00Z")
        return t, t
    start, end = dt.split("/", 1)

    def bound(v: str, is_end: bool) -> datetime | None:
        if v in ("", ".."):
            return None
        if "T" not in v:
            v = f"{v}T23:59:59.999999Z" if is_end else f"{v}T00:00:00Z"
        return _parse_dt(v)

    return bound(start, False), bound(end, True)


def _item_datetime(item: dict) -> datetime:
    props = item.get("properties", {})
    value = props.get("datetime") or props.get("start_datetime")
    if not value:
        raise ValueError(f"item {item.get('id')} has no datetime")
    t = _parse_dt(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def matches(item: dict, params: SearchParams) -> bool:
    """Whether an item satisfies the search (used for local catalogs and as a client-side guard)."""
    if item.get("collection") not in params.collections:
        return False
    geom = item.get("geometry")
    if geom is None or not shape(geom).intersects(params.area()):
        return False
    lo, hi = _interval(params.datetime)
    t = _item_datetime(item)
    if (lo and t < lo) or (hi and t > hi):
        return False
    if params.max_cloud_cover is not None:
        cc = item.get("properties", {}).get("eo:cloud_cover")
        if cc is None or not math.isfinite(float(cc)) or float(cc) > params.max_cloud_cover:
            return False
    return True


def _absolutize(item: dict, base: str) -> dict:
    for asset in item.get("assets", {}).values():
        href = asset.get("href", "")
        if href and not urlsplit(href).scheme:
            asset["href"] = str(Path(urljoin(base, href)).resolve()) if not href.startswith("/") else href
    return item


GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet")


def _iter_catalog_items(path: Path) -> Iterable[dict]:
    """Yield items (asset hrefs absolute) from a catalog, collection, item collection, ndjson or stac-geoparquet."""
    if path.is_dir():
        path = path / "catalog.json"
    if not path.exists():
        raise StacSearchError(f"local catalog not found: {path}")
    if path.suffix.lower() in GEOPARQUET_SUFFIXES:
        yield from (_absolutize(item, str(path)) for item in _read_stac_geoparquet(path))
        return
    text = path.read_text()
    if path.suffix == ".ndjson":
        for line in text.splitlines():
            if line.strip():
                yield _absolutize(json.loads(line), str(path))
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StacSearchError(f"{path} is not valid JSON: {exc}") from exc
    yield from _iter_json_document(doc, path)


def _iter_json_document(doc: Any, path: Path) -> Iterable[dict]:
    """Items of one parsed JSON document: a list of items, an item, an item collection or a catalog/collection."""
    if isinstance(doc, list):  # a plain list of items (stac-geoparquet test data style)
        for item in doc:
            yield _absolutize(item, str(path))
        return
    kind = doc.get("type")
    if kind == "Feature":
        yield _absolutize(doc, str(path))
    elif kind == "FeatureCollection":
        for item in doc.get("features", []):
            yield _absolutize(item, str(path))
    elif kind in ("Catalog", "Collection"):
        for link in doc.get("links", []):
            if link.get("rel") in ("child", "item"):
                yield from _iter_catalog_items((path.parent / link["href"]).resolve())
    else:
        raise StacSearchError(f"{path}: not a STAC catalog, collection, item or item collection")


def _read_stac_geoparquet(path: Path) -> list[dict]:
    """Items of a stac-geoparquet file (read with rustac, which implements the spec)."""
    import rustac  # the STAC reader for stac-geoparquet; imported here so JSON catalogs never need it

    try:
        doc = rustac.read_sync(str(path), format="geoparquet")
    except Exception as exc:  # rustac raises its own error types (RustacError, OSError, ValueError)
        raise StacSearchError(f"{path} is not a readable stac-geoparquet file: {exc}") from exc
    if doc.get("type") != "FeatureCollection":
        raise StacSearchError(f"{path}: stac-geoparquet did not hold an item collection")
    return list(doc.get("features", []))


def search_local(catalog: str | Path, params: SearchParams) -> list[dict]:
    """Search a local static catalog (or item collection / ndjson / stac-geoparquet file) like a STAC API would.

    Returns:
        Matching items, sorted by datetime then id, at most ``params.max_items``.
    """
    found = [it for it in _iter_catalog_items(Path(catalog)) if matches(it, params)]
    found.sort(key=lambda it: (_item_datetime(it), it["id"]))
    if params.max_items is not None:
        found = found[: params.max_items]
    return [unsign_item(it) for it in found]


def retry_policy(max_retries: int = 5, backoff_factor: float = 1.0):
    """A urllib3 ``Retry`` that also retries 429/5xx answers to POST searches, honouring Retry-After."""
    from urllib3.util.retry import Retry

    return Retry(
        total=max_retries, connect=max_retries, read=max_retries, status=max_retries,
        backoff_factor=backoff_factor, backoff_max=60,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "POST", "HEAD"}),
        respect_retry_after_header=True, raise_on_status=True,
    )


def _stac_io(headers: dict[str, str] | None, timeout: float, max_retries: int, backoff_factor: float) -> Any:
    """A pystac-client ``StacApiIO`` with :func:`retry_policy` that also fetches a page again when it is not JSON.

    A page cut short (by a proxy, or a connection dropped mid-body) can arrive as HTTP 200: pystac-client would
    fail on it at once; it is fetched again, with the same backoff, up to ``max_retries`` times.
    """
    from pystac_client.stac_api_io import StacApiIO

    class RetryingStacApiIO(StacApiIO):
        def read_json(self, source: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            where = strip_sas_token(str(getattr(source, "href", source)))
            attempt = 0
            while True:
                text = self.read_text(source, *args, **kwargs)
                try:
                    return dict(self.json_loads(text))
                except json.JSONDecodeError as exc:
                    if attempt >= max_retries:
                        raise ValueError(f"{where} answered {attempt + 1} time(s) with a page that is not JSON "
                                         f"({exc})") from None
                    delay = backoff_factor * 2**attempt
                    log.warning("%s answered a page that is not JSON (%s); fetching it again in %.1f s", where,
                                exc, delay)
                    time.sleep(delay)
                    attempt += 1

    return RetryingStacApiIO(headers=headers, timeout=timeout, max_retries=retry_policy(max_retries, backoff_factor))


def search_live(url: str, params: SearchParams, *, modifier: Callable[[Any], None] | None = None,
                max_retries: int = 5, backoff_factor: float = 1.0, timeout: float = 60.0,
                headers: dict[str, str] | None = None) -> list[dict]:
    """Search a STAC API with pystac-client: paging, retries with backoff on 429/5xx, timeouts.

    Args:
        url: the API root, e.g. ``PLANETARY_COMPUTER_URL``.
        params: what to search for.
        modifier: pystac-client modifier, e.g. ``planetary_computer.sign_inplace``; hrefs are unsigned
            again before they are returned.
        max_retries: retries per request (connection errors, timeouts, 429, 5xx, a page that is not JSON).
        backoff_factor: exponential backoff base in seconds.
        timeout: seconds per request.
        headers: extra HTTP headers (e.g. an API key: never logged).

    Returns:
        Unsigned item dicts, at most ``params.max_items``.

    Raises:
        StacSearchError: the API is unreachable, kept failing after the retries, does not declare a conformance
            class the search needs (declare it with ``params.conforms_to``), or answered something pystac-client
            cannot use.
    """
    import requests
    from pystac.errors import STACError
    from pystac_client import Client
    from pystac_client.errors import ClientTypeError
    from pystac_client.exceptions import APIError
    from pystac_client.warnings import DoesNotConformTo, PystacClientWarning

    stac_io = _stac_io(headers, timeout, max_retries, backoff_factor)
    where = f"STAC search at {strip_sas_token(url)}"
    try:
        # Client.open resets the stac_io's timeout to its own argument (None: wait forever): pass it again.
        client = Client.open(url, modifier=modifier, stac_io=stac_io, headers=headers, timeout=timeout)
        for name in params.conforms_to:
            try:
                client.add_conforms_to(name)
            except KeyError as exc:  # pystac-client raises KeyError for an unknown conformance class name
                raise StacSearchError(f"{where} failed: unknown conformance class {exc} in conforms_to "
                                      f"{list(params.conforms_to)}") from None
        kwargs: dict[str, Any] = {"collections": list(params.collections), "datetime": params.datetime,
                                  "max_items": params.max_items, "limit": params.limit, "method": "POST"}
        if params.intersects is not None:
            kwargs["intersects"] = params.intersects
        elif params.bbox is not None:
            kwargs["bbox"] = list(params.bbox)
        if params.max_cloud_cover is not None and client.conforms_to("QUERY"):
            kwargs["query"] = {"eo:cloud_cover": {"lte": params.max_cloud_cover}}
        kwargs.update(params.extra)
        search = client.search(**kwargs)
        items = [unsign_item(it) for it in search.items_as_dicts()]
    except DoesNotConformTo as exc:
        raise StacSearchError(
            f"{where} failed: {exc}; the API's landing page does not declare that conformance class. If the API "
            f"does support it (e.g. Earth Search v0), declare it in the region: conforms_to: [{exc.args[0]}]"
        ) from exc
    except StacSearchError:
        raise
    except KeyError as exc:  # a response without a field pystac-client needs (a malformed page or item)
        raise StacSearchError(f"{where} failed: malformed response: missing field {exc}") from exc
    except (APIError, ClientTypeError, PystacClientWarning, STACError, requests.RequestException, OSError,
            ValueError, TypeError) as exc:
        raise StacSearchError(f"{where} failed: {type(exc).__name__}: {redact_text(str(exc))[:500]}") from exc
    # Client-side guard: servers without the query extension ignore the cloud filter.
    kept = [it for it in items if matches(it, params)]
    if len(kept) < len(items):
        log.info("client-side filter dropped %d of %d items", len(items) - len(kept), len(items))
    return kept


def validate_items(items: list[dict], required_assets: Iterable[str] = (), *,
                   check_bands: bool = False) -> tuple[list[dict], list[dict]]:
    """Split items into usable ones and rejects ``{"item_id", "reason"}``.

    An item needs a footprint, a datetime, a projection (``proj:epsg`` or ``proj:code``) and its band assets:
    the ``required_assets`` keys, and with ``check_bands`` its own collection's band profile
    (:func:`gair_dataset.bands.resolve_item_bands`: Planetary Computer ``B04`` and Earth Search ``red`` alike;
    an item of a collection without a profile is rejected with a reason naming it).
    """
    ok: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    required = list(required_assets)
    for it in items:
        reason = _item_problem(it, required, check_bands)
        if reason:
            rejects.append({"item_id": it.get("id"), "reason": reason})
        else:
            ok.append(it)
    return ok, rejects


def _item_problem(it: dict, required: list[str], check_bands: bool) -> str | None:
    """Why an item is unusable, or None."""
    if not it.get("geometry"):
        return "no geometry"
    if item_epsg(it) is None:
        return "no projection fields (proj:epsg / proj:code)"
    try:
        _item_datetime(it)
    except ValueError:
        return "no datetime"
    missing = [a for a in required if a not in it.get("assets", {})]
    if missing:
        return f"missing band assets: {','.join(missing)}"
    if check_bands:
        from gair_dataset.bands import UnknownCollectionError, resolve_item_bands

        try:
            resolved = resolve_item_bands(it)
        except UnknownCollectionError as exc:
            return str(exc)
        if not resolved.ok:
            return f"missing band assets: {resolved.describe_missing()}"
    return None


def items_to_geodataframe(items: list[dict]) -> gpd.GeoDataFrame:
    """One row per item: id, collection, datetime, cloud cover, platform, baseline, EPSG, footprint."""
    rows = []
    for it in items:
        p = it.get("properties", {})
        rows.append({
            "item_id": it["id"],
            "collection": it.get("collection"),
            "datetime": _item_datetime(it),
            "cloud_cover": float(p["eo:cloud_cover"]) if p.get("eo:cloud_cover") is not None else math.nan,
            "platform": p.get("platform"),
            "processing_baseline": processing_baseline(it),
            "epsg": item_epsg(it),
            "synthetic": bool(p.get("gair:synthetic", False)),
            "geometry": shape(it["geometry"]),
        })
    cols = ["item_id", "collection", "datetime", "cloud_cover", "platform", "processing_baseline", "epsg",
            "synthetic", "geometry"]
    return gpd.GeoDataFrame(rows, columns=cols, geometry="geometry", crs="EPSG:4326")


def write_items(items: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """Write ``items.json`` (FeatureCollection) and ``items.parquet`` (GeoParquet) atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fc = {"type": "FeatureCollection", "features": [unsign_item(it) for it in items]}
    json_path, pq_path = out_dir / "items.json", out_dir / "items.parquet"
    with atomic_path(json_path) as tmp_json, atomic_path(pq_path) as tmp_pq:  # both complete, then both renamed
        tmp_json.write_text(json.dumps(fc))
        items_to_geodataframe(items).to_parquet(tmp_pq, index=False)
    return json_path, pq_path


def read_items(out_dir: Path) -> list[dict]:
    """Read the items written by ``write_items``."""
    return json.loads((Path(out_dir) / "items.json").read_text())["features"]
