"""Street-view API sources against hostile or broken answers: paging loops, foreign next links, leaked credentials,
broken image downloads and expired signed image URLs (loopback fakes, real sockets)."""

import json
import logging

import pandas as pd
import pytest

from gair_dataset.samples import build_sample_json
from gair_dataset.signing import RedactingFilter, strip_token_params
from gair_dataset.sv_sources import ApiError, HttpSettings, ImageCache, make_session
from gair_dataset.sv_sources.common import ItemCollector
from gair_dataset.sv_sources.mapillary import _record as mapillary_record
from gair_dataset.sv_sources.mapillary import fetch_mapillary
from gair_dataset.sv_sources.panoramax import _record as panoramax_record
from gair_dataset.sv_sources.panoramax import fetch_panoramax
from tests.streetview.fake_apis import LUND, FakeApis

FAST = HttpSettings(timeout_s=5, max_retries=2, backoff_s=0.01, max_retry_after_s=1)
MLY_TOKEN = "MLY|4242|secret-valid-token"
PNX_TOKEN = "secret-panoramax-token"


@pytest.fixture
def fake():
    server = FakeApis(n_points=12).start()
    server.valid_tokens.add(MLY_TOKEN)
    yield server
    server.stop()


def _run(fake, tmp_path, api, settings=FAST, image_timeout=5.0, **kw):
    with make_session(settings) as session:
        cache = ImageCache(tmp_path / "img", session, timeout_s=image_timeout)
        if api == "mapillary":
            return fetch_mapillary(LUND, token=kw.pop("token", MLY_TOKEN), session=session, cache=cache,
                                   base_url=f"{fake.base}/mapillary", token_env="MAPILLARY_TOKEN", cell_deg=1.0,
                                   **kw)
        return fetch_panoramax(LUND, session=session, cache=cache, base_url=f"{fake.base}/panoramax/api", **kw)


SEARCH = {"mapillary": "/mapillary/images", "panoramax": "/panoramax/api/search"}


@pytest.mark.parametrize("api", ["mapillary", "panoramax"])
def test_next_link_repeating_a_page_stops_with_an_error(fake, tmp_path, api):
    fake.next_mode = "repeat"  # every next link is the page just served (the fake stops after 30 hits)
    with pytest.raises(ApiError, match="points back to a page already read"):
        _run(fake, tmp_path, api, page_size=5)
    assert fake.hits[SEARCH[api]] == 1  # the repeated page was not requested again


@pytest.mark.parametrize("api", ["mapillary", "panoramax"])
def test_next_link_to_another_host_is_not_followed(fake, tmp_path, api):
    fake.next_mode = "foreign"  # next links name localhost (the same fake server) instead of 127.0.0.1
    token = {"token": PNX_TOKEN} if api == "panoramax" else {}
    with pytest.raises(ApiError, match=r"next-page link points to http://localhost:\d+, not the API") as err:
        _run(fake, tmp_path, api, page_size=5, **token)
    assert "secret" not in str(err.value)
    hosts = [host for host, path, _ in fake.requests if path.startswith(SEARCH[api])]
    assert hosts and all(h.startswith("127.0.0.1:") for h in hosts)  # nothing went to the other host
    assert fake.hits[SEARCH[api]] == 1


def test_credentials_are_redacted_in_http_debug_logs_and_next_links(fake, tmp_path, caplog, monkeypatch):
    fake.token_in_next = True  # the Graph API echoes access_token into paging.next
    # Earlier tests of the session may have reconfigured logging (a dictConfig disables existing loggers): make sure
    # urllib3's debug records reach caplog, so that the redaction is really exercised.
    for name in ("urllib3", "urllib3.connectionpool"):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
        caplog.set_level(logging.DEBUG, logger=name)
    caplog.set_level(logging.DEBUG)
    points, _ = _run(fake, tmp_path, "mapillary", page_size=5)
    assert len(points) == 11
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /mapillary/images?" in text and "/mapillary/thumb/" in text  # urllib3 did log the requests
    assert "next page" in text  # and the source logged the links it followed
    assert "secret-valid-token" not in text and "SIGNATURE" not in text
    # the token travels in the header only: the followed next links had access_token stripped
    searches = [path for _, path, _ in fake.requests if path.startswith("/mapillary/images")]
    assert len(searches) == 3 and not any("access_token" in p for p in searches)


def test_redacting_filter_hides_authorization_values_and_token_params():
    record = logging.LogRecord("urllib3.connectionpool", logging.DEBUG, __file__, 1,
                               "send %s %s", ({"Authorization": f"OAuth {MLY_TOKEN}"},
                                              "/x?client_id=42&access_token=abc&bbox=1"), None)
    RedactingFilter().filter(record)
    assert "secret" not in record.getMessage() and "abc" not in record.getMessage()
    assert "OAuth <redacted>" in record.getMessage()
    assert strip_token_params("https://h/p?bbox=1&access_token=X&client_id=Y") == "https://h/p?bbox=1"


@pytest.mark.parametrize("mode", ["truncate", "reset", "stall"])
def test_broken_image_body_is_a_reject_and_the_run_goes_on(fake, tmp_path, mode):
    fake.image_modes = {"1002": mode}
    fake.stall_s = 10.0  # far past the read timeout, which the healthy images must not hit on a loaded machine
    points, rejects = _run(fake, tmp_path, "mapillary", image_timeout=2.5, page_size=100)
    assert len(points) == 10 and "mly-1002" not in set(points["sv_id"])
    row = rejects.set_index("sv_id").loc["mly-1002"]
    assert row["reason"].startswith("image download failed: ") and "interrupted" in row["reason"]
    assert "SIGNATURE" not in row["reason"] and "SIGNATURE" not in row["raw"]
    assert not list((tmp_path / "img").glob("mly-1002*"))  # no partial file cached


def test_expired_image_signature_is_a_forbidden_url_not_a_refused_token(fake, tmp_path):
    fake.image_modes = {"1001": "forbidden"}
    points, rejects = _run(fake, tmp_path, "mapillary", page_size=100)
    assert len(points) == 10
    reason = rejects.set_index("sv_id").loc["mly-1001", "reason"]
    assert "expired or forbidden" in reason and "HTTP 403" in reason
    assert "token" not in reason and "SIGNATURE" not in reason


def test_panoramax_image_auth_error_rejects_that_picture_only(fake, tmp_path):
    fake.image_modes = {"0000-0005": "unauthorized"}
    points, rejects = _run(fake, tmp_path, "panoramax", page_size=100, token=PNX_TOKEN, token_env="PNX_TOKEN")
    assert len(points) == 10  # 12 pictures, one 404 (the fake's), one 401
    by_id = rejects.set_index("sv_id")["reason"]
    assert "expired or forbidden" in by_id["pnx-0000-0005"] and "HTTP 401" in by_id["pnx-0000-0005"]
    assert "HTTP 404" in by_id["pnx-0000-0003"]
    assert PNX_TOKEN not in rejects.to_csv()
    image_auth = {auth for _, path, auth in fake.requests if path.startswith("/panoramax/pictures/")}
    assert image_auth == {f"Bearer {PNX_TOKEN}"}  # the API's own host got the token, as before


def test_signed_hrefs_are_redacted_in_rejects_raw_and_source_url(fake, tmp_path):
    fake.href_query = "?sv=2021&sig=SECRETSIG&access_token=SECRETTOKEN"
    points, rejects = _run(fake, tmp_path, "panoramax", page_size=100)
    assert len(points) == 11
    raw = rejects.set_index("sv_id").loc["pnx-0000-0003", "raw"]
    assert "0000-0003" in raw and "SECRET" not in raw and "?<redacted>" in raw
    assert "SECRET" not in points.to_csv() and "access_token" not in points.to_csv()


def test_item_collector_redacts_raw_and_rejects_an_item_once():
    signed = "https://cdn.example/p.jpg?X-Amz-Signature=SECRETSIG&oe=65F0"
    items = ItemCollector("Panoramax", "pnx-", lambda item: panoramax_record(item, "sd"))
    bad = {"id": "p1", "assets": {"sd": {"href": signed}}, "properties": {"note": "token=SECRETTOKEN"}}
    for _ in range(2):  # e.g. the item came back on two pages
        items.add(bad)
    items.add(["not", "an", "item"])
    records, rejects = items.result(None)
    assert records == [] and [r["sv_id"] for r in rejects] == ["pnx-p1", None]
    assert rejects[0]["reason"] == "Panoramax item unusable: no point geometry in the item"
    assert "SECRET" not in json.dumps(rejects) and "cdn.example/p.jpg" in rejects[0]["raw"]


def test_source_url_keeps_no_credential_parameter_into_the_sample_json():
    item = {"id": "77", "geometry": {"type": "Point", "coordinates": [13.2, 55.7]},
            "thumb_1024_url": "https://cdn.example/t.jpg?_nc_oh=SIG"}

    def viewer_link(it):  # a source whose permanent link is a viewer URL that came back with the token in it
        rec, why = mapillary_record(it, "thumb_1024_url")
        return {**rec, "source_url": "https://viewer.example/app/?pKey=77&access_token=SECRETTOKEN"}, why

    items = ItemCollector("Mapillary", "mly-", viewer_link, drop=["thumb_1024_url"])
    items.add(item)
    (rec,), _ = items.result(None)
    assert rec["source_url"] == "https://viewer.example/app/?pKey=77"  # useful parameters kept
    assert "SIG" not in rec["raw"]
    pair = {**rec, "x": 0.5, "y": 0.5, "col": 1, "row": 1, "tile_id": "t", "split": "train", "lon_min": 13.1,
            "lat_max": 55.8, "lon_max": 13.3, "lat_min": 55.6}
    meta = build_sample_json(pair, {"id": "i", "properties": {}}, b"", bands=["B02"], harmonized=False,
                             processing_baseline=None)
    assert meta["sv_source_url"] == rec["source_url"] and "SECRET" not in json.dumps(meta)
    # an id is quoted into Mapillary's own link: it cannot add a query parameter
    rec2, _ = mapillary_record({**item, "id": "1&access_token=X"}, "thumb_1024_url")
    assert rec2 is not None and rec2["source_url"] == "https://www.mapillary.com/app/?pKey=1%26access_token%3DX"


def test_sv_points_asset_stores_no_signed_href_and_names_no_credential(monkeypatch, tmp_path, fake):
    import dataclasses

    import pipelines.partitions as parts
    from pipelines.config import StreetViewSource
    from pipelines.defs.streetview.assets import _describe, _where
    from tests.streetview.test_sv_inputs import _materialize

    fake.href_query = "?sig=SECRETSIG&access_token=SECRETTOKEN"
    src = StreetViewSource.from_config("sample-lund", {"kind": "panoramax", "url": f"{fake.base}/panoramax/api"})
    assert _materialize(monkeypatch, tmp_path, src).success
    out = tmp_path / "data" / "streetview" / "sample-lund"
    for name in ("points.parquet", "rejects.parquet"):
        table = pd.read_parquet(out / name)
        assert len(table) and "SECRET" not in table.to_csv(), name
    region = dataclasses.replace(parts.REGIONS["sample-lund"], streetview=dataclasses.replace(
        src, url="https://pnx.example/api?client_id=SECRETCLIENT&x=1"))
    assert "SECRET" not in _where(region) and "SECRET" not in json.dumps(_describe(region))
    assert _describe(region)["url"] == "https://pnx.example/api?x=1"


@pytest.mark.parametrize("api", ["mapillary", "panoramax"])
def test_api_root_with_its_own_query_string_keeps_it(fake, tmp_path, api):
    """A configured API root such as ``https://h/api?tenant=x`` gets its endpoint path before that query."""
    plain = {"mapillary": f"{fake.base}/mapillary", "panoramax": f"{fake.base}/panoramax/api"}[api]

    def fetch(root: str, folder: str):
        with make_session(FAST) as session:
            cache = ImageCache(tmp_path / folder, session, timeout_s=5)
            if api == "mapillary":
                return fetch_mapillary(LUND, token=MLY_TOKEN, session=session, cache=cache, base_url=root,
                                       token_env="MAPILLARY_TOKEN", cell_deg=1.0, page_size=50)
            return fetch_panoramax(LUND, session=session, cache=cache, base_url=root, page_size=50)

    expected, _ = fetch(plain, "a")
    fake.requests.clear()
    records, _ = fetch(f"{plain}?tenant=lund", "b")
    assert len(records) == len(expected) > 0
    assert list(records["sv_id"]) == list(expected["sv_id"])
    first = next(path for _, path, _ in fake.requests if path.startswith(SEARCH[api]))
    assert "tenant=lund" in first and "bbox=" in first
