"""STAC catalog resources: a live STAC API (Planetary Computer by default) and a local catalog."""


import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from gair_dataset.sample_region import ensure_sample
from gair_dataset.stac_catalog import PLANETARY_COMPUTER_URL, SearchParams, search_live, search_local
from pipelines.config import data_root


class StacCatalog(dg.ConfigurableResource):
    """Interface of a STAC catalog: ``search(params)`` returns unsigned item dicts."""

    def search(self, params: SearchParams) -> list[dict]:  # pragma: no cover - interface
        """Search the catalog."""
        raise NotImplementedError

    def describe(self) -> str:
        """A short, secret-free description for metadata."""
        return type(self).__name__


class LocalStacCatalog(StacCatalog):
    """A static catalog on disk (catalog.json, collection.json, an item collection, .ndjson or stac-geoparquet).

    With no ``path`` it is the embedded SYNTHETIC sample catalog, generated on first use.
    """

    path: str = Field(default="", description="catalog file or folder; empty = the embedded synthetic sample")

    def catalog_path(self) -> Path:
        """The catalog to read (generating the sample when it is the default)."""
        if self.path:
            return Path(self.path)
        return ensure_sample(data_root() / "sample") / "catalog" / "catalog.json"

    def search(self, params: SearchParams) -> list[dict]:
        """Search the local catalog."""
        return search_local(self.catalog_path(), params)

    def describe(self) -> str:
        """What is searched."""
        return f"local catalog {self.path or '(embedded SYNTHETIC sample)'}"


class LiveStacCatalog(StacCatalog):
    """A STAC API through pystac-client, with retries/backoff on 429 and 5xx, timeouts and paging.

    For the Planetary Computer, assets are signed with ``planetary_computer.sign_inplace`` while searching
    (and unsigned again before anything is stored); chips are re-signed just before each read.
    """

    url: str = Field(default=PLANETARY_COMPUTER_URL)
    sign_with_planetary_computer: bool = Field(default=True)
    max_retries: int = Field(default=5)
    backoff_factor: float = Field(default=1.0)
    timeout_s: float = Field(default=60.0)

    def search(self, params: SearchParams) -> list[dict]:
        """Search the API."""
        modifier = None
        if self.sign_with_planetary_computer:
            import planetary_computer

            modifier = planetary_computer.sign_inplace
        return search_live(self.url, params, modifier=modifier, max_retries=self.max_retries,
                           backoff_factor=self.backoff_factor, timeout=self.timeout_s)

    def describe(self) -> str:
        """What is searched."""
        return f"STAC API {self.url}"


def stac_from_env() -> StacCatalog:
    """The catalog named by ``$GAIR_STAC_CATALOG``.

    ``local`` (default: the embedded sample), ``planetary-computer``, an ``http(s)://`` STAC API root, or a
    path to a local catalog.
    """
    choice = os.environ.get("GAIR_STAC_CATALOG", "local").strip()
    if choice in ("", "local", "sample"):
        return LocalStacCatalog()
    if choice == "planetary-computer":
        return LiveStacCatalog()
    if choice.startswith(("http://", "https://")):
        return LiveStacCatalog(url=choice, sign_with_planetary_computer="planetarycomputer" in choice)
    return LocalStacCatalog(path=choice)
