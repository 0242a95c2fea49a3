"""What the API sources share: the record -> points table step and the image downloads."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from gair_dataset.streetview_points import COLUMNS, REJECT_COLUMNS, sanitize_id
from gair_dataset.sv_sources.http import ApiError
from gair_dataset.sv_sources.images import ImageCache


def split_bbox(bbox: tuple[float, float, float, float], cell_deg: float) -> list[tuple[float, float, float, float]]:
    """Cut ``bbox`` into cells at most ``cell_deg`` on a side (APIs bound the area of one bbox search)."""
    w, s, e, n = bbox
    nx, ny = max(1, math.ceil((e - w) / cell_deg - 1e-9)), max(1, math.ceil((n - s) / cell_deg - 1e-9))
    dx, dy = (e - w) / nx, (n - s) / ny
    return [(w + i * dx, s + j * dy, w + (i + 1) * dx if i < nx - 1 else e, s + (j + 1) * dy if j < ny - 1 else n)
            for j in range(ny) for i in range(nx)]


def raw_text(item: Any, drop: Iterable[str] = ()) -> str:
    """The API's item as compact JSON for ``rejects.raw``, without the keys in ``drop`` (signed URLs)."""
    if isinstance(item, dict):
        item = {k: v for k, v in item.items() if k not in set(drop)}
    return json.dumps(item, sort_keys=True, default=str)[:4000]


def reject(sv_id: Any, reason: str, raw: str, lon: Any = None, lat: Any = None) -> dict[str, Any]:
    """One reject row (``REJECT_COLUMNS``)."""
    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan
    return {"sv_id": None if sv_id is None else sanitize_id(str(sv_id)), "row": None, "lon": num(lon),
            "lat": num(lat), "image_uri": None, "reason": reason, "raw": raw}


def download_images(records: list[dict[str, Any]], cache: ImageCache, *, what: str,
                    headers: dict[str, str] | None = None, auth_host: str | None = None,
                    workers: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fetch (or find cached) every record's ``image_url``; a failed image rejects its point with the cause.

    Args:
        records: points with ``COLUMNS`` but ``image_uri``, plus ``image_url`` (never stored) and ``raw``.
        cache: the image cache.
        what: the API, for messages.
        headers: sent with image requests to ``auth_host`` only (a credential never goes to another host).
        auth_host: the API's host (``netloc``).
        workers: parallel downloads.

    Returns:
        ``(points, rejects)``; points' ``image_uri`` is the cached file.
    """
    def one(rec: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        try:
            same_host = auth_host is not None and urlsplit(rec["image_url"]).netloc == auth_host
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
