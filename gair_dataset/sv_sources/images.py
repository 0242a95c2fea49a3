"""On-disk cache of street-view images fetched from an API.

Images are fetched once, when the points are read, and kept under the data root: Mapillary's image URLs are
signed and expire (a later shards run could not fetch them), and a rerun must not download again. A cached file
is ``<dir>/<sv_id>.jpg``, written atomically and only after it decoded as an image.
"""

from __future__ import annotations

from pathlib import Path

import requests
import urllib3.exceptions

from gair_dataset.atomic import atomic_write_bytes
from gair_dataset.sv_sources.http import ApiError, get, redact_url
from gair_dataset.svimage import image_problem


class ImageCache:
    """Images keyed by ``sv_id`` in one folder.

    Args:
        folder: where the images live (created).
        session: the API session (retries on 429/5xx).
        timeout_s: per request.
        max_bytes: refuse larger downloads.
    """

    def __init__(self, folder: str | Path, session: requests.Session, *, timeout_s: float = 30.0,
                 max_bytes: int = 32 << 20) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.session = session
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.hits = 0
        self.downloads = 0

    def path(self, sv_id: str) -> Path:
        """Where ``sv_id``'s image is (or will be) cached."""
        return self.folder / f"{sv_id}.jpg"

    def fetch(self, sv_id: str, url: str, *, what: str, headers: dict[str, str] | None = None) -> Path:
        """The cached image of ``sv_id``, downloaded from ``url`` when not cached yet.

        Raises:
            ApiError: the download failed (HTTP error, a 401/403 on the image URL, a connection reset or read timeout
                while the body streamed) or did not decode as an image (the URL is named without its query).
        """
        dest = self.path(sv_id)
        if dest.is_file() and dest.stat().st_size > 0:
            self.hits += 1
            return dest
        resp = get(self.session, url, what=what, headers=headers, timeout=self.timeout_s, stream=True,
                   refusal="url")
        try:
            with resp:
                data = resp.raw.read(self.max_bytes + 1, decode_content=True)
        except (OSError, urllib3.exceptions.HTTPError, requests.RequestException) as exc:
            # The body streams after the retries: a reset, a read timeout or a short body end up here.
            raise ApiError(f"{what}: download from {redact_url(url)} interrupted ({type(exc).__name__})") from None
        if len(data) > self.max_bytes:
            raise ApiError(f"{what}: image larger than {self.max_bytes} bytes")
        problem = image_problem(data)
        if problem:
            raise ApiError(f"{what}: downloaded image unusable ({problem})")
        atomic_write_bytes(dest, data)
        self.downloads += 1
        return dest
