"""Mapillary and Panoramax sources against loopback fakes: paging, 429/5xx retries, expired tokens, image cache."""

import time

import pandas as pd
import pytest

from gair_dataset.sv_sources import ApiError, AuthError, HttpSettings, ImageCache, make_session
from gair_dataset.sv_sources.mapillary import fetch_mapillary
from gair_dataset.sv_sources.panoramax import fetch_panoramax
from tests.streetview.fake_apis import LUND, FakeApis

FAST = HttpSettings(timeout_s=5, max_retries=3, backoff_s=0.01, max_retry_after_s=5)


@pytest.fixture
def fake():
    server = FakeApis(n_points=12).start()
    yield server
    server.stop()


def _mapillary(fake, tmp_path, token="GOOD", settings=FAST, **kw):
    with make_session(settings) as session:
        cache = ImageCache(tmp_path / "img", session, timeout_s=5)
        points, rejects = fetch_mapillary(LUND, token=token, session=session, cache=cache,
                                          base_url=f"{fake.base}/mapillary", token_env="MAPILLARY_TOKEN", **kw)
    return points, rejects, cache


def test_mapillary_pages_maps_columns_and_caches_images(fake, tmp_path):
    points, rejects, cache = _mapillary(fake, tmp_path, page_size=5, cell_deg=1.0)
    assert fake.hits["/mapillary/images"] == 3  # 12 items, 5 per page: paging.next followed twice
    assert len(points) == 11 and cache.downloads == 11
    assert rejects["reason"].tolist() == ["Mapillary item unusable: no point geometry in the API answer"]
    assert "SIGNATURE" not in rejects["raw"].iloc[0] and '"id": "1011"' in rejects["raw"].iloc[0]
    row = points.set_index("sv_id").loc["mly-1001"]
    assert row["license"] == "CC-BY-SA-4.0" and row["attribution"] == "user1, Mapillary"
    assert row["source"] == "mapillary" and row["source_url"] == "https://www.mapillary.com/app/?pKey=1001"
    assert row["captured_at"] == "2022-04-15T05:20:01Z" and row["heading"] == 30.0
    assert row["image_uri"].startswith(str(tmp_path)) and "SIGNATURE" not in points.to_csv()
    # A rerun reads the cached images: no image request at all.
    image_hits = sum(n for p, n in fake.hits.items() if "/thumb/" in p)
    points2, _, cache2 = _mapillary(fake, tmp_path, page_size=100)  # default cells: 2 x 2 over Lund, deduplicated
    assert cache2.downloads == 0 and cache2.hits == 11
    assert points2.sort_values("sv_id", ignore_index=True).equals(points.sort_values("sv_id", ignore_index=True))
    assert sum(n for p, n in fake.hits.items() if "/thumb/" in p) == image_hits


def test_mapillary_429_honours_retry_after_and_5xx_is_retried(fake, tmp_path):
    fake.fail_next("mapillary", 429, retry_after="1")
    fake.fail_next("mapillary", 503)
    fake.fail_next("image", 502)
    t0 = time.monotonic()
    points, rejects, _ = _mapillary(fake, tmp_path, page_size=100)
    assert time.monotonic() - t0 >= 1.0  # Retry-After: 1 was waited (backoff alone is 0.01 s)
    assert len(points) == 11 and len(rejects) == 1
    assert fake.hits["/mapillary/images"] == 2 + 4  # 429 and 503 retried, then one page per cell (2 x 2)


def test_mapillary_expired_token_fails_at_once_without_leaking_it(fake, tmp_path):
    fake.expired_tokens.add("MLY|secret-expired-123")
    with pytest.raises(AuthError) as err:
        _mapillary(fake, tmp_path, token="MLY|secret-expired-123")
    msg = str(err.value)
    assert "MAPILLARY_TOKEN" in msg and "code 190" in msg and "expired" in msg
    assert "secret-expired-123" not in msg
    assert fake.hits["/mapillary/images"] == 1  # not retried


def test_mapillary_persistent_5xx_gives_up_after_retries(fake, tmp_path):
    fake.fail_next("mapillary", 503, times=10)
    with pytest.raises(ApiError, match=r"HTTP 503 .*/mapillary/images after retries") as err:
        _mapillary(fake, tmp_path)
    assert "GOOD" not in str(err.value) and "bbox=" not in str(err.value)
    assert fake.hits["/mapillary/images"] == FAST.max_retries + 1


def test_unreachable_api_names_the_host_not_the_query(tmp_path):
    with make_session(HttpSettings(timeout_s=1, max_retries=1, backoff_s=0.01)) as session:
        cache = ImageCache(tmp_path, session)
        with pytest.raises(ApiError, match=r"127\.0\.0\.1:9/images") as err:
            fetch_mapillary(LUND, token="GOOD", session=session, cache=cache, base_url="http://127.0.0.1:9")
    assert "GOOD" not in str(err.value)


def test_panoramax_pages_licence_producer_and_missing_image(fake, tmp_path):
    fake.fail_next("panoramax", 500)
    with make_session(FAST) as session:
        cache = ImageCache(tmp_path / "img", session, timeout_s=5)
        points, rejects = fetch_panoramax(LUND, session=session, cache=cache, base_url=f"{fake.base}/panoramax/api",
                                          page_size=5)
    assert fake.hits["/panoramax/api/search"] == 4  # one 500, then 3 pages via rel=next
    assert len(points) == 11 and points["license"].eq("CC-BY-SA-4.0").all()
    row = points.set_index("sv_id").loc["pnx-0000-0002"]
    assert row["attribution"] == "prod0, Panoramax" and row["heading"] == 90.0
    assert row["source_url"].endswith("/panoramax/api/collections/seq-1/items/0000-0002")
    assert row["captured_at"].startswith("2023-05-03")
    assert rejects["sv_id"].tolist() == ["pnx-0000-0003"]
    assert rejects["reason"].iloc[0].startswith("image download failed: ") and "HTTP 404" in rejects["reason"].iloc[0]
    assert pd.notna(rejects["lon"].iloc[0]) and "0000-0003" in rejects["raw"].iloc[0]


def test_panoramax_max_points_and_image_size(fake, tmp_path):
    with make_session(FAST) as session:
        cache = ImageCache(tmp_path / "img", session, timeout_s=5)
        points, _ = fetch_panoramax(LUND, session=session, cache=cache, base_url=f"{fake.base}/panoramax/api",
                                    page_size=2, max_points=3, image_size="thumb")
    assert len(points) == 3 and fake.hits["/panoramax/api/search"] == 2
    assert all("/thumb.jpg" in p for p in fake.hits if p.startswith("/panoramax/pictures/"))
    with pytest.raises(ValueError, match="image_size"):
        fetch_panoramax(LUND, session=make_session(FAST), cache=cache, base_url=fake.base, image_size="huge")
