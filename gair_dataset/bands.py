"""Band sets per collection and default per-band normalisation statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

S2_L2A_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
"""Sentinel-2 L2A bands in the GAIR/CROMA 10-band order (B01 and B09 dropped)."""

S2_L2A_ALL_BANDS: tuple[str, ...] = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12",
)
"""All 12 Sentinel-2 L2A bands, in the order of the SatCLIP S2-100K patches."""

NAIP_BANDS: tuple[str, ...] = ("R", "G", "B", "NIR")
"""NAIP 4-band order inside the single ``image`` asset."""

LANDSAT_C2_L2_BANDS: tuple[str, ...] = ("blue", "green", "red", "nir08", "swir16", "swir22")
"""Landsat Collection 2 Level-2 surface-reflectance bands (Planetary Computer asset keys)."""

S2_SCL_CLOUD_CLASSES: tuple[int, ...] = (3, 8, 9, 10)
"""SCL classes counted as cloud/shadow: cloud shadow, cloud medium/high probability, thin cirrus."""

S2_HARMONIZE_BASELINE = "04.00"
S2_BOA_ADD_OFFSET = 1000


@dataclass(frozen=True)
class BandSet:
    """How to read the bands of one collection.

    Attributes:
        collection: STAC collection id.
        bands: Band names in output order.
        asset_for_band: Asset key holding each band (several bands may share one asset).
        nodata: Nodata value used when the asset declares none.
        harmonize_s2: Apply the Sentinel-2 baseline >= 04.00 offset correction.
        cloud_asset: Asset holding a cloud/scene classification (SCL) or None.
    """

    collection: str
    bands: tuple[str, ...]
    asset_for_band: Mapping[str, str]
    nodata: float = 0
    harmonize_s2: bool = False
    cloud_asset: str | None = None


BAND_SETS: dict[str, BandSet] = {
    "sentinel-2-l2a": BandSet(
        "sentinel-2-l2a", S2_L2A_BANDS, {b: b for b in S2_L2A_BANDS}, nodata=0, harmonize_s2=True,
        cloud_asset="SCL",
    ),
    "naip": BandSet("naip", NAIP_BANDS, dict.fromkeys(NAIP_BANDS, "image"), nodata=0),
    "landsat-c2-l2": BandSet(
        "landsat-c2-l2", LANDSAT_C2_L2_BANDS, {b: b for b in LANDSAT_C2_L2_BANDS}, nodata=0,
    ),
}
BAND_SETS["landsat-8-c2-l2"] = BAND_SETS["landsat-c2-l2"]
BAND_SETS["sentinel-s2-l2a-cogs"] = BAND_SETS["sentinel-2-l2a"]  # Earth Search v0

S2_COMMON_NAMES: dict[str, str] = {
    "B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge1", "B06": "rededge2",
    "B07": "rededge3", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22",
}
"""Earth Search v1 asset keys of the Sentinel-2 bands (used as aliases when ``B02``... is absent)."""

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


def band_set_for(collection: str) -> BandSet:
    """Return the :class:`BandSet` of a STAC collection.

    Raises:
        KeyError: For an unknown collection.
    """
    try:
        return BAND_SETS[collection]
    except KeyError:
        raise KeyError(f"no band set for collection {collection!r}; known: {sorted(BAND_SETS)}") from None


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
