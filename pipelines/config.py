"""Region configuration: the YAML file whose regions become the Dagster partitions."""


import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import shapely
import yaml
from shapely.geometry import box, mapping

from gair_dataset.bands import profile_from_config, register_profile
from gair_dataset.geo import check_bbox, check_region_geometry
from gair_dataset.stac_catalog import SearchParams
from gair_dataset.tile_grid import GridConfig, SplitConfig

#: The folder above the package: the checkout's root when running from a checkout (an installed wheel has none:
#: bundled files are found with :func:`default_regions_file` and friends, never through this).
REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PREFIX = "sample://"


def default_regions_file() -> Path:
    """The default regions file: ``config/regions.yaml`` of the checkout, or the copy an installed wheel carries.

    A wheel maps ``config/regions.yaml`` into ``pipelines/default_config/`` (``[tool.setuptools.package-dir]``
    in ``pyproject.toml``), found with :mod:`importlib.resources`; a checkout has no such folder and reads its
    top-level ``config/``.
    """
    packaged = Path(str(resources.files("pipelines"))) / "default_config" / "regions.yaml"
    return packaged if packaged.is_file() else REPO_ROOT / "config" / "regions.yaml"


DEFAULT_REGIONS_FILE = default_regions_file()


def data_root() -> Path:
    """The default data root: ``$GAIR_DATA_ROOT`` or ``gair_data`` in the current directory, read when called.

    Assets and resources take the data root from the ``DataRoot`` resource (``pipelines.common.storage``), whose
    default this is; call this only outside a Dagster run (the demo CLI).
    """
    return Path(os.environ.get("GAIR_DATA_ROOT") or "gair_data").resolve()


def regions_file() -> Path:
    """The regions file: ``$GAIR_REGIONS``, else :func:`default_regions_file`."""
    return Path(os.environ.get("GAIR_REGIONS") or DEFAULT_REGIONS_FILE).resolve()


@dataclass(frozen=True)
class StreetViewSource:
    """Where a region's street-view points come from.

    File kinds: ``table`` (GeoParquet/Parquet/CSV, ``path``) and ``exif_folder`` (geotagged JPEGs, ``path``).
    API kinds: ``mapillary`` (Graph API v4) and ``panoramax`` (a STAC API), searched with the region's bbox;
    ``url`` overrides the API root, ``token_env`` names the environment variable holding the access token (the
    token itself never appears in the config, logs or outputs), ``page_size`` and ``max_points`` bound the
    search and ``image_size`` picks the image (Mapillary ``thumb_256|thumb_1024|thumb_2048|thumb_original``,
    Panoramax ``hd|sd|thumb``).
    """

    kind: str
    path: str = ""
    image_root: str | None = None
    url: str | None = None
    token_env: str | None = None
    page_size: int = 100
    max_points: int | None = None
    image_size: str | None = None

    FILE_KINDS: ClassVar[tuple[str, ...]] = ("table", "exif_folder")
    API_KINDS: ClassVar[tuple[str, ...]] = ("mapillary", "panoramax")
    _API_KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "url", "token_env", "page_size", "max_points",
                                                      "image_size"})
    _FILE_KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "path", "image_root"})

    @classmethod
    def from_config(cls, region: str, raw: Any) -> "StreetViewSource":
        """Parse and check a region's ``streetview:`` mapping.

        Args:
            region: the region name (named in every error).
            raw: the mapping, e.g. ``{kind: table, path: points.parquet}`` or
                ``{kind: mapillary, token_env: MAPILLARY_TOKEN, url: http://127.0.0.1:8765/mapillary}``.

        Raises:
            ValueError: naming the region and the field at fault.
        """
        where = f"region {region!r}: streetview"
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{where}: a mapping is required, e.g. {{kind: table, path: points.parquet}} or "
                             f"{{kind: mapillary, token_env: MAPILLARY_TOKEN}}")
        kind = raw.get("kind", "table")
        if kind not in cls.FILE_KINDS + cls.API_KINDS:
            raise ValueError(f"{where}.kind must be one of {list(cls.FILE_KINDS + cls.API_KINDS)}, got {kind!r}")
        allowed = cls._API_KEYS if kind in cls.API_KINDS else cls._FILE_KEYS
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} for kind {kind!r} (allowed: {sorted(allowed)})")
        if kind in cls.FILE_KINDS:
            if not raw.get("path"):
                raise ValueError(f"{where}: kind {kind!r} needs 'path'")
            return cls(kind=kind, path=str(raw["path"]), image_root=raw.get("image_root"))
        token_env = raw.get("token_env")
        if kind == "mapillary" and not token_env:
            raise ValueError(f"{where}: kind 'mapillary' needs 'token_env' (the environment variable holding the "
                             f"access token, e.g. MAPILLARY_TOKEN)")
        if token_env is not None and not str(token_env).isidentifier():
            raise ValueError(f"{where}.token_env must be an environment variable NAME, not a token")
        url = raw.get("url")
        if url is not None and not str(url).startswith(("http://", "https://")):
            raise ValueError(f"{where}.url must be an http(s) URL, got {url!r}")
        try:
            page_size = int(raw.get("page_size", 100))
            max_points = None if raw.get("max_points") is None else int(raw["max_points"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: page_size/max_points must be integers ({exc})") from exc
        if page_size < 1 or (max_points is not None and max_points < 1):
            raise ValueError(f"{where}: page_size and max_points must be >= 1")
        return cls(kind=kind, url=None if url is None else str(url).rstrip("/"),
                   token_env=None if token_env is None else str(token_env), page_size=page_size,
                   max_points=max_points, image_size=raw.get("image_size"))

    @property
    def is_api(self) -> bool:
        """Whether the points come from a hosted API (Mapillary, Panoramax) rather than files."""
        return self.kind in self.API_KINDS

    def describe(self) -> dict[str, Any]:
        """The source for run metadata: kind and path or URL and token variable name (never the token)."""
        if self.is_api:
            return {"kind": self.kind, "url": self.url, "token_env": self.token_env, "max_points": self.max_points}
        return {"kind": self.kind, "path": self.path}

    def resolve(self, base: Path, sample_dir: Path | None = None) -> Path:
        """Absolute path; ``sample://`` points into the embedded sample, relative paths to the config file.

        Args:
            base: the folder of the regions file (relative paths resolve against it).
            sample_dir: the embedded sample (``DataRoot.sample()``); required for a ``sample://`` path.

        Raises:
            ValueError: a ``sample://`` path without ``sample_dir``.
        """
        if self.path.startswith(SAMPLE_PREFIX):
            if sample_dir is None:
                raise ValueError(f"{self.path}: a sample:// path needs the sample folder (DataRoot.sample())")
            return Path(sample_dir) / self.path[len(SAMPLE_PREFIX):]
        p = Path(self.path)
        return p if p.is_absolute() else (base / p).resolve()

    @property
    def uses_sample(self) -> bool:
        """Whether the source is the embedded synthetic sample."""
        return self.path.startswith(SAMPLE_PREFIX)


@dataclass(frozen=True)
class RegionConfig:
    """Everything one region partition needs."""

    name: str
    bbox: tuple[float, float, float, float]
    collections: tuple[str, ...]
    datetime: str | None
    max_cloud_cover: float | None
    max_items: int | None
    grid: GridConfig
    split: SplitConfig
    streetview: StreetViewSource
    max_points_per_tile: int | None = None
    description: str = ""
    base_dir: Path = field(default_factory=Path.cwd)  # the regions file's folder (relative paths resolve there)
    geometry: dict | None = None  # GeoJSON (Multi)Polygon when the region is not a plain bbox; bbox = its bounds
    conforms_to: tuple[str, ...] = ()  # conformance classes to assume for an API that does not declare them

    def area(self) -> shapely.Geometry:
        """The region as a shapely geometry (EPSG:4326): its polygon, or its bbox."""
        return shapely.geometry.shape(self.geometry) if self.geometry else box(*self.bbox)

    def search_params(self) -> SearchParams:
        """The STAC search for this region (``intersects`` its polygon when it has one, else its bbox)."""
        return SearchParams(collections=self.collections, bbox=None if self.geometry else self.bbox,
                            intersects=self.geometry, datetime=self.datetime,
                            max_cloud_cover=self.max_cloud_cover, max_items=self.max_items,
                            conforms_to=self.conforms_to)


def _merge(defaults: dict, region: dict) -> dict:
    out = dict(defaults)
    for k, v in region.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _region_geometry(name: str, raw: Any, base: Path) -> shapely.Geometry:
    """The region's polygon from inline GeoJSON or a GeoJSON file (relative to the regions file)."""
    if isinstance(raw, str):
        path = Path(raw) if Path(raw).is_absolute() else (base / raw).resolve()
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ValueError(f"region {name!r}: geometry file not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"region {name!r}: geometry file {path} is not JSON: {exc}") from exc
    try:
        return check_region_geometry(raw)
    except ValueError as exc:
        raise ValueError(f"region {name!r}: {exc}") from exc


def _region(name: str, raw: dict[str, Any], base: Path) -> RegionConfig:
    if ("bbox" in raw) == ("geometry" in raw):
        raise ValueError(f"region {name!r}: give exactly one of 'bbox' ([west, south, east, north]) or 'geometry' "
                         f"(a GeoJSON Polygon/MultiPolygon, inline or a file path)")
    polygon = _region_geometry(name, raw["geometry"], base) if "geometry" in raw else None
    streetview = StreetViewSource.from_config(name, raw.get("streetview"))
    cap = raw.get("max_points_per_tile")
    try:
        bbox = check_bbox(raw["bbox"]) if polygon is None else polygon.bounds
    except (ValueError, TypeError) as exc:
        raise ValueError(f"region {name!r}: invalid bbox: {exc}") from exc
    conforms = raw.get("conforms_to") or []
    if isinstance(conforms, str) or not all(isinstance(c, str) for c in conforms):
        raise ValueError(f"region {name!r}: conforms_to must be a list of conformance class names "
                         f"(e.g. [ITEM_SEARCH, QUERY]), got {conforms!r}")
    return RegionConfig(
        name=name,
        bbox=bbox,
        collections=tuple(raw.get("collections", ["sentinel-2-l2a"])),
        datetime=raw.get("datetime"),
        max_cloud_cover=raw.get("max_cloud_cover"),
        max_items=raw.get("max_items"),
        grid=GridConfig(**raw.get("tile_grid", {})),
        split=SplitConfig(**raw.get("split", {})),
        streetview=streetview,
        max_points_per_tile=int(cap) if cap is not None else None,
        description=raw.get("description", ""),
        base_dir=base,
        geometry=mapping(polygon) if polygon is not None else None,
        conforms_to=tuple(c.upper() for c in conforms),
    )


def load_regions(path: Path | None = None) -> dict[str, RegionConfig]:
    """Parse and validate the regions file; register its ``band_profiles:`` (see ``gair_dataset.bands``).

    Raises:
        ValueError: with the region and field at fault.
    """
    path = path or regions_file()
    if not path.exists():
        raise FileNotFoundError(f"regions file not found: {path} (set GAIR_REGIONS)")
    doc = yaml.safe_load(path.read_text()) or {}
    regions = doc.get("regions") or {}
    if not regions:
        raise ValueError(f"{path}: no regions declared")
    defaults = doc.get("defaults", {})
    for collection, raw_profile in (doc.get("band_profiles") or {}).items():
        try:
            register_profile(profile_from_config(str(collection), raw_profile, source=str(path)))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    out = {}
    for name, raw in regions.items():
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"{path}: region name {name!r} must use only letters, digits, '-' and '_'")
        try:
            out[name] = _region(name, _merge(defaults, raw or {}), path.parent)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    return out
