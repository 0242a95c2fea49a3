"""Street-view point sources behind one resource: local files and hosted APIs (Mapillary, Panoramax).

* Local: a GeoParquet/Parquet/CSV table, or a folder of geotagged JPEGs (:mod:`gair_dataset.streetview_points`).
* Live: Mapillary Graph API v4 and Panoramax (STAC) searched with the region's bbox
  (:mod:`gair_dataset.sv_sources`); images are downloaded once into ``<data root>/streetview/<region>/images/``
  and reused by later runs. The token is read from the environment variable the region names
  (``token_env``) and is never logged or written.
"""


import hashlib
import os
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from gair_dataset.streetview_points import empty_rejects, load_exif_folder, load_table
from gair_dataset.sv_sources import HttpSettings, ImageCache, fetch_mapillary, fetch_panoramax, make_session
from pipelines.common.storage import DataRoot
from pipelines.config import RegionConfig, StreetViewSource


class StreetViewPoints(dg.ConfigurableResource):
    """Loads a region's SV points: local files (``table``, ``exif_folder``) or a live API (Mapillary, Panoramax).

    The retry settings apply to the APIs: 429 and 5xx are retried with exponential backoff, honouring
    ``Retry-After``; a refused token fails at once.
    """

    timeout_s: float = Field(default=30.0, description="HTTP timeout per request (APIs)")
    max_retries: int = Field(default=5, description="retries on 429/5xx/connection errors (APIs)")
    backoff_s: float = Field(default=0.5, description="backoff factor: waits backoff_s * 2**n between retries")
    max_retry_after_s: float = Field(default=60.0, description="longest Retry-After honoured (seconds)")

    def load(self, source: StreetViewSource, base_dir: Path,
             data_root: DataRoot | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Return ``(points, read_rejects)`` for a file source (``table`` or ``exif_folder``).

        Args:
            source: the region's street-view source.
            base_dir: the regions file's folder (relative paths resolve against it).
            data_root: the ``DataRoot`` resource of the run: a ``sample://`` source reads the embedded sample under
                it (generated on first use); ``DataRoot()``'s default when None.

        Raises:
            ValueError: an API source (use :meth:`load_region`).
        """
        if source.is_api:
            raise ValueError(f"streetview kind {source.kind!r} is an API: it needs the region (load_region)")
        sample_dir = (data_root or DataRoot()).sample() if source.uses_sample else None
        path = source.resolve(Path(base_dir), sample_dir)
        if source.kind == "exif_folder":
            return load_exif_folder(path)
        return load_table(path, source.image_root), empty_rejects()

    def source_fingerprint(self, region: RegionConfig, data_root: DataRoot) -> str | None:
        """A hash of a file source as it is now (a table's bytes; a folder's names, sizes and times), else None.

        Lets ``sv_points`` skip reading an unchanged file source. None for APIs: they are asked again every time.
        An image rewritten in place under the same name is not seen (its path in the table is unchanged).
        """
        source = region.streetview
        if source.is_api:
            return None
        sample_dir = data_root.sample() if source.uses_sample else None
        path = source.resolve(Path(region.base_dir), sample_dir)
        h = hashlib.blake2b(digest_size=12)
        try:
            if path.is_dir():
                for f in sorted(path.rglob("*")):
                    if f.is_file():
                        st = f.stat()
                        h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            else:
                with open(path, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
        except OSError:
            return None  # missing or unreadable: loading it says what is wrong
        return h.hexdigest()

    def load_region(self, region: RegionConfig, data_root: DataRoot) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Return ``(points, read_rejects)`` for a region, from its files or its API.

        Raises:
            FileNotFoundError: a file source is missing.
            ValueError: bad source settings, or the token variable is not set.
            gair_dataset.sv_sources.ApiError: the API failed (``AuthError``: the token was refused).
        """
        source = region.streetview
        if not source.is_api:
            return self.load(source, region.base_dir, data_root)
        token = os.environ.get(source.token_env, "") if source.token_env else ""
        if source.token_env and not token:
            raise ValueError(f"region {region.name!r}: environment variable {source.token_env} (streetview."
                             f"token_env) is not set; it must hold the {source.kind} access token")
        settings = HttpSettings(timeout_s=self.timeout_s, max_retries=self.max_retries, backoff_s=self.backoff_s,
                                max_retry_after_s=self.max_retry_after_s)
        with make_session(settings) as session:
            cache = ImageCache(data_root.stage_dir("streetview", region.name) / "images" / source.kind, session,
                               timeout_s=self.timeout_s)
            if source.kind == "mapillary":
                points, rejects = fetch_mapillary(
                    region.bbox, token=token, session=session, cache=cache, base_url=source.url,
                    page_size=source.page_size, max_points=source.max_points, image_size=source.image_size,
                    token_env=source.token_env, timeout_s=self.timeout_s)
            else:
                points, rejects = fetch_panoramax(
                    region.bbox, token=token or None, session=session, cache=cache, base_url=source.url,
                    page_size=source.page_size, max_points=source.max_points, image_size=source.image_size,
                    token_env=source.token_env, timeout_s=self.timeout_s)
        points.attrs["images_cached"] = cache.hits
        points.attrs["images_downloaded"] = cache.downloads
        return points, rejects
