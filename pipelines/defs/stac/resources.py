"""STAC catalog resources: a live STAC API, a local catalog, a folder of GeoTIFFs, and the catalog one setting names.

The code location's ``stac`` is a :class:`ConfiguredStacCatalog` bound to ``$GAIR_STAC_CATALOG`` (``dg.EnvVar``).
"""


from pathlib import Path
from urllib.parse import parse_qsl

import dagster as dg
from pydantic import Field

from gair_dataset.local_tiles import FolderCatalog, search_folder
from gair_dataset.stac_catalog import PLANETARY_COMPUTER_URL, SearchParams, search_live, search_local
from pipelines.common.storage import DataRoot


class StacCatalog(dg.ConfigurableResource):
    """Interface of a STAC catalog: ``search(params, data_root)`` returns unsigned item dicts."""

    def search(self, params: SearchParams, data_root: DataRoot | None = None) -> list[dict]:  # pragma: no cover
        """Search the catalog.

        Args:
            params: the region's search.
            data_root: the ``DataRoot`` resource of the run (where the embedded sample lives); ``DataRoot()``'s
                default when None. Only the embedded sample catalog uses it.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """A short, secret-free description for metadata."""
        return type(self).__name__


class LocalStacCatalog(StacCatalog):
    """A static catalog on disk (catalog.json, collection.json, an item collection, .ndjson or stac-geoparquet).

    With no ``path`` it is the embedded SYNTHETIC sample catalog, generated on first use.
    """

    path: str = Field(default="", description="catalog file or folder; empty = the embedded synthetic sample")

    def catalog_path(self, data_root: DataRoot | None = None) -> Path:
        """The catalog to read (the sample under the data root, generated on first use, when it is the default)."""
        if self.path:
            return Path(self.path)
        return (data_root or DataRoot()).sample() / "catalog" / "catalog.json"

    def search(self, params: SearchParams, data_root: DataRoot | None = None) -> list[dict]:
        """Search the local catalog."""
        return search_local(self.catalog_path(data_root), params)

    def describe(self) -> str:
        """What is searched."""
        return f"local catalog {self.path or '(embedded SYNTHETIC sample)'}"


class FolderStacCatalog(StacCatalog):
    """A folder of GeoTIFFs (e.g. a user's pre-cut tiles) searched as a catalog: one STAC item per file.

    Items are made on each search with rio-stac (``gair_dataset.local_tiles``): projection fields, ``eo:bands``
    and ``raster:bands`` from the file. ``GAIR_STAC_CATALOG=folder:/path/to/tiles`` selects it, with optional
    settings as a query string: ``folder:/path?collection=sentinel-2-l2a&datetime=2023-06-01&bands=B01,B02,...``.
    """

    path: str = Field(description="the folder of GeoTIFFs (searched recursively)")
    collection: str = Field(default="", description="collection id of every item; empty = the region's single "
                            "collection")
    datetime: str = Field(default="", description="ISO date/time of every file; empty = from each file's name "
                          "(YYYYMMDD, YYYY-MM-DD) or its TIFFTAG_DATETIME tag")
    bands: str = Field(default="", description="comma-separated band names of every file, in band order; empty = "
                       "the band descriptions when they are band names, else the collection's bands by count")
    asset: str = Field(default="", description="asset key of the file; empty = 'image' for naip, else 'data'")

    def settings(self) -> FolderCatalog:
        """The folder catalog these fields describe."""
        bands = tuple(b.strip() for b in self.bands.split(",") if b.strip()) or None
        return FolderCatalog(Path(self.path), collection=self.collection or None, datetime=self.datetime or None,
                             bands=bands, asset=self.asset or None)

    def search(self, params: SearchParams, data_root: DataRoot | None = None) -> list[dict]:
        """Make the folder's items and keep those matching the search (``data_root`` is not used)."""
        return search_folder(self.settings(), params)

    def describe(self) -> str:
        """What is searched."""
        extra = ", ".join(f"{k}={v}" for k, v in (("collection", self.collection), ("datetime", self.datetime),
                                                   ("bands", self.bands), ("asset", self.asset)) if v)
        return f"GeoTIFF folder {self.path}" + (f" ({extra})" if extra else "")


#: Prefix of a ``GAIR_STAC_CATALOG`` value naming a folder of GeoTIFFs.
FOLDER_PREFIX = "folder:"
_FOLDER_KEYS = ("collection", "datetime", "bands", "asset")


def folder_catalog(choice: str) -> FolderStacCatalog:
    """The folder catalog of ``folder:/path[?collection=...&datetime=...&bands=B01,B02&asset=...]``.

    Raises:
        ValueError: an unknown setting or an empty path, naming it.
    """
    path, _, query = choice[len(FOLDER_PREFIX):].partition("?")
    if not path.strip():
        raise ValueError(f"GAIR_STAC_CATALOG {choice!r}: give the folder, e.g. folder:/data/tiles")
    settings = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(settings) - set(_FOLDER_KEYS))
    if unknown:
        raise ValueError(f"GAIR_STAC_CATALOG {choice!r}: unknown setting(s) {unknown}; known: {list(_FOLDER_KEYS)}")
    return FolderStacCatalog(path=str(Path(path.strip()).expanduser()), **settings)


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

    def search(self, params: SearchParams, data_root: DataRoot | None = None) -> list[dict]:
        """Search the API (``data_root`` is not used)."""
        modifier = None
        if self.sign_with_planetary_computer:
            import planetary_computer

            modifier = planetary_computer.sign_inplace
        return search_live(self.url, params, modifier=modifier, max_retries=self.max_retries,
                           backoff_factor=self.backoff_factor, timeout=self.timeout_s)

    def describe(self) -> str:
        """What is searched."""
        return f"STAC API {self.url}"


def is_planetary_computer(choice: str) -> bool:
    """Whether a ``GAIR_STAC_CATALOG`` setting names the Planetary Computer (whose hrefs must be signed)."""
    choice = choice.strip()
    return choice == "planetary-computer" or "planetarycomputer" in choice


def catalog_for(choice: str) -> StacCatalog:
    """The catalog a ``GAIR_STAC_CATALOG`` setting names.

    ``local`` (or empty: the embedded sample), ``planetary-computer``, an ``http(s)://`` STAC API root,
    ``folder:/path[?collection=..&datetime=..&bands=..&asset=..]`` (a folder of GeoTIFFs, one item per file:
    :class:`FolderStacCatalog`), or a path to a local catalog.
    """
    choice = choice.strip()
    if choice in ("", "local", "sample"):
        return LocalStacCatalog()
    if choice.startswith(FOLDER_PREFIX):
        return folder_catalog(choice)
    if choice == "planetary-computer":
        return LiveStacCatalog()
    if choice.startswith(("http://", "https://")):
        return LiveStacCatalog(url=choice, sign_with_planetary_computer=is_planetary_computer(choice))
    return LocalStacCatalog(path=choice)


class ConfiguredStacCatalog(StacCatalog):
    """The catalog named by one setting, chosen when a run uses it (the code location's ``stac`` resource).

    The code location binds ``catalog`` to ``dg.EnvVar("GAIR_STAC_CATALOG")`` when that variable is set, else it
    is ``local`` (the embedded sample); see :func:`catalog_for` for the values.
    """

    catalog: str = Field(default="local", description="local | planetary-computer | an http(s):// STAC API root "
                         "| folder:/path/to/geotiffs[?collection=..&datetime=..&bands=..] | a path to a local "
                         "catalog, item collection, .ndjson or stac-geoparquet file")

    def resolved(self) -> StacCatalog:
        """The catalog the setting names."""
        return catalog_for(self.catalog)

    def search(self, params: SearchParams, data_root: DataRoot | None = None) -> list[dict]:
        """Search the named catalog."""
        return self.resolved().search(params, data_root)

    def describe(self) -> str:
        """What is searched."""
        return self.resolved().describe()
