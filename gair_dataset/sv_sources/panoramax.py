"""Panoramax (a STAC API): pictures in a bbox (``GET {url}/search``), their images cached on disk.

``GET {url}/search?bbox=w,s,e,n&limit=N`` answers a GeoJSON ``FeatureCollection`` of picture items: ``id``,
``geometry`` (Point), ``properties.datetime``, ``properties["view:azimuth"]``, the licence
(``properties.license`` as an SPDX id, or ``geovisio:license``, or a ``rel=license`` link), the producer
(``providers`` with role ``producer``, or ``geovisio:producer``), ``assets`` ``hd``/``sd``/``thumb`` (image
hrefs) and ``links`` where ``rel=next`` is the next page. Panoramax images are public and their URLs stable; they
are cached anyway so that a rerun or the shards step needs no network.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import requests

from gair_dataset.sv_sources.common import ItemCollector, api_endpoint, download_images, next_page, page_url
from gair_dataset.sv_sources.http import ApiError, get_json, redact_url
from gair_dataset.sv_sources.images import ImageCache

PANORAMAX_URL = "https://api.panoramax.xyz/api"
ASSET_SIZES = ("hd", "sd", "thumb")
_WHAT = "Panoramax search"


def _link(links: Any, rel: str) -> dict[str, Any] | None:
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("rel") == rel and link.get("href"):
            return link
    return None


def _license(item: dict[str, Any]) -> str | None:
    props = item.get("properties") or {}
    lic = props.get("license") or props.get("geovisio:license") or item.get("license")
    if lic:
        return str(lic)
    link = _link(item.get("links"), "license")
    return str(link.get("title") or link["href"]) if link else None


def _producer(item: dict[str, Any]) -> str | None:
    props = item.get("properties") or {}
    for provider in props.get("providers") or item.get("providers") or []:
        if isinstance(provider, dict) and "producer" in (provider.get("roles") or []) and provider.get("name"):
            return str(provider["name"])
    producer = props.get("geovisio:producer")
    return str(producer) if producer else None


def _record(item: dict[str, Any], size: str) -> tuple[dict[str, Any] | None, str | None]:
    geom = item.get("geometry") or {}
    coords = geom.get("coordinates") if isinstance(geom, dict) else None
    if not (isinstance(coords, list | tuple) and len(coords) >= 2):
        return None, "no point geometry in the item"
    assets = item.get("assets") or {}
    asset = assets.get(size) or {}
    if not asset.get("href"):
        return None, f"no '{size}' asset (assets: {sorted(assets)})"
    props = item.get("properties") or {}
    heading = props.get("view:azimuth")
    producer = _producer(item)
    self_link = _link(item.get("links"), "self")
    return {
        "sv_id": f"pnx-{item['id']}",
        "lon": float(coords[0]), "lat": float(coords[1]),
        "heading": float(heading) if heading is not None else math.nan,
        "captured_at": None if props.get("datetime") is None else str(props["datetime"]),
        "source": "panoramax", "license": _license(item),
        "attribution": f"{producer}, Panoramax" if producer else "Panoramax contributors",
        "source_url": redact_url(self_link["href"]) if self_link else redact_url(asset["href"]),
        "image_url": str(asset["href"]),
    }, None


def search_panoramax(bbox: tuple[float, float, float, float], *, session: requests.Session,
                     base_url: str | None = None, page_size: int = 100, max_points: int | None = None,
                     image_size: str | None = None, headers: dict[str, str] | None = None,
                     token_env: str | None = None, timeout_s: float = 30.0,
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Page through ``/search`` over ``bbox`` following ``rel=next``; return ``(records, reject rows)``.

    Raises:
        AuthError: a token was required and refused.
        ApiError: the API kept failing (after retries), answered something else than a FeatureCollection, or a
            ``rel=next`` link named another host or a page already read.
    """
    size = image_size or "sd"
    if size not in ASSET_SIZES:
        raise ValueError(f"Panoramax image_size must be one of {ASSET_SIZES}, got {size!r}")
    api = (base_url or PANORAMAX_URL).rstrip("/")
    url: str | None = api_endpoint(api, "search")
    params: dict[str, Any] | None = {"bbox": ",".join(f"{v:.7f}" for v in bbox), "limit": page_size}
    items = ItemCollector("Panoramax", "pnx-", lambda item: _record(item, size))
    seen: set[str] = set()
    while url and (max_points is None or len(items.records) < max_points):
        seen.add(page_url(url, params))
        page = get_json(session, url, what=_WHAT, params=params, headers=headers, timeout=timeout_s,
                        token_env=token_env)
        if not isinstance(page, dict) or not isinstance(page.get("features"), list):
            raise ApiError(f"{_WHAT}: {redact_url(url)} did not answer a FeatureCollection")
        for item in page["features"]:
            items.add(item)
        nxt = _link(page.get("links"), "next")
        url = next_page(nxt["href"] if nxt else None, api_base=api, seen=seen, what=_WHAT)
        params = None
    return items.result(max_points)


def fetch_panoramax(bbox: tuple[float, float, float, float], *, session: requests.Session, cache: ImageCache,
                    base_url: str | None = None, page_size: int = 100, max_points: int | None = None,
                    image_size: str | None = None, token: str | None = None, token_env: str | None = None,
                    timeout_s: float = 30.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Panoramax pictures in ``bbox`` as the points table, images cached; ``(points, rejects)``.

    Args:
        bbox: ``(west, south, east, north)`` in EPSG:4326.
        session: from :func:`gair_dataset.sv_sources.make_session`.
        cache: the image cache.
        base_url: the instance's API root (default ``https://api.panoramax.xyz/api``).
        page_size: ``limit`` per page.
        max_points: stop after this many pictures.
        image_size: ``hd|sd|thumb`` asset (default ``sd``).
        token: optional bearer token (private instances); never logged.
        token_env: the variable it came from (named in errors).
        timeout_s: per request.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    records, rejects = search_panoramax(bbox, session=session, base_url=base_url, page_size=page_size,
                                        max_points=max_points, image_size=image_size, headers=headers,
                                        token_env=token_env, timeout_s=timeout_s)
    points, failed = download_images(records, cache, what="Panoramax", headers=headers,
                                     auth_host=base_url or PANORAMAX_URL)
    rows: list[dict[Any, Any]] = [*rejects, *failed.to_dict("records")]
    return points, pd.DataFrame(rows, columns=failed.columns)
