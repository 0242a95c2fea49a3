"""Band profiles: which asset (and band inside it) serves each band and the cloud mask, per collection.

One place decides, for every catalog: a :class:`BandProfile` lists, per output band, the asset keys that may
hold it (Planetary Computer ``B04``, Earth Search v1 ``red``...) and the cloud-mask assets (``SCL``/``scl``,
Landsat ``qa_pixel``); :func:`resolve_item_bands` applies it to one item (selecting inside multi-band assets
by ``eo:bands`` / ``raster:bands`` name or common name) and caches the answer per (collection, bands,
asset-key signature), so that resolving the bands of thousands of items of one catalog costs one resolution.

Built-in profiles cover the Planetary Computer and Earth Search (v1 and v0) ``sentinel-2-l2a``, Earth Search
``sentinel-2-c1-l2a``, ``landsat-c2-l2`` and NAIP; declare others under ``band_profiles:`` in the regions
file (:func:`profile_from_config`, registered with :func:`register_profile`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

S2_L2A_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
"""Sentinel-2 L2A bands in the GAIR/CROMA 10-band order (B01 and B09 dropped)."""

S2_L2A_ALL_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)
"""All 12 Sentinel-2 L2A bands, in the order of the SatCLIP S2-100K patches."""

NAIP_BANDS: tuple[str, ...] = ("R", "G", "B", "NIR")
"""NAIP 4-band order inside the single ``image`` asset."""

LANDSAT_C2_L2_BANDS: tuple[str, ...] = ("blue", "green", "red", "nir08", "swir16", "swir22")
"""Landsat Collection 2 Level-2 surface-reflectance bands (Planetary Computer and Earth Search asset keys)."""

S2_SCL_CLOUD_CLASSES: tuple[int, ...] = (3, 8, 9, 10)
"""SCL classes counted as cloud/shadow: cloud shadow, cloud medium/high probability, thin cirrus."""

LANDSAT_QA_CLOUD_BITS: tuple[int, ...] = (1, 2, 3, 4)
"""``qa_pixel`` bits counted as cloud/shadow: dilated cloud, cirrus, cloud, cloud shadow."""

S2_HARMONIZE_BASELINE = "04.00"
S2_BOA_ADD_OFFSET = 1000

S2_COMMON_NAMES: dict[str, str] = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22",
}
"""Earth Search v1 asset keys of the Sentinel-2 bands."""

BASELINE_PROPERTIES = ("s2:processing_baseline", "sentinel:processing_baseline")
"""Item properties that carry the Sentinel-2 processing baseline (Planetary Computer / Earth Search v1, v0)."""

OFFSET_REMOVED_PROPERTY = "earthsearch:boa_offset_applied"
"""Earth Search item flag: true when the +1000 BOA offset was already removed from the pixels."""


@dataclass(frozen=True)
class CloudMask:
    """How to read a cloud mask asset.

    Attributes:
        assets: Candidate asset keys, first present wins (e.g. ``("SCL", "scl")``).
        classes: Pixel values counted as cloud (a classification such as SCL).
        bits: Bit numbers counted as cloud (a bit-flag QA band such as Landsat ``qa_pixel``).
        nodata: The mask's fill value (its pixels do not count as valid).
    """

    assets: tuple[str, ...]
    classes: tuple[int, ...] = ()
    bits: tuple[int, ...] = ()
    nodata: int = 0


@dataclass(frozen=True, eq=False)  # hashed by identity: profiles key the resolution cache
class BandProfile:
    """How to read the bands of one collection, whatever catalog serves it.

    Attributes:
        collection: STAC collection id.
        bands: Band names in output order.
        assets: Candidate asset keys per band, in preference order (a band missing here is looked up
            under its own name, then by ``eo:bands`` name / common name in every asset).
        nodata: Nodata value used when the asset declares none.
        harmonize_s2: Remove the Sentinel-2 baseline >= 04.00 +1000 offset (unless the item or
            ``offset_removed`` says it is already gone).
        offset_removed: The collection's pixels never carry the offset (no harmonisation at all).
        cloud: The cloud mask, or None.
        source: Where the profile comes from (``built-in`` or the regions file), for messages.
    """

    collection: str
    bands: tuple[str, ...]
    assets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    nodata: float = 0
    harmonize_s2: bool = False
    offset_removed: bool = False
    cloud: CloudMask | None = None
    source: str = "built-in"

    def candidates(self, band: str) -> tuple[str, ...]:
        """Asset keys that may hold ``band``, in preference order."""
        return self.assets.get(band, (band,))

    @property
    def cloud_asset(self) -> str | None:
        """The first cloud-mask asset key (compatibility with the former ``BandSet``)."""
        return self.cloud.assets[0] if self.cloud else None


BandSet = BandProfile
"""Former name of :class:`BandProfile`."""

_S2_ASSETS = {b: (b, S2_COMMON_NAMES[b]) for b in S2_L2A_ALL_BANDS}
_S2_CLOUD = CloudMask(("SCL", "scl"), classes=S2_SCL_CLOUD_CLASSES, nodata=0)
_LANDSAT_CLOUD = CloudMask(("qa_pixel",), bits=LANDSAT_QA_CLOUD_BITS, nodata=1)


def _s2(collection: str) -> BandProfile:
    return BandProfile(collection, S2_L2A_BANDS, _S2_ASSETS, nodata=0, harmonize_s2=True, cloud=_S2_CLOUD)


BUILTIN_PROFILES: dict[str, BandProfile] = {
    # Planetary Computer (B02.., SCL) and Earth Search v1 (blue.., scl) share the collection id.
    "sentinel-2-l2a": _s2("sentinel-2-l2a"),
    "sentinel-2-c1-l2a": _s2("sentinel-2-c1-l2a"),  # Earth Search Collection 1 (blue.., scl)
    "sentinel-s2-l2a-cogs": _s2("sentinel-s2-l2a-cogs"),  # Earth Search v0 (B02.., SCL)
    "naip": BandProfile("naip", NAIP_BANDS, dict.fromkeys(NAIP_BANDS, ("image",)), nodata=0),
    "landsat-c2-l2": BandProfile("landsat-c2-l2", LANDSAT_C2_L2_BANDS, nodata=0, cloud=_LANDSAT_CLOUD),
    "landsat-8-c2-l2": BandProfile("landsat-8-c2-l2", LANDSAT_C2_L2_BANDS, nodata=0, cloud=_LANDSAT_CLOUD),
}
"""Built-in profiles: Planetary Computer and Earth Search Sentinel-2 L2A / C1 L2A, Landsat C2 L2, NAIP."""

_USER_PROFILES: dict[str, BandProfile] = {}

# Kept for callers of the former API.
BAND_SETS = BUILTIN_PROFILES


class UnknownCollectionError(KeyError):
    """No band profile for a collection (neither built in nor declared in the regions file)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown collection"


def register_profile(profile: BandProfile) -> None:
    """Register a user-declared profile (it overrides a built-in one of the same collection)."""
    _USER_PROFILES[profile.collection] = profile
    _resolve_cached.cache_clear()


def clear_user_profiles() -> None:
    """Forget every registered user profile (tests)."""
    _USER_PROFILES.clear()
    _resolve_cached.cache_clear()


def known_collections() -> list[str]:
    """Collections with a profile (built-in or registered)."""
    return sorted({*BUILTIN_PROFILES, *_USER_PROFILES})


def profile_for(collection: str | None) -> BandProfile:
    """Return the :class:`BandProfile` of a STAC collection (a registered one first).

    Raises:
        UnknownCollectionError: For a collection without a profile (a ``KeyError``).
    """
    key = str(collection)
    hit = _USER_PROFILES.get(key) or BUILTIN_PROFILES.get(key)
    if hit is None:
        raise UnknownCollectionError(
            f"unknown collection {collection!r}: no band profile (built-in: {sorted(BUILTIN_PROFILES)}"
            f"{', declared: ' + str(sorted(_USER_PROFILES)) if _USER_PROFILES else ''}); declare one under "
            f"'band_profiles:' in the regions file")
    return hit


def profile_data(collection: str | None) -> dict[str, Any] | None:
    """The collection's profile as plain data (for version and cache keys), None for a collection without one."""
    try:
        return asdict(profile_for(collection))
    except UnknownCollectionError:
        return None


band_set_for = profile_for
"""Former name of :func:`profile_for`."""


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def profile_from_config(collection: str, raw: Mapping[str, Any], source: str = "regions file") -> BandProfile:
    """Build a profile from its ``band_profiles:`` entry in the regions file.

    Example::

        band_profiles:
          my-s2-mirror:
            bands: {B02: blue, B03: green, B04: [red, B04], B08: nir}   # band -> asset key(s)
            cloud: {asset: scl, classes: [3, 8, 9, 10]}                  # or {asset: qa_pixel, bits: [3, 4]}
            nodata: 0
            harmonize_s2: true        # remove the +1000 offset of baseline >= 04.00 items
            offset_removed: false     # true: the pixels never carry the offset

    ``bands`` may also be a list of asset keys (each band read from the asset of its name).

    Raises:
        ValueError: naming the collection and the field at fault.
    """
    where = f"band profile {collection!r} ({source})"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping with 'bands', got {type(raw).__name__}")
    unknown = set(raw) - {"bands", "cloud", "nodata", "harmonize_s2", "offset_removed"}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
    bands_raw = raw.get("bands")
    if isinstance(bands_raw, Mapping) and bands_raw:
        assets = {str(b): _as_tuple(a) for b, a in bands_raw.items()}
    elif isinstance(bands_raw, list | tuple) and bands_raw:
        assets = {str(b): (str(b),) for b in bands_raw}
    else:
        raise ValueError(f"{where}: 'bands' must be a non-empty list of asset keys or a band -> asset(s) mapping")
    if any(not a for a in assets.values()):
        raise ValueError(f"{where}: every band needs at least one asset key")
    cloud = None
    if raw.get("cloud") is not None:
        c = raw["cloud"]
        if not isinstance(c, Mapping) or "asset" not in c or ("classes" in c) == ("bits" in c):
            raise ValueError(f"{where}: 'cloud' must be {{asset: KEY(S), classes: [...]}} or {{asset, bits: [...]}}")
        cloud = CloudMask(_as_tuple(c["asset"]), classes=tuple(int(v) for v in c.get("classes", ())),
                          bits=tuple(int(v) for v in c.get("bits", ())), nodata=int(c.get("nodata", 0)))
    try:
        nodata = float(raw.get("nodata", 0))
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'nodata' must be a number, got {raw.get('nodata')!r}") from None
    return BandProfile(collection, tuple(assets), assets, nodata=nodata,
                       harmonize_s2=bool(raw.get("harmonize_s2", False)),
                       offset_removed=bool(raw.get("offset_removed", False)), cloud=cloud, source=source)


# -- per-item resolution ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BandRef:
    """Where one output band comes from: asset key and 1-based band index inside it."""

    band: str
    asset: str
    index: int


@dataclass(frozen=True)
class ItemBands:
    """The resolution of one item's bands (hrefs are looked up from the item by asset key)."""

    refs: tuple[BandRef, ...]
    cloud_asset: str | None
    missing: tuple[str, ...] = ()
    tried: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every band was found."""
        return not self.missing

    def describe_missing(self) -> str:
        """``B02 (tried B02, blue), ...`` for messages."""
        return ", ".join(f"{b} (tried {', '.join(self.tried.get(b, (b,)))})" for b in self.missing)


_BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "R": ("red",), "G": ("green",), "B": ("blue",), "NIR": ("nir", "nir08"),
    **{b: (c,) for b, c in S2_COMMON_NAMES.items()},
}


def _asset_bands(asset: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(asset.get("eo:bands") or asset.get("bands") or asset.get("raster:bands") or ())


def _names(band: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(str(v).lower() for k in ("name", "common_name", "eo:common_name") if (v := band.get(k)))


def _signature(assets: Mapping[str, Mapping[str, Any]]) -> tuple[tuple[str, tuple[frozenset[str], ...]], ...]:
    """The part of an item's assets band resolution depends on: keys and the band names inside each."""
    return tuple((k, tuple(_names(b) for b in _asset_bands(a))) for k, a in assets.items())


def resolve_item_bands(item: Mapping[str, Any], bands: Sequence[str] | None = None,
                       profile: BandProfile | None = None) -> ItemBands:
    """Resolve which asset and band index serves each band (and the cloud mask) of one item.

    Per band: the profile's candidate keys (single-band asset, or the matching ``eo:bands`` entry of a
    multi-band one), then an asset named after an alias (``red`` for ``B04``), then any asset whose
    ``eo:bands`` / ``raster:bands`` lists the band's name or common name. Cached per (collection, bands,
    asset-key signature).

    Args:
        item: STAC item dict.
        bands: Band names (default: the profile's).
        profile: The profile (default: that of the item's collection).

    Raises:
        UnknownCollectionError: No profile was given and the collection has none.
    """
    if profile is None:
        profile = profile_for(item.get("collection"))
    wanted = tuple(bands) if bands is not None else profile.bands
    return _resolve_cached(profile, wanted, _signature(item.get("assets") or {}))


@functools.lru_cache(maxsize=1024)
def _resolve_cached(profile: BandProfile, bands: tuple[str, ...],
                    sig: tuple[tuple[str, tuple[frozenset[str], ...]], ...]) -> ItemBands:
    names = dict(sig)
    by_name: dict[str, tuple[str, int]] = {}
    for key, bnames in sig:
        for i, ns in enumerate(bnames, start=1):
            for n in ns:
                by_name.setdefault(n, (key, i))
    refs: list[BandRef] = []
    missing: list[str] = []
    tried: dict[str, tuple[str, ...]] = {}
    for band in bands:
        aliases = (band.lower(), *_BAND_ALIASES.get(band, ()))
        own = profile.candidates(band)
        keys = (*own, *(a for a in _BAND_ALIASES.get(band, ()) if a not in own))
        tried[band] = keys
        hit: tuple[str, int] | None = None
        for key in keys:
            if key not in names:
                continue
            inner = names[key]
            if len(inner) <= 1:
                hit = (key, 1)
            else:
                hit = next(((key, i) for i, ns in enumerate(inner, start=1) if ns & set(aliases)), None)
            if hit:
                break
        if hit is None:
            hit = next((by_name[n] for n in aliases if n in by_name), None)
        if hit is None:
            missing.append(band)
        else:
            refs.append(BandRef(band, *hit))
    cloud = next((k for k in profile.cloud.assets if k in names), None) if profile.cloud else None
    return ItemBands(tuple(refs), cloud, tuple(missing), tried)


# -- Sentinel-2 harmonisation --------------------------------------------------------------------------------
_BASELINE_IN_ID = re.compile(r"_N(\d{2})(\d{2})_")


def processing_baseline(item: Mapping[str, Any]) -> str | None:
    """The item's Sentinel-2 processing baseline (e.g. ``"05.10"``), or None.

    Reads ``s2:processing_baseline`` (Planetary Computer, Earth Search v1), ``sentinel:processing_baseline``
    (Earth Search v0), else the ``N0400`` part of ``sentinel:product_id`` / ``s2:product_uri``.
    """
    props = item.get("properties") or {}
    for key in BASELINE_PROPERTIES:
        if props.get(key) is not None:
            return str(props[key])
    for key in ("sentinel:product_id", "s2:product_uri"):
        m = _BASELINE_IN_ID.search(str(props.get(key) or ""))
        if m:
            return f"{m.group(1)}.{m.group(2)}"
    return None


def needs_s2_harmonization(item: Mapping[str, Any], profile: BandProfile | None = None) -> bool:
    """Whether an item's pixels carry the Sentinel-2 +1000 DN offset (baseline >= 04.00).

    False when the item says the offset was already removed (``earthsearch:boa_offset_applied``) or the
    profile does (``offset_removed``).
    """
    if profile is not None and (profile.offset_removed or not profile.harmonize_s2):
        return False
    if (item.get("properties") or {}).get(OFFSET_REMOVED_PROPERTY) is True:
        return False
    pb = processing_baseline(item)
    if pb is None:
        return False
    try:
        return float(pb) >= float(S2_HARMONIZE_BASELINE)
    except ValueError:
        return pb >= S2_HARMONIZE_BASELINE


# -- normalisation statistics ---------------------------------------------------------------------------------
# Approximate per-band mean / std of Sentinel-2 L2A DN (harmonised, i.e. without the +1000
# offset) from the SSL4EO-S12 L2A statistics (Wang et al., 2022). They are defaults only: compute
# statistics on your own shards (``gair_model.loader.compute_rs_stats``) for real training.
S2_L2A_MEAN: dict[str, float] = {
    "B01": 756.4, "B02": 889.6, "B03": 1151.7, "B04": 1307.6, "B05": 1637.6, "B06": 2212.6,
    "B07": 2442.0, "B08": 2538.9, "B8A": 2602.9, "B09": 2666.8, "B11": 2388.8, "B12": 1821.5,
}
S2_L2A_STD: dict[str, float] = {
    "B01": 1111.4, "B02": 1159.1, "B03": 1188.1, "B04": 1375.2, "B05": 1376.6, "B06": 1358.6,
    "B07": 1418.4, "B08": 1476.4, "B8A": 1439.9, "B09": 1582.1, "B11": 1460.7, "B12": 1352.2,
}

DEFAULT_BAND_STATS: dict[str, tuple[float, float]] = {
    b: (S2_L2A_MEAN[b], S2_L2A_STD[b]) for b in S2_L2A_MEAN
}
"""Default ``band name -> (mean, std)`` used by the loader when no ``rs_stats`` are given."""


def default_stats(bands: Sequence[str]) -> dict[str, list[float]]:
    """Default ``{"mean": [...], "std": [...]}`` for the given band names.

    Raises:
        KeyError: If a band has no default statistics (pass ``rs_stats`` explicitly then).
    """
    missing = [b for b in bands if b not in DEFAULT_BAND_STATS]
    if missing:
        raise KeyError(f"no default statistics for bands {missing}; pass rs_stats={{'mean':..., 'std':...}}")
    return {"mean": [DEFAULT_BAND_STATS[b][0] for b in bands],
            "std": [DEFAULT_BAND_STATS[b][1] for b in bands]}
