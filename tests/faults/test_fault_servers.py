"""The library's answers to single faults from the loopback fault servers (bench/fault_servers.py): fast, in-process.

A STAC search through :class:`FaultyStacApi` (rustac) survives 429 with Retry-After, a stalled answer (the client
timeout applies: pystac-client used to drop it), and a page cut in half; a page that stays malformed is a clear
error. A chip read through :class:`FaultyRasterServer` with a cached token the server calls expired is re-signed
with a fresh token. Skipped without rustac or ../shared/data.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from fault_servers import FaultyRasterServer, FaultyStacApi, LoopbackSigner  # noqa: E402

from gair_dataset.chips import ChipReader, TileSpec  # noqa: E402
from gair_dataset.signing import PlanetaryComputerSigner, refresh_signer  # noqa: E402
from gair_dataset.stac_catalog import SearchParams, StacSearchError, search_live  # noqa: E402
from tests.conftest import shared_path  # noqa: E402

ITEM = REPO / "tests" / "fixtures" / "earth_search" / "s2_l2a_v1_item.json"
PARAMS = SearchParams(collections=("sentinel-2-l2a",), bbox=(19.875, -32.838, 19.900, -32.818), max_items=None)


@pytest.fixture(scope="module")
def stac_api(tmp_path_factory):
    if not (shutil.which("rustac") or (Path(sys.executable).parent / "rustac").exists()):
        pytest.skip("rustac is not installed (pip install -e '.[dev]')")
    with FaultyStacApi([json.loads(ITEM.read_text())], tmp_path_factory.mktemp("stac")) as api:
        yield api


def _search(api: FaultyStacApi, *faults: str, retries: int = 2, timeout: float = 10.0) -> tuple[list[dict], list[str]]:
    api.inject(*faults)
    start = len(api.log)
    try:
        items = search_live(api.url, PARAMS, max_retries=retries, backoff_factor=0.05, timeout=timeout)
    finally:
        api.release.set()
    return items, [o for _, m, _, o in api.log[start:] if m == "POST"]


def test_429_waits_for_retry_after(stac_api):
    items, answers = _search(stac_api, "429")
    assert [it["id"] for it in items] == ["S2B_34HCH_20230105_0_L2A"]
    assert answers == ["429", "200"]
    t_429, t_next = (t for t, m, _, _ in stac_api.log[-2:])
    assert t_next - t_429 >= stac_api.retry_after_s * 0.95  # Retry-After honoured, not the 0.05 s backoff


def test_stalled_answer_times_out_and_is_retried(stac_api):
    t0 = time.monotonic()
    items, answers = _search(stac_api, "stall", timeout=3.0)  # long enough for a loaded machine's real answer
    assert len(items) == 1 and answers == ["stall", "200"]
    assert time.monotonic() - t0 < 30  # the 3 s client timeout fired: nothing waited for the stalled answer


def test_malformed_page_is_fetched_again(stac_api):
    items, answers = _search(stac_api, "malformed")
    assert len(items) == 1 and answers == ["malformed", "200"]


def test_page_that_stays_malformed_is_a_clear_error(stac_api):
    with pytest.raises(StacSearchError, match=r"answered 3 time\(s\) with a page that is not JSON"):
        _search(stac_api, "malformed", "malformed", "malformed")
    assert stac_api.pending() == []


def test_expired_cached_token_is_replaced_after_403(tmp_path):
    patch = shared_path("rasters", "s2_l2a_patches", "images", "patch_252161.tif")
    shutil.copy(patch, tmp_path / "patch.tif")
    item = {"id": "p", "collection": "unknown", "properties": {"proj:epsg": 32734},
            "assets": {"data": {"href": "", "eo:bands": [{"name": "B02"}]}}}
    tile = TileSpec("EPSG:32734", (394615.0, 6368525.0 - 320, 394615.0 + 320, 6368525.0), 32, 32, "t")
    with FaultyRasterServer(tmp_path) as server:
        item["assets"]["data"]["href"] = f"{server.url}/p/patch.tif"
        LoopbackSigner.forget_all()
        signer = LoopbackSigner(server.token_url)
        signer("warm")  # a token cached earlier in the run ...
        server.expire_tokens()  # ... that the server now calls expired (its clock is ahead)
        with ChipReader(signer=signer) as reader:
            chip = reader.read(item, tile, bands=["B02"], max_cloud_fraction=None, harmonize=False)
        assert chip.ok, chip.rejected_reason
        assert reader.n_resigned == 1 and server.count(403, "expired") == 1
        assert server.state.tokens_issued == 2  # the expired one, then a fresh one after the 403


def test_connection_cut_mid_read_is_forgotten_and_read_again(tmp_path):
    """GDAL keeps a range answer cut mid-body in its /vsicurl/ cache: reading again fails until it is forgotten."""
    import rasterio

    patch = shared_path("rasters", "s2_l2a_patches", "images", "patch_252161.tif")
    shutil.copy(patch, tmp_path / "patch.tif")
    with rasterio.open(patch) as src:
        left, top = src.bounds.left, src.bounds.top
        crs = src.crs.to_string()
        expected = src.read(1, window=((0, 64), (0, 64)))
    item = {"id": "p", "collection": "unknown", "properties": {},
            "assets": {"data": {"href": "", "eo:bands": [{"name": "B02"}]}}}
    tile = TileSpec(crs, (left, top - 640, left + 640, top), 64, 64, "t")
    kw = {"bands": ["B02"], "max_cloud_fraction": None, "harmonize": False}
    with FaultyRasterServer(tmp_path) as server:
        href = f"{server.url}/p/patch.tif"
        item["assets"]["data"]["href"] = href
        LoopbackSigner.forget_all()
        with ChipReader(signer=LoopbackSigner(server.token_url), gdal_env={"GDAL_HTTP_MAX_RETRY": 0}) as reader:
            server.cut_next(1)
            cut = reader.read(item, tile, **kw)
            assert server.count(206, "cut") == 1
            assert cut.rejected_reason and cut.rejected_reason.startswith("read_error")
            assert cut.failed_hrefs == [href] and "sig=" not in cut.rejected_reason
            again = reader.read(item, tile, **kw)  # the short bytes are still cached: no new request helps
            assert not again.ok and again.failed_hrefs == [href]
            reader.forget_cached(again.failed_hrefs)
            chip = reader.read(item, tile, **kw)
    assert chip.ok and chip.failed_hrefs == [], chip.rejected_reason
    np.testing.assert_array_equal(chip.array[0], expected)


def test_planetary_computer_signer_refresh_drops_cached_tokens():
    from planetary_computer.sas import TOKEN_CACHE

    TOKEN_CACHE["https://example.invalid/api/sas/v1/token/acct/container"] = object()  # type: ignore[assignment]
    signer = PlanetaryComputerSigner(lambda href: href + "?sig=x")
    refresh_signer(signer, "https://acct.blob.core.windows.net/container/a.tif")
    assert TOKEN_CACHE == {}
    assert signer("https://h/a.tif") == "https://h/a.tif?sig=x"
    refresh_signer(lambda href: href, "https://h/a.tif")  # a plain function: nothing to refresh, no error
