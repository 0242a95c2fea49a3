"""What the API sources share: items -> records and rejects, paging links, the image downloads."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pandas as pd
import requests

from gair_dataset.signing import redact_text, strip_token_params
from gair_dataset.streetview_points import COLUMNS, REJECT_COLUMNS, sanitize_id
from gair_dataset.sv_sources.http import ApiError, origin, redact_url
from gair_dataset.sv_sources.images import ImageCache

log = logging.getLogger(__name__)


def split_bbox(bbox: tuple[float, float, float, float], cell_deg: float) -> list[tuple[float, float, float, float]]:
    """Cut ``bbox`` into cells at most ``cell_deg`` on a side (APIs bound the area of one bbox search)."""
    w, s, e, n = bbox
    nx, ny = max(1, math.ceil((e - w) / cell_deg - 1e-9)), max(1, math.ceil((n - s) / cell_deg - 1e-9))
    dx, dy = (e - w) / nx, (n - s) / ny
    return [(w + i * dx, s + j * dy, w + (i + 1) * dx if i < nx - 1 else e, s + (j + 1) * dy if j < ny - 1 else n)
            for j in range(ny) for i in range(nx)]


def raw_text(item: Any, drop: Iterable[str] = ()) -> str:
    """The API's item as compact JSON for ``rejects.raw``, without the keys in ``drop`` (signed URLs).

    Every URL's query string and any credential parameter left in the text are redacted (``?<redacted>``): a
    signed image link or a token must not be stored.
    """
    if isinstance(item, dict):
        dropped = set(drop)
        item = {k: v for k, v in item.items() if k not in dropped}
    return redact_text(json.dumps(item, sort_keys=True, default=str))[:4000]


def reject(sv_id: Any, reason: str, raw: str, lon: Any = None, lat: Any = None) -> dict[str, Any]:
    """One reject row (``REJECT_COLUMNS``)."""
    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan
    return {"sv_id": None if sv_id is None else sanitize_id(str(sv_id)), "row": None, "lon": num(lon),
            "lat": num(lat), "image_uri": None, "reason": reason, "raw": raw}


Record = dict[str, Any]


class ItemCollector:
    """Records and rejects gathered from an API's items (pages may repeat an item: each is kept or rejected once).

    A usable item becomes a record (``rec["raw"]`` its redacted JSON, for a later reject; ``source_url`` without
    credential parameters); an unusable one a reject row whose ``raw`` is redacted (:func:`raw_text`).

    Args:
        api: the API's name, for reject reasons (``"Mapillary"``).
        prefix: ``sv_id`` prefix of the API's items (``"mly-"``).
        make_record: ``item -> (record, None)`` or ``(None, why it cannot be one)``.
        drop: item keys never stored in ``raw`` (signed URLs).
    """

    def __init__(self, api: str, prefix: str, make_record: Callable[[dict[str, Any]], tuple[Record | None, str | None]],
                 drop: Iterable[str] = ()) -> None:
        self.api, self.prefix, self.make_record, self.drop = api, prefix, make_record, tuple(drop)
        self.records: dict[str, Record] = {}
        self.rejects: list[Record] = []
        self._rejected: set[str] = set()

    def add(self, item: Any) -> None:
        """Keep ``item`` as a record, or reject it with its reason."""
        if not isinstance(item, dict) or "id" not in item:
            self.rejects.append(reject(None, f"{self.api} item without id", raw_text(item, self.drop)))
            return
        rec, why = self.make_record(item)
        if rec is None:
            if str(item["id"]) not in self._rejected:
                self._rejected.add(str(item["id"]))
                self.rejects.append(reject(f"{self.prefix}{item['id']}", f"{self.api} item unusable: {why}",
                                           raw_text(item, self.drop)))
        elif rec["sv_id"] not in self.records:
            if rec.get("source_url"):
                rec["source_url"] = strip_token_params(rec["source_url"])
            self.records[rec["sv_id"]] = {**rec, "raw": raw_text(item, self.drop)}

    def result(self, max_points: int | None) -> tuple[list[Record], list[Record]]:
        """``(records, rejects)``, at most ``max_points`` records."""
        out = list(self.records.values())
        return (out[:max_points] if max_points is not None else out), self.rejects


def api_endpoint(base_url: str, path: str) -> str:
    """``path`` under the API root ``base_url``, keeping the root's own query string (a tenant or version parameter).

    Args:
        base_url: the configured API root, e.g. ``https://h/api`` or ``https://h/api?tenant=x``.
        path: the endpoint below it, e.g. ``search``.

    Returns:
        e.g. ``https://h/api/search?tenant=x`` (``requests`` appends the search parameters after that query).
    """
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + path.lstrip("/")))


def page_url(url: str, params: dict[str, Any] | None = None) -> str:
    """The URL a GET of ``url`` with ``params`` requests (as ``requests`` encodes it): how pages are compared."""
    return str(requests.Request("GET", url, params=params).prepare().url)


def next_page(link: Any, *, api_base: str, seen: set[str], what: str) -> str | None:
    """Check a page's ``next`` link before following it; ``None`` when there is none.

    Args:
        link: the ``next`` URL from the page (None or empty: the last page).
        api_base: the configured API root; the link must have its scheme, host and port, because the request
            carries the credentials.
        seen: :func:`page_url` of every page requested so far (the link is added).
        what: the search, for messages.

    Raises:
        ApiError: the link names another scheme/host/port than the API (named, its query never), or a page already
            read (a server linking back would loop forever).
    """
    if not link:
        return None
    url = str(link)
    if origin(url) != origin(api_base):
        scheme, host, port = origin(url)
        raise ApiError(f"{what}: next-page link points to {scheme}://{host}:{port}, not the API's "
                       "{}://{}:{}; not followed (the request carries the credentials)".format(*origin(api_base)))
    key = page_url(url)
    if key in seen:
        raise ApiError(f"{what}: next-page link points back to a page already read ({redact_url(url)})")
    seen.add(key)
    log.debug("%s: next page %s", what, strip_token_params(url))
    return url


def download_images(records: list[dict[str, Any]], cache: ImageCache, *, what: str,
                    headers: dict[str, str] | None = None, auth_host: str | None = None,
                    workers: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch (or find cached) every record's ``image_url``; a failed image rejects its point with the cause.

    Args:
        records: points with ``COLUMNS`` but ``image_uri``, plus ``image_url`` (never stored) and ``raw``.
        cache: the image cache.
        what: the API, for messages.
        headers: sent with image requests to ``auth_host``'s origin only (a credential never goes to another host).
        auth_host: the API's URL (its scheme, host and port count).
        workers: parallel downloads.

    Returns:
        ``(points, rejects)``; points' ``image_uri`` is the cached file.
    """
    def one(rec: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        try:
            same_host = auth_host is not None and origin(rec["image_url"]) == origin(auth_host)
            path = cache.fetch(rec["sv_id"], rec["image_url"], what=f"{what} image {rec['sv_id']}",
                               headers=headers if same_host else None)
        except ApiError as exc:
            return rec, str(exc)
        return {**rec, "image_uri": str(path.resolve())}, None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, records))
    points = [rec for rec, err in results if err is None]
    rejects = [reject(rec["sv_id"], f"image download failed: {err}", rec["raw"], rec["lon"], rec["lat"])
               for rec, err in results if err is not None]
    return (pd.DataFrame(points, columns=COLUMNS).reset_index(drop=True),
            pd.DataFrame(rejects, columns=REJECT_COLUMNS))
