"""Region configuration: the YAML file whose regions become the Dagster partitions."""


import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import shapely
import yaml
from shapely.geometry import box, mapping

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
    """Where a region's street-view points come from: ``table`` (GeoParquet/CSV) or ``exif_folder``."""

    kind: str
    path: str
    image_root: str | None = None

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

    def area(self) -> shapely.Geometry:
        """The region as a shapely geometry (EPSG:4326): its polygon, or its bbox."""
        return shapely.geometry.shape(self.geometry) if self.geometry else box(*self.bbox)

    def search_params(self) -> SearchParams:
        """The STAC search for this region (``intersects`` its polygon when it has one, else its bbox)."""
        return SearchParams(collections=self.collections, bbox=None if self.geometry else self.bbox,
                            intersects=self.geometry, datetime=self.datetime,
                            max_cloud_cover=self.max_cloud_cover, max_items=self.max_items)


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
    sv = raw.get("streetview")
    if not sv or "path" not in sv:
        raise ValueError(f"region {name!r}: 'streetview: {{kind, path}}' is required")
    if sv.get("kind", "table") not in ("table", "exif_folder"):
        raise ValueError(f"region {name!r}: streetview.kind must be 'table' or 'exif_folder'")
    cap = raw.get("max_points_per_tile")
    return RegionConfig(
        name=name,
        bbox=check_bbox(raw["bbox"]) if polygon is None else polygon.bounds,
        collections=tuple(raw.get("collections", ["sentinel-2-l2a"])),
        datetime=raw.get("datetime"),
        max_cloud_cover=raw.get("max_cloud_cover"),
        max_items=raw.get("max_items"),
        grid=GridConfig(**raw.get("tile_grid", {})),
        split=SplitConfig(**raw.get("split", {})),
        streetview=StreetViewSource(kind=sv.get("kind", "table"), path=sv["path"], image_root=sv.get("image_root")),
        max_points_per_tile=int(cap) if cap is not None else None,
        description=raw.get("description", ""),
        base_dir=base,
        geometry=mapping(polygon) if polygon is not None else None,
    )


def load_regions(path: Path | None = None) -> dict[str, RegionConfig]:
    """Parse and validate the regions file.

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
    out = {}
    for name, raw in regions.items():
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"region name {name!r} must use only letters, digits, '-' and '_'")
        out[name] = _region(name, _merge(defaults, raw or {}), path.parent)
    return out
