"""Band profiles: one resolution of bands and cloud masks for Planetary Computer and Earth Search items."""

import json
from pathlib import Path

import pytest

from gair_dataset.bands import (
    LANDSAT_C2_L2_BANDS,
    S2_L2A_BANDS,
    BandProfile,
    UnknownCollectionError,
    clear_user_profiles,
    needs_s2_harmonization,
    processing_baseline,
    profile_for,
    profile_from_config,
    register_profile,
    resolve_item_bands,
)
from gair_dataset.stac_catalog import validate_items
from pipelines.config import load_regions
from tests.conftest import shared_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "earth_search"


def _shared(name: str) -> list[dict]:
    return json.loads(shared_path("stac", "items", name).read_text())


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(autouse=True)
def _no_user_profiles():
    clear_user_profiles()
    yield
    clear_user_profiles()


def test_planetary_computer_items_resolve_to_their_keys() -> None:
    s2 = _shared("stac-geoparquet__sentinel-2-l2a-pc.json")[0]
    r = resolve_item_bands(s2)
    assert r.ok and [x.asset for x in r.refs] == list(S2_L2A_BANDS) and r.cloud_asset == "SCL"
    ls = _shared("stac-geoparquet__landsat-c2-l2-pc.json")[0]
    r = resolve_item_bands(ls)
    assert r.ok and [x.asset for x in r.refs] == list(LANDSAT_C2_L2_BANDS) and r.cloud_asset == "qa_pixel"
    naip = _shared("stac-geoparquet__naip-pc.json")[0]
    r = resolve_item_bands(naip)
    assert r.ok and [(x.asset, x.index) for x in r.refs] == [("image", 1), ("image", 2), ("image", 3), ("image", 4)]


def test_earth_search_v1_c1_and_v0_items_resolve() -> None:
    for name, coll in (("s2_l2a_v1_item.json", "sentinel-2-l2a"), ("s2_c1_l2a_item.json", "sentinel-2-c1-l2a")):
        item = _fixture(name)
        r = resolve_item_bands(item)
        assert item["collection"] == coll
        assert r.ok and [x.asset for x in r.refs] == ["blue", "green", "red", "rededge1", "rededge2", "rededge3",
                                                      "nir", "nir08", "swir16", "swir22"]
        assert r.cloud_asset == "scl"  # lower case: the cloud check is not skipped
        assert not needs_s2_harmonization(item, profile_for(coll))  # earthsearch:boa_offset_applied
    v0 = _fixture("s2_l2a_cogs_v0_item.json")
    assert resolve_item_bands(v0).cloud_asset == "SCL"
    assert processing_baseline(v0) == "04.00" and needs_s2_harmonization(v0)
    real_v0 = json.loads(shared_path("stac", "items", "odc-stac__S2A_28QCH_20200714_0_L2A.json").read_text())
    assert processing_baseline(real_v0) == "02.14" and not needs_s2_harmonization(real_v0)  # from the product id
    assert resolve_item_bands(real_v0).ok


def test_resolution_is_cached_per_asset_signature() -> None:
    a, b = _fixture("s2_l2a_v1_item.json"), _fixture("s2_l2a_v1_item.json")
    b["id"] = "other"
    for asset in b["assets"].values():
        asset["href"] = "https://example.com/" + asset["href"]
    assert resolve_item_bands(a) is resolve_item_bands(b)


def test_validate_rejects_items_by_their_own_collection() -> None:
    s2 = _fixture("s2_l2a_v1_item.json")
    ls = _fixture("landsat_c2_l2_item.json")
    broken = json.loads(json.dumps(s2))
    broken["id"] = "broken"
    del broken["assets"]["nir08"]
    odd = {**json.loads(json.dumps(s2)), "id": "odd", "collection": "my-mirror"}
    ok, rejects = validate_items([s2, ls, broken, odd], check_bands=True)
    assert [it["id"] for it in ok] == [s2["id"], ls["id"]]
    reasons = {r["item_id"]: r["reason"] for r in rejects}
    assert reasons["broken"] == "missing band assets: B8A (tried B8A, nir08)"
    assert "unknown collection 'my-mirror'" in reasons["odd"] and "band_profiles" in reasons["odd"]
    register_profile(profile_from_config("my-mirror", {"bands": {"B04": "red", "B08": ["B08", "nir"]},
                                                       "cloud": {"asset": "scl", "classes": [8, 9]}}))
    ok, rejects = validate_items([odd], check_bands=True)
    assert ok and not rejects and resolve_item_bands(odd).cloud_asset == "scl"


def test_profile_config_errors_name_the_collection() -> None:
    with pytest.raises(ValueError, match=r"band profile 'x'.*'bands'"):
        profile_from_config("x", {"bands": []})
    with pytest.raises(ValueError, match=r"band profile 'x'.*unknown fields"):
        profile_from_config("x", {"bands": ["a"], "colour": 1})
    with pytest.raises(ValueError, match=r"band profile 'x'.*'cloud'"):
        profile_from_config("x", {"bands": ["a"], "cloud": {"asset": "qa"}})
    with pytest.raises(UnknownCollectionError, match="nope"):
        profile_for("nope")
    p = profile_from_config("x", {"bands": ["a", "b"], "offset_removed": True, "harmonize_s2": True})
    assert isinstance(p, BandProfile) and p.bands == ("a", "b")
    assert not needs_s2_harmonization({"properties": {"s2:processing_baseline": "05.00"}}, p)


def test_regions_file_declares_profiles_and_conformance(tmp_path: Path) -> None:
    path = tmp_path / "regions.yaml"
    path.write_text("""
band_profiles:
  my-mirror:
    bands: {B02: blue, B03: green, B04: red}
    cloud: {asset: scl, classes: [3, 8, 9, 10]}
    harmonize_s2: true
defaults:
  collections: [sentinel-2-l2a, landsat-c2-l2]
  conforms_to: [ITEM_SEARCH, QUERY]
regions:
  es:
    bbox: [19.87, -32.84, 19.90, -32.81]
    collections: [my-mirror]
    streetview: {kind: table, path: points.parquet}
""")
    regions = load_regions(path)
    assert regions["es"].search_params().conforms_to == ("ITEM_SEARCH", "QUERY")
    assert profile_for("my-mirror").bands == ("B02", "B03", "B04")
    assert profile_for("my-mirror").source == str(path)
