"""Mapillary Graph API v4: images in a bbox (``GET /images``), their thumbnails cached on disk.

``GET {url}/images?bbox=minLon,minLat,maxLon,maxLat&fields=...&limit=N`` answers
``{"data": [{"id", "geometry": {"type": "Point", "coordinates": [lon, lat]}, "captured_at" (ms since epoch),
"compass_angle", "thumb_1024_url", "creator": {"username", "id"}}, ...], "paging": {"next": url}}``; the token goes
in an ``Authorization: OAuth <token>`` header (never in a URL we build). Thumbnail URLs are signed and expire, so
images are downloaded now and ``source_url`` keeps the permanent ``mapillary.com/app/?pKey=<id>`` link instead.
Mapillary imagery is CC-BY-SA 4.0; attribution is the creator's username. ``paging.next`` is followed only on the
API's own scheme/host/port and never twice (:func:`gair_dataset.sv_sources.common.next_page`), without the
``access_token`` the Graph API echoes into it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pandas as pd
import requests

from gair_dataset.signing import strip_token_params
from gair_dataset.sv_sources.common import ItemCollector, api_endpoint, download_images, next_page, page_url, split_bbox
from gair_dataset.sv_sources.http import ApiError, get_json
from gair_dataset.sv_sources.images import ImageCache

MAPILLARY_URL = "https://graph.mapillary.com"
MAPILLARY_LICENSE = "CC-BY-SA-4.0"
THUMB_SIZES = ("thumb_256", "thumb_1024", "thumb_2048", "thumb_original")
#: Mapillary refuses bbox searches over large areas: the region is searched cell by cell.
CELL_DEG = 0.05
_WHAT = "Mapillary image search"


def _ms_to_iso(value: Any) -> str | None:
    """Mapillary ``captured_at`` (milliseconds since the epoch) as ISO 8601 UTC."""
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(float(value) / 1000.0, tz=UTC).isoformat().replace("+00:00", "Z")
    except (TypeError, ValueError, OverflowError, OSError):
        return str(value)


def _record(item: dict[str, Any], thumb_field: str) -> tuple[dict[str, Any] | None, str | None]:
    """A points record from one ``data`` entry, or a reason why it cannot be one."""
    geom = item.get("computed_geometry") or item.get("geometry") or {}
    coords = geom.get("coordinates") if isinstance(geom, dict) else None
    if not (isinstance(coords, list | tuple) and len(coords) >= 2):
        return None, "no point geometry in the API answer"
    url = item.get(thumb_field)
    if not url:
        return None, f"no {thumb_field} in the API answer"
    creator = item.get("creator") or {}
    username = creator.get("username") if isinstance(creator, dict) else None
    heading = item.get("compass_angle")
    return {
        "sv_id": f"mly-{item['id']}",
        "lon": float(coords[0]), "lat": float(coords[1]),
        "heading": float(heading) if heading is not None else math.nan,
        "captured_at": _ms_to_iso(item.get("captured_at")),
        "source": "mapillary", "license": MAPILLARY_LICENSE,
        "attribution": f"{username}, Mapillary" if username else "Mapillary contributors",
        "source_url": f"https://www.mapillary.com/app/?pKey={quote(str(item['id']), safe='')}",
        "image_url": url,
    }, None


def search_mapillary(bbox: tuple[float, float, float, float], *, token: str, session: requests.Session,
                     base_url: str | None = None, page_size: int = 100, max_points: int | None = None,
                     image_size: str | None = None, token_env: str | None = None, timeout_s: float = 30.0,
                     cell_deg: float = CELL_DEG) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Page through ``/images`` over ``bbox`` (cell by cell); return ``(records, reject rows)``.

    Raises:
        AuthError: the token was refused (expired, invalid).
        ApiError: the API kept failing (after retries), answered something else than documented, or a
            ``paging.next`` link named another host (the token is never sent there) or a page already read.
    """
    size = image_size or "thumb_1024"
    if size not in THUMB_SIZES:
        raise ValueError(f"Mapillary image_size must be one of {THUMB_SIZES}, got {size!r}")
    thumb_field = f"{size}_url"
    headers = {"Authorization": f"OAuth {token}"}
    fields = f"id,geometry,computed_geometry,captured_at,compass_angle,{thumb_field},creator"
    api = (base_url or MAPILLARY_URL).rstrip("/")
    items = ItemCollector("Mapillary", "mly-", lambda item: _record(item, thumb_field),
                          drop=[f"{s}_url" for s in THUMB_SIZES])
    seen: set[str] = set()
    for cell in split_bbox(bbox, cell_deg):
        url: str | None = api_endpoint(api, "images")
        params: dict[str, Any] | None = {"bbox": ",".join(f"{v:.7f}" for v in cell), "fields": fields,
                                         "limit": page_size}
        while url and (max_points is None or len(items.records) < max_points):
            seen.add(page_url(url, params))
            page = get_json(session, url, what=_WHAT, params=params, headers=headers, timeout=timeout_s,
                            token_env=token_env)
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                got = sorted(page)[:8] if isinstance(page, dict) else type(page).__name__
                raise ApiError(f"{_WHAT}: answer without a 'data' list (got {got})")
            for item in page["data"]:
                items.add(item)
            nxt = (page.get("paging") or {}).get("next")
            # The graph API echoes access_token into paging.next: the header carries it, the URL need not.
            url = next_page(strip_token_params(str(nxt)) if nxt else None, api_base=api, seen=seen, what=_WHAT)
            params = None
    return items.result(max_points)


def fetch_mapillary(bbox: tuple[float, float, float, float], *, token: str, session: requests.Session,
                    cache: ImageCache, base_url: str | None = None, page_size: int = 100,
                    max_points: int | None = None, image_size: str | None = None, token_env: str | None = None,
                    timeout_s: float = 30.0, cell_deg: float = CELL_DEG) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mapillary images in ``bbox`` as the points table, images cached; ``(points, rejects)``.

    Args:
        bbox: ``(west, south, east, north)`` in EPSG:4326.
        token: the access token (sent as a header, never logged).
        session: from :func:`gair_dataset.sv_sources.make_session`.
        cache: the image cache (a cached image is not fetched again).
        base_url: API root (default ``https://graph.mapillary.com``).
        page_size: ``limit`` per request.
        max_points: stop after this many images.
        image_size: ``thumb_256|thumb_1024|thumb_2048|thumb_original`` (default ``thumb_1024``).
        token_env: the variable the token came from (named in errors).
        timeout_s: per request.
        cell_deg: the region is searched in cells of at most this many degrees a side.

    Raises:
        AuthError: the token was refused.
        ApiError: the search failed after retries.
    """
    records, rejects = search_mapillary(bbox, token=token, session=session, base_url=base_url, page_size=page_size,
                                        max_points=max_points, image_size=image_size, token_env=token_env,
                                        timeout_s=timeout_s, cell_deg=cell_deg)
    points, failed = download_images(records, cache, what="Mapillary")
    rows: list[dict[Any, Any]] = [*rejects, *failed.to_dict("records")]
    return points, pd.DataFrame(rows, columns=failed.columns)
