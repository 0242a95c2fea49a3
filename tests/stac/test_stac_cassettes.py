"""The live STAC client replaying real Planetary Computer responses (recorded by pystac-client's tests)."""

import json

import pytest
import vcr
import yaml

from gair_dataset.stac_catalog import PLANETARY_COMPUTER_URL, SearchParams, search_live
from tests.conftest import shared_path

LANDING = "test_cli__TestCLISearch.test_item_search-inprocess.yaml"


def _cassette(tmp_path, name: str):
    """A cassette = the recorded landing page (GET /api/stac/v1) + the recorded searches of `name`."""
    landing = yaml.safe_load(shared_path("stac", "cassettes", LANDING).read_text())
    searches = yaml.safe_load(shared_path("stac", "cassettes", name).read_text())
    gets = [i for i in landing["interactions"] if i["request"]["method"] == "GET"]
    posts = [i for i in searches["interactions"] if i["request"]["method"] == "POST"]
    out = tmp_path / name
    out.write_text(yaml.safe_dump({"interactions": gets + posts, "version": 1}))
    return out, posts


def _same_search(r1, r2):
    """Match POST bodies on what defines the search (collections, bbox/intersects, datetime, token)."""
    if r1.method != "POST":
        return True
    b1, b2 = json.loads(r1.body or b"{}"), json.loads(r2.body or b"{}")
    keys = ("collections", "bbox", "intersects", "datetime", "token")
    assert {k: b1.get(k) for k in keys} == {k: b2.get(k) for k in keys}
    return True


def _replay(path):
    v = vcr.VCR(record_mode="none", match_on=["method", "scheme", "host", "path", "same_search"])
    v.register_matcher("same_search", _same_search)
    return v.use_cassette(str(path))


def test_paging_follows_next_token(tmp_path):
    path, posts = _cassette(tmp_path, "test_item_search__TestItemSearch.test_result_paging.yaml")
    params = SearchParams(collections=("naip",), bbox=(-73.21, 43.99, -73.12, 44.05), limit=10, max_items=20)
    with _replay(path) as cas:
        items = search_live(PLANETARY_COMPUTER_URL, params, max_retries=0)
        assert cas.all_played
    assert len(items) == 20
    assert len({it["id"] for it in items}) == 20
    assert all(it["collection"] == "naip" for it in items)
    recorded_ids = [f["id"] for p in posts for f in json.loads(p["response"]["body"]["string"])["features"]]
    assert [it["id"] for it in items] == recorded_ids[:20]


def test_intersects_search(tmp_path):
    path, posts = _cassette(tmp_path, "test_item_search__TestItemSearch.test_intersects_results.yaml")
    poly = json.loads(posts[0]["request"]["body"])["intersects"]
    params = SearchParams(collections=("naip",), intersects=poly, max_items=None)
    with _replay(path):
        items = search_live(PLANETARY_COMPUTER_URL, params, max_retries=0)
    assert len(items) == 42
    years = {it["properties"]["datetime"][:4] for it in items}
    assert min(years) == "2011" and max(years) == "2023"


def test_datetime_search_sentinel2(tmp_path):
    path, _ = _cassette(tmp_path, "test_item_search__TestItemSearch.test_datetime_results.yaml")
    params = SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90),
                          datetime="2019-01-01T00:00:01Z/2019-01-01T00:00:10Z", max_items=None)
    # The recording has no bbox in the body: compare only the fields it has.
    with vcr.VCR(record_mode="none", match_on=["method", "path"]).use_cassette(str(path)):
        items = search_live(PLANETARY_COMPUTER_URL, params, max_retries=0)
    assert len(items) == 33
    assert all(it["properties"]["s2:processing_baseline"] for it in items)
    assert all(it["properties"]["datetime"].startswith("2019-01-01T00:00:0") for it in items)


def test_client_side_cloud_filter_drops_items_without_cloud_cover(tmp_path):
    path, _ = _cassette(tmp_path, "test_item_search__TestItemSearch.test_result_paging.yaml")
    params = SearchParams(collections=("naip",), bbox=(-73.21, 43.99, -73.12, 44.05), limit=10, max_items=10,
                          max_cloud_cover=20)
    # PC conforms to the query extension, so the request carries `query`; NAIP has no eo:cloud_cover at all.
    with vcr.VCR(record_mode="none", match_on=["method", "path"]).use_cassette(str(path)):
        assert search_live(PLANETARY_COMPUTER_URL, params, max_retries=0) == []


def test_planetary_computer_signing_never_leaks(tmp_path, monkeypatch):
    """The real planetary_computer.sign_inplace modifier runs; nothing signed comes out of search_live."""
    from datetime import UTC, datetime, timedelta

    import planetary_computer
    from planetary_computer import sas

    path, _ = _cassette(tmp_path, "test_item_search__TestItemSearch.test_result_paging.yaml")
    # Pre-fill the SDK's token cache (no token endpoint offline) with a token for the NAIP container.
    settings = sas.Settings.get()
    token = sas.SASToken(token="st=2026-11-27&se=2030-01-01&sp=rl&sv=2024-05-04&sr=c&sig=SECRET-SIGNATURE",
                         **{"msft:expiry": datetime.now(UTC) + timedelta(hours=1)})
    monkeypatch.setitem(sas.TOKEN_CACHE, f"{settings.sas_url}/naipeuwest/naip", token)
    signed = []
    real = planetary_computer.sign_inplace

    def spy(obj):
        real(obj)
        signed.append(json.dumps(obj.to_dict() if hasattr(obj, "to_dict") else obj))

    params = SearchParams(collections=("naip",), bbox=(-73.21, 43.99, -73.12, 44.05), limit=10, max_items=10)
    with vcr.VCR(record_mode="none", match_on=["method", "path"]).use_cassette(str(path)):
        items = search_live(PLANETARY_COMPUTER_URL, params, max_retries=0, modifier=spy)
    assert any("SECRET-SIGNATURE" in s for s in signed), "sign_inplace must have signed the responses"
    assert len(items) == 10
    assert "SECRET" not in json.dumps(items) and "sig=" not in json.dumps(items)


@pytest.mark.parametrize("status", [500])
def test_http_error_after_retries_is_a_clear_error(tmp_path, status):
    from gair_dataset.stac_catalog import StacSearchError

    path, _ = _cassette(tmp_path, "test_item_search__TestItemSearch.test_result_paging.yaml")
    doc = yaml.safe_load(path.read_text())
    for i in doc["interactions"]:
        if i["request"]["method"] == "POST":
            i["response"]["status"] = {"code": status, "message": "Internal Server Error"}
            i["response"]["body"]["string"] = '{"code": "ServerError", "description": "boom"}'
    path.write_text(yaml.safe_dump(doc))
    params = SearchParams(collections=("naip",), bbox=(-73.21, 43.99, -73.12, 44.05), limit=10, max_items=10)
    replay = vcr.VCR(record_mode="none", match_on=["method", "path"])
    with replay.use_cassette(str(path), allow_playback_repeats=True):
        with pytest.raises(StacSearchError, match="failed"):
            search_live(PLANETARY_COMPUTER_URL, params, max_retries=0)
