"""Windowed chip reads (gair_dataset.chips) against the real rasters in ../shared/data/rasters."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import from_bounds
from rasterio.warp import reproject, transform_bounds

from gair_dataset.bands import NAIP_BANDS, S2_L2A_ALL_BANDS, S2_L2A_BANDS
from gair_dataset.chips import (
    ChipReader,
    ChipReadError,
    TileSpec,
    harmonize_s2,
    needs_s2_harmonization,
    read_chip,
    resolve_band_sources,
)
from gair_dataset.signing import redact_text, redact_url

S2_IDX = {b: i for i, b in enumerate(S2_L2A_ALL_BANDS)}


@pytest.fixture(scope="module")
def s2_patch(shared_data: Path) -> Path:
    # a patch without zero (nodata-looking) pixels, picked deterministically
    for p in sorted((shared_data / "rasters" / "s2_l2a_patches" / "images").glob("*.tif")):
        with rasterio.open(p) as src:
            if not (src.read() == 0).any():
                return p
    pytest.skip("no S2 patch without zeros")


def s2_item(href: str | Path, baseline: str = "03.01", **extra_assets: dict) -> dict:
    """A PC-like sentinel-2-l2a item whose one 12-band asset is a SatCLIP patch."""
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": "test-s2-item", "collection": "sentinel-2-l2a",
        "properties": {"datetime": "2022-06-01T10:00:00Z", "s2:processing_baseline": baseline,
                       "platform": "Sentinel-2A"},
        "assets": {"data": {"href": str(href), "eo:bands": [{"name": b} for b in S2_L2A_ALL_BANDS]},
                   **extra_assets},
    }


def tile_at(src, col: float, row: float, w: int, h: int, crs: str | None = None) -> TileSpec:
    x0, y0 = src.transform @ (col, row)
    x1, y1 = src.transform @ (col + w, row + h)
    return TileSpec(crs or src.crs.to_string(), (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), w, h)


def test_window_read_equals_reference_slice(s2_patch: Path) -> None:
    with rasterio.open(s2_patch) as src:
        full = src.read()
        tile = tile_at(src, 37, 81, 96, 96)
    res = read_chip(s2_item(s2_patch), tile)
    assert res.ok, res.rejected_reason
    assert res.bands == list(S2_L2A_BANDS) and res.array.dtype == np.uint16
    ref = full[[S2_IDX[b] for b in S2_L2A_BANDS], 81:81 + 96, 37:37 + 96]
    np.testing.assert_array_equal(res.array, ref)
    assert res.nodata_fraction == 0.0 and not res.harmonized and res.processing_baseline == "03.01"


def test_harmonisation_baseline_04(s2_patch: Path) -> None:
    with rasterio.open(s2_patch) as src:
        full = src.read()
        tile = tile_at(src, 0, 0, 64, 64)
    res = read_chip(s2_item(s2_patch, baseline="05.10"), tile)
    assert res.ok and res.harmonized and res.processing_baseline == "05.10"
    ref = full[[S2_IDX[b] for b in S2_L2A_BANDS], :64, :64].astype(np.int32)
    np.testing.assert_array_equal(res.array, np.clip(ref - 1000, 1, None).astype(np.uint16))


def test_harmonize_keeps_nodata_and_clips() -> None:
    a = np.array([0, 500, 1000, 1001, 5000], dtype=np.uint16)
    np.testing.assert_array_equal(harmonize_s2(a.copy()), [0, 1, 1, 1, 4000])  # dark stays valid, 0 is nodata
    assert needs_s2_harmonization({"properties": {"s2:processing_baseline": "04.00"}})
    assert needs_s2_harmonization({"properties": {"s2:processing_baseline": "05.10"}})
    assert not needs_s2_harmonization({"properties": {"s2:processing_baseline": "03.01"}})
    assert not needs_s2_harmonization({"properties": {}})


def test_offset_data_with_dark_infrared_stays_valid(s2_patch: Path, tmp_path: Path) -> None:
    """Water/shadow: with the +1000 offset present, NIR/SWIR at or below 1000 are valid dark pixels, not nodata."""
    with rasterio.open(s2_patch) as src:
        data, prof = src.read()[:, :32, :32].astype(np.int32), src.profile
    with_offset = np.clip(data + 1000, 0, 65535).astype(np.uint16)
    for b in ("B08", "B8A", "B11", "B12"):  # the top half: water, infrared below +1000 (negative reflectance)
        with_offset[S2_IDX[b], :16] = 990
    with_offset[:, 31, 31] = 0  # one real nodata pixel
    path = tmp_path / "offset.tif"
    with rasterio.open(path, "w", **{**prof, "width": 32, "height": 32, "nodata": 0,
                                     "transform": prof["transform"]}) as dst:
        dst.write(with_offset)
    with rasterio.open(path) as src:
        tile = tile_at(src, 0, 0, 32, 32)
    res = read_chip(s2_item(path, baseline="04.00"), tile)
    assert res.ok, res.rejected_reason
    assert res.nodata_fraction == pytest.approx(1 / 1024) and res.harmonize_clipped == 0.0
    nir = res.array[res.bands.index("B08")]
    assert (nir[:16] == 1).all()  # clipped to 1 (valid), never 0 (nodata)
    assert (res.array[:, 31, 31] == 0).all()  # the nodata pixel stays nodata
    expected = np.maximum(with_offset[S2_IDX["B04"]].astype(np.int32) - 1000, 1)
    expected[31, 31] = 0
    np.testing.assert_array_equal(res.array[res.bands.index("B04")], expected)


def test_tile_crossing_raster_edge(s2_patch: Path) -> None:
    with rasterio.open(s2_patch) as src:
        full = src.read()
        tile = tile_at(src, 256 - 48, 100, 96, 96)  # half of it east of the raster
    rejected = read_chip(s2_item(s2_patch), tile)
    assert not rejected.ok and rejected.rejected_reason.startswith("nodata_fraction")
    assert rejected.array is None and rejected.nodata_fraction == pytest.approx(0.5)
    res = read_chip(s2_item(s2_patch), tile, max_nodata_fraction=1.0)
    assert res.ok and res.array.shape == (10, 96, 96)
    ref = full[[S2_IDX[b] for b in S2_L2A_BANDS], 100:196, 208:256]
    np.testing.assert_array_equal(res.array[:, :, :48], ref)
    assert (res.array[:, :, 48:] == 0).all()


def test_tile_in_other_crs_is_warped(s2_patch: Path) -> None:
    with rasterio.open(s2_patch) as src:
        full = src.read()
        src_transform, src_crs = src.transform, src.crs
        b = src.bounds
    # a web-mercator tile well inside the patch
    cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
    inner = transform_bounds(src_crs, "EPSG:3857", cx - 600, cy - 600, cx + 600, cy + 600)
    tile = TileSpec("EPSG:3857", inner, 80, 80)
    res = read_chip(s2_item(s2_patch), tile, bands=["B04", "B08"])
    assert res.ok, res.rejected_reason
    ref = np.zeros((2, 80, 80), np.float32)
    for k, band in enumerate(["B04", "B08"]):
        reproject(full[S2_IDX[band]].astype(np.float32), ref[k], src_transform=src_transform, src_crs=src_crs,
                  dst_transform=from_bounds(*inner, 80, 80), dst_crs=CRS.from_epsg(3857),
                  resampling=Resampling.bilinear)
    diff = np.abs(res.array.astype(np.float32) - ref)
    assert np.median(diff) <= 1.0 and diff.max() <= 0.02 * full.max()


def test_20m_band_resampled_to_tile_grid(s2_patch: Path, tmp_path: Path) -> None:
    with rasterio.open(s2_patch) as src:
        full = src.read()
        profile = src.profile
        tile = tile_at(src, 40, 40, 96, 96)
    # a 20 m B05 asset made by 2x2 averaging, like the real R20m COGs
    b05_20 = full[S2_IDX["B05"]].reshape(128, 2, 128, 2).mean(axis=(1, 3)).round().astype(np.uint16)
    t20 = profile["transform"] @ rasterio.Affine.scale(2)
    p20 = tmp_path / "B05_20m.tif"
    with rasterio.open(p20, "w", driver="GTiff", width=128, height=128, count=1, dtype="uint16",
                       crs=profile["crs"], transform=t20) as dst:
        dst.write(b05_20, 1)
    item = s2_item(s2_patch)
    item["assets"]["B05"] = {"href": str(p20), "eo:bands": [{"name": "B05"}]}
    res = read_chip(item, tile)
    assert res.ok
    src_b05 = resolve_band_sources(item, ["B05"])[0]
    assert src_b05.asset == "B05" and src_b05.index == 1
    ref = np.zeros((96, 96), np.float32)
    reproject(b05_20.astype(np.float32), ref, src_transform=t20, src_crs=profile["crs"],
              dst_transform=from_bounds(*tile.bounds, 96, 96), dst_crs=profile["crs"],
              resampling=Resampling.bilinear)
    got = res.array[S2_L2A_BANDS.index("B05")].astype(np.float32)
    assert np.abs(got - ref)[2:-2, 2:-2].max() <= 2.0  # same bilinear grid, up to rounding
    # 10 m bands of the same chip are untouched
    np.testing.assert_array_equal(res.array[0], full[S2_IDX["B02"], 40:136, 40:136])


def test_out_size_resamples(s2_patch: Path) -> None:
    with rasterio.open(s2_patch) as src:
        tile = tile_at(src, 0, 0, 192, 192)
    res = read_chip(s2_item(s2_patch), tile, out_size=64, bands=["B02", "B03"])
    assert res.ok and res.array.shape == (2, 64, 64)


def test_naip_bands_and_nodata_edge(shared_data: Path) -> None:
    path = shared_data / "rasters" / "naip_nd" / "m_4709963_se_14_1_20200831.tif"
    item = {"id": "naip-nd-2020", "collection": "naip", "properties": {"datetime": "2020-08-31T00:00:00Z"},
            "assets": {"image": {"href": str(path), "eo:bands": [
                {"name": "Red", "common_name": "red"}, {"name": "Green", "common_name": "green"},
                {"name": "Blue", "common_name": "blue"}, {"name": "NIR", "common_name": "nir"}]}}}
    srcs = resolve_band_sources(item, list(NAIP_BANDS))
    assert [(s.asset, s.index) for s in srcs] == [("image", 1), ("image", 2), ("image", 3), ("image", 4)]
    with rasterio.open(path) as src:
        full = src.read()
        tile = tile_at(src, 300, 200, 128, 128)
        edge = tile_at(src, -64, 200, 128, 128)
    res = read_chip(item, tile)
    assert res.ok and res.bands == list(NAIP_BANDS) and res.array.dtype == np.uint16
    np.testing.assert_array_equal(res.array, full[:, 200:328, 300:428])
    res_edge = read_chip(item, edge, max_nodata_fraction=1.0)
    assert res_edge.nodata_fraction >= 0.5
    np.testing.assert_array_equal(res_edge.array[:, :, 64:], full[:, 200:328, 0:64])
    with ChipReader() as reader:  # warm: the second read of the open uint8 asset takes the plain window read
        first, second = reader.read(item, tile), reader.read(item, tile)
    for r in (first, second):
        assert r.ok and r.array.dtype == np.uint16
        np.testing.assert_array_equal(r.array, full[:, 200:328, 300:428])


def test_internal_mask_counts_as_nodata(shared_data: Path) -> None:
    path = shared_data / "rasters" / "cog_fixtures" / "rio-tiler__cog_rgb_mask.tif"
    item = {"id": "mask", "collection": "custom", "properties": {},
            "assets": {"rgb": {"href": str(path), "eo:bands": [{"name": "red"}, {"name": "green"},
                                                               {"name": "blue"}]}}}
    with rasterio.open(path) as src:
        tile = tile_at(src, 0, 0, src.width, src.height)
        mask = src.dataset_mask()
        data = src.read()
    res = read_chip(item, tile, bands=["red", "green", "blue"], max_nodata_fraction=1.0)
    expected_invalid = (mask == 0) | (data == 0).any(axis=0)
    assert res.nodata_fraction == pytest.approx(expected_invalid.mean())
    assert 0 < res.nodata_fraction < 1
    assert (res.array[:, mask == 0] == 0).all()


def test_scl_cloud_rejection(s2_patch: Path, tmp_path: Path) -> None:
    with rasterio.open(s2_patch) as src:
        profile = src.profile
        tile = tile_at(src, 0, 0, 64, 64)
    scl = np.full((128, 128), 4, np.uint8)  # vegetation
    scl[:16, :] = 9  # top quarter of the tile (16 of 32 rows at 20 m... = 8 rows of 32) cloudy
    p = tmp_path / "SCL_20m.tif"
    with rasterio.open(p, "w", driver="GTiff", width=128, height=128, count=1, dtype="uint8",
                       crs=profile["crs"], transform=profile["transform"] @ rasterio.Affine.scale(2)) as dst:
        dst.write(scl, 1)
    item = s2_item(s2_patch, SCL={"href": str(p)})
    res = read_chip(item, tile, max_cloud_fraction=0.2)
    assert not res.ok and res.rejected_reason.startswith("cloud_fraction")
    assert res.cloud_fraction == pytest.approx(0.5)
    ok = read_chip(item, tile, max_cloud_fraction=0.6)
    assert ok.ok and ok.cloud_fraction == pytest.approx(0.5)
    assert read_chip(item, tile, max_cloud_fraction=None).cloud_fraction is None


def test_corrupt_and_missing_rasters_are_rejected(s2_patch: Path, tmp_path: Path) -> None:
    with rasterio.open(s2_patch) as src:
        tile = tile_at(src, 0, 0, 32, 32)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x13" * 300)
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(s2_patch.read_bytes()[:5000])
    results = {}
    for name, href in {"corrupt": corrupt, "missing": tmp_path / "nope.tif", "truncated": truncated,
                       "good": s2_patch}.items():
        results[name] = read_chip(s2_item(href), tile)
    assert results["good"].ok
    for name in ("corrupt", "missing", "truncated"):
        assert not results[name].ok and results[name].rejected_reason.startswith("read_error"), name
    assert sum(r.ok for r in results.values()) + sum(not r.ok for r in results.values()) == 4
    with pytest.raises(ChipReadError):
        read_chip(s2_item(corrupt), tile, raise_on_error=True)


def test_missing_band_rejected(s2_patch: Path) -> None:
    with rasterio.open(s2_patch) as src:
        tile = tile_at(src, 0, 0, 32, 32)
    res = read_chip(s2_item(s2_patch), tile, bands=["B02", "B13"])
    assert not res.ok and "missing_band" in res.rejected_reason


def test_resolve_band_sources_real_pc_items(shared_data: Path) -> None:
    items = shared_data / "stac" / "items"
    s2 = json.loads((items / "stac-geoparquet__sentinel-2-l2a-pc.json").read_text())[0]
    srcs = resolve_band_sources(s2, list(S2_L2A_BANDS))
    assert [s.asset for s in srcs] == list(S2_L2A_BANDS) and all(s.index == 1 for s in srcs)
    naip = json.loads((items / "stac-geoparquet__naip-pc.json").read_text())[0]
    assert [(s.asset, s.index) for s in resolve_band_sources(naip, list(NAIP_BANDS))] == [
        ("image", 1), ("image", 2), ("image", 3), ("image", 4)]
    ls = json.loads((items / "stac-geoparquet__landsat-c2-l2-pc.json").read_text())[0]
    srcs = resolve_band_sources(ls, ["blue", "green", "red", "nir08", "swir16", "swir22"])
    assert [s.asset for s in srcs] == ["blue", "green", "red", "nir08", "swir16", "swir22"]
    assert srcs[0].nodata == 0


# ------------------------------------------------------------------------------------------------
# HTTP(S) reads against a local Range server
# ------------------------------------------------------------------------------------------------
FAST_RETRY = {"GDAL_HTTP_RETRY_DELAY": 0.05, "GDAL_HTTP_MAX_RETRY": 3, "GDAL_HTTP_TIMEOUT": 10}


def _serve_patch(range_server, s2_patch: Path, name: str = "patch.tif") -> None:
    (range_server.state.root / name).write_bytes(s2_patch.read_bytes())


def test_http_read_equals_local(range_server, s2_patch: Path) -> None:
    _serve_patch(range_server, s2_patch)
    with rasterio.open(s2_patch) as src:
        tile = tile_at(src, 10, 20, 64, 64)
    local = read_chip(s2_item(s2_patch), tile)
    remote = read_chip(s2_item(range_server.url("patch.tif", "plain")), tile, gdal_env=FAST_RETRY)
    assert remote.ok, remote.rejected_reason
    np.testing.assert_array_equal(remote.array, local.array)
    assert any(status == 206 for *_, status in range_server.state.log)


def test_http_503_is_retried_by_gdal(range_server, s2_patch: Path) -> None:
    _serve_patch(range_server, s2_patch)
    url = range_server.url("patch.tif", "flaky")
    range_server.state.fail_next["/flaky/patch.tif"] = [503]
    with rasterio.open(s2_patch) as src:
        tile = tile_at(src, 0, 0, 32, 32)
    res = read_chip(s2_item(url), tile, gdal_env=FAST_RETRY)
    assert res.ok, res.rejected_reason
    statuses = [s for _, p, _, s in range_server.state.log if p == "/flaky/patch.tif"]
    assert statuses[0] == 503 and 206 in statuses[1:]


def test_http_403_resigns_exactly_once(range_server, s2_patch: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    _serve_patch(range_server, s2_patch)
    range_server.state.valid_sigs = {"fresh-2"}
    calls: list[str] = []

    def signer(href: str) -> str:
        calls.append(href)
        return f"{href}?se=2099&sig=fresh-{len(calls)}"  # first token is "expired"

    with rasterio.open(s2_patch) as src:
        tile = tile_at(src, 0, 0, 32, 32)
    url = range_server.url("patch.tif", "signed")
    caplog.set_level(logging.DEBUG)
    with ChipReader(signer=signer, gdal_env=FAST_RETRY) as reader:
        res = reader.read(s2_item(url), tile)
        assert reader.n_resigned == 1
    assert res.ok, res.rejected_reason
    assert calls == [url, url]  # signed with the unsigned href, re-signed exactly once
    assert [q for _, p, q, s in range_server.state.log if s == 403] and all(
        "fresh-1" in q for _, _, q, s in range_server.state.log if s == 403)
    text = repr(res) + caplog.text
    assert "sig=" not in text and "fresh-" not in text
    assert res.sources == [url]


def test_http_403_twice_is_rejected_without_leaking_token(range_server, s2_patch: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    _serve_patch(range_server, s2_patch)
    range_server.state.valid_sigs = {"never"}
    calls: list[str] = []

    def signer(href: str) -> str:
        calls.append(href)
        return f"{href}?sv=2021&sig=SECRET{len(calls)}"

    with rasterio.open(s2_patch) as src:
        tile = tile_at(src, 0, 0, 32, 32)
    caplog.set_level(logging.DEBUG)
    url = range_server.url("patch.tif", "expired")
    res = read_chip(s2_item(url), tile, signer=signer, gdal_env=FAST_RETRY)
    assert not res.ok and res.rejected_reason.startswith("read_error") and len(calls) == 2
    with pytest.raises(ChipReadError) as ei:
        read_chip(s2_item(url), tile, signer=signer, gdal_env=FAST_RETRY, raise_on_error=True)
    for text in (res.rejected_reason, str(ei.value), repr(ei.value.__context__), caplog.text, repr(res)):
        assert "SECRET" not in text


def test_redaction_helpers() -> None:
    url = "https://acct.blob.core.windows.net/c/x/B04.tif?st=2024&se=2024&sp=rl&sig=abc%2Bdef"
    assert redact_url(url) == "https://acct.blob.core.windows.net/c/x/B04.tif"
    assert redact_url("/vsicurl/" + url) == "/vsicurl/https://acct.blob.core.windows.net/c/x/B04.tif"
    assert redact_url("/data/local.tif") == "/data/local.tif"
    msg = f"HTTP response code: 403 on /vsicurl/{url} (token sig=abc)"
    red = redact_text(msg)
    assert "abc" not in red and "sig=abc" not in red and "B04.tif" in red


def test_resolve_band_sources_earth_search_items(shared_data: Path) -> None:
    items = shared_data / "stac" / "items"
    v0 = json.loads((items / "odc-stac__S2A_28QCH_20200714_0_L2A.json").read_text())
    assert [s.asset for s in resolve_band_sources(v0, list(S2_L2A_BANDS))] == list(S2_L2A_BANDS)
    # Earth Search v1 style: assets keyed by common name, a 3-band "visual" asset listed first
    v1 = {"id": "es-v1", "collection": "sentinel-2-l2a",
          "properties": {"s2:processing_baseline": "05.09", "earthsearch:boa_offset_applied": True},
          "assets": {"visual": {"href": "v.tif", "eo:bands": [{"name": "red"}, {"name": "green"},
                                                               {"name": "blue"}]},
                     **{c: {"href": f"{c}.tif", "eo:bands": [{"name": c, "common_name": c}]}
                        for c in ("blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir",
                                  "nir08", "swir16", "swir22")}}}
    srcs = resolve_band_sources(v1, list(S2_L2A_BANDS))
    assert [s.asset for s in srcs] == ["blue", "green", "red", "rededge1", "rededge2", "rededge3", "nir",
                                       "nir08", "swir16", "swir22"]
    assert not needs_s2_harmonization(v1)


def test_a_local_raster_rewritten_in_place_is_asked_again(tmp_path: Path) -> None:
    """File facts (masks, CRS) are reused across opens of one file, never across versions of a path."""
    path = tmp_path / "t.tif"
    transform = from_bounds(500000, 6000000, 500320, 6000320, 32, 32)
    profile = {"driver": "GTiff", "width": 32, "height": 32, "count": 1, "dtype": "uint16", "crs": "EPSG:32633",
               "transform": transform}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((1, 32, 32), 500, np.uint16))
    item = {"id": "t", "collection": "custom", "properties": {},
            "assets": {"b": {"href": str(path), "eo:bands": [{"name": "b1"}]}}}
    tile = TileSpec("EPSG:32633", (500000, 6000000, 500320, 6000320), 32, 32, "t")
    kw = {"bands": ["b1"], "max_nodata_fraction": 1.0, "max_cloud_fraction": None, "harmonize": False}
    with ChipReader() as reader:
        first = reader.read(item, tile, **kw)
    assert first.ok and first.nodata_fraction == 0.0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:  # same path
        dst.write(np.full((1, 32, 32), 700, np.uint16))
        mask = np.zeros((32, 32), np.uint8)
        mask[:, :16] = 255  # the right half masked out
        dst.write_mask(mask)
    with ChipReader() as reader:
        second = reader.read(item, tile, **kw)
    assert second.ok and second.nodata_fraction == pytest.approx(0.5)  # the new file's mask is honoured
    assert second.array[0, 0, 0] == 700 and second.array[0, 0, 31] == 0
    # Rewritten again to the same size with its mtime put back (a copy tool keeping times): the change time differs.
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.full((1, 32, 32), 800, np.uint16))
    with ChipReader() as reader:
        assert reader.read(item, tile, **kw).array[0, 0, 0] == 800  # these facts are now remembered
    before = os.stat(path)
    with rasterio.open(path, "w", **{**profile, "crs": "EPSG:32634"}) as dst:  # same size, another CRS
        dst.write(np.full((1, 32, 32), 900, np.uint16))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    with ChipReader() as reader:
        third = reader.read(item, tile, **kw)
    assert not (third.ok and third.array[0, 0, 0] == 900)  # the other CRS is seen: no longer read as-is
