"""Earth Search-shaped catalogs end to end: v1 common-name keys, c1-l2a, Landsat, and a v0 API without conformsTo.

The items (``tests/fixtures/earth_search``) point at real pixels: the bands of a SatCLIP Sentinel-2 patch
written as one GeoTIFF per asset (Landsat bands resampled to 30 m), as Earth Search serves them.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling

from gair_dataset.bands import LANDSAT_C2_L2_BANDS, S2_COMMON_NAMES, S2_L2A_ALL_BANDS, S2_L2A_BANDS
from gair_dataset.samples import build_shards_from_pairs, iter_items
from gair_dataset.stac_catalog import (
    SearchParams,
    StacSearchError,
    items_to_geodataframe,
    search_live,
    search_local,
    validate_items,
    write_items,
)
from gair_dataset.tile_grid import GridConfig, SplitConfig, build_tiles
from tests.conftest import shared_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "earth_search"
PATCH = "patch_252161.tif"
BBOX = (19.875, -32.838, 19.900, -32.818)


def write_rasters(folder: Path) -> None:
    """One GeoTIFF per Earth Search asset from the real patch (S2 at 10 m, Landsat at 30 m, SCL, qa_pixel)."""
    with rasterio.open(shared_path("rasters", "s2_l2a_patches", "images", PATCH)) as src:
        prof = {**src.profile, "count": 1, "tiled": False}
        prof.pop("blockxsize", None), prof.pop("blockysize", None)
        data = src.read()
        small = src.read(out_shape=(src.count, src.height // 3, src.width // 3), resampling=Resampling.average)
        t30 = src.transform * rasterio.Affine.scale(src.width / (src.width // 3), src.height / (src.height // 3))
    for i, b in enumerate(S2_L2A_ALL_BANDS):
        with rasterio.open(folder / f"{S2_COMMON_NAMES[b]}.tif", "w", **prof) as dst:
            dst.write(data[i], 1)
    with rasterio.open(folder / "scl.tif", "w", **{**prof, "dtype": "uint8"}) as dst:
        dst.write(np.full(data.shape[1:], 4, np.uint8), 1)  # vegetation everywhere
    ls_prof = {**prof, "width": small.shape[2], "height": small.shape[1], "transform": t30}
    for key, b in zip(LANDSAT_C2_L2_BANDS, ("B02", "B03", "B04", "B8A", "B11", "B12"), strict=True):
        with rasterio.open(folder / f"ls_{key}.tif", "w", **ls_prof) as dst:
            dst.write(small[S2_L2A_ALL_BANDS.index(b)], 1)
    with rasterio.open(folder / "ls_qa_pixel.tif", "w", **ls_prof) as dst:
        dst.write(np.full(small.shape[1:], 21824, np.uint16), 1)  # clear, low confidence everywhere


@pytest.fixture
def es_catalog(tmp_path: Path) -> Path:
    """An ndjson catalog of the Earth Search-shaped items next to their rasters."""
    folder = tmp_path / "es"
    folder.mkdir()
    write_rasters(folder)
    lines = [(FIXTURES / n).read_text() for n in ("s2_l2a_v1_item.json", "s2_c1_l2a_item.json",
                                                 "landsat_c2_l2_item.json")]
    path = folder / "items.ndjson"
    path.write_text("\n".join(json.dumps(json.loads(t)) for t in lines) + "\n")
    return path


def _pairs_from_tiles(tiles, region: str) -> list[dict]:
    """Two street-view points per tile (inside it), with the lund photos as images."""
    photos = sorted(shared_path("streetview", "exif_photos", "lund").glob("*.jpg"))
    pairs = []
    for i, t in enumerate(tiles.to_dict("records")):
        for j, (x, y) in enumerate(((0.25, 0.5), (0.75, 0.25))):
            lon = t["lon_min"] + x * (t["lon_max"] - t["lon_min"])
            lat = t["lat_max"] - y * (t["lat_max"] - t["lat_min"])
            pairs.append({"sv_id": f"sv{i:03d}{j}", "tile_id": t["tile_id"], "lon": lon, "lat": lat, "x": x, "y": y,
                          "col": 0, "row": 0, "split": t["split"], "region": region,
                          "image_uri": str(photos[(2 * i + j) % len(photos)])})
    return pairs


def test_s2_v1_and_landsat_region_builds_shards(es_catalog: Path, tmp_path: Path) -> None:
    params = SearchParams(collections=("sentinel-2-l2a", "sentinel-2-c1-l2a", "landsat-c2-l2"), bbox=BBOX,
                          max_cloud_cover=30)
    found = search_local(es_catalog, params)
    assert {it["collection"] for it in found} == {"sentinel-2-l2a", "sentinel-2-c1-l2a", "landsat-c2-l2"}
    ok, rejects = validate_items(found, check_bands=True)  # what stac_items does: each by its own collection
    assert rejects == [] and len(ok) == 3
    write_items(ok, tmp_path / "stac")
    gdf = items_to_geodataframe(ok)
    assert set(gdf["processing_baseline"].dropna()) == {"05.09"}
    tiles = build_tiles(gdf, BBOX, GridConfig(kind="utm", tile_px=32, resolution=10.0, items_per_tile=3),
                        SplitConfig(block_tiles=1, val_fraction=0.2, test_fraction=0.2, seed=0))
    assert len(tiles) >= 4
    pairs = _pairs_from_tiles(tiles, "es-region")
    items = iter_items(ok)
    report = build_shards_from_pairs(pairs, items, tmp_path / "shards", tiles=tiles, name="es-region",
                                     samples_per_shard=8, fsync=False, chip_workers=2, max_dates=1)
    assert report.n_rejected == 0, report.rejections[:3]
    assert report.n_written == len(pairs)
    import pandas as pd

    manifest = pd.read_parquet(tmp_path / "shards" / "manifest.parquet")
    assert len(manifest) == len(pairs)
    assert report.shards is not None and report.shards.paths


def test_s2_only_items_give_s2_chips_without_double_harmonisation(es_catalog: Path, tmp_path: Path) -> None:
    from gair_dataset.chips import ChipReader, TileSpec

    items = [json.loads(line) for line in es_catalog.read_text().splitlines()]
    for it in items:
        for a in it["assets"].values():
            a["href"] = str(es_catalog.parent / Path(a["href"]).name)
    with rasterio.open(shared_path("rasters", "s2_l2a_patches", "images", PATCH)) as src:
        ref = src.read([S2_L2A_ALL_BANDS.index(b) + 1 for b in S2_L2A_BANDS], window=((8, 40), (8, 40)))
        x0, y1 = src.transform @ (8, 8)
        x1, y0 = src.transform @ (40, 40)
    tile = TileSpec("EPSG:32734", (x0, y0, x1, y1), 32, 32, "t0")
    with ChipReader() as reader:
        for it in items[:2]:  # v1 l2a and c1-l2a: common-name keys, scl, offset already removed
            res = reader.read(it, tile)
            assert res.ok, res.rejected_reason
            assert res.bands == list(S2_L2A_BANDS) and not res.harmonized and res.cloud_fraction == 0.0
            np.testing.assert_array_equal(res.array, ref)
            assert any(s.endswith("scl.tif") for s in res.sources)
        ls = reader.read(items[2], tile)
        assert ls.ok and ls.bands == list(LANDSAT_C2_L2_BANDS) and ls.cloud_fraction == 0.0


# -- a v0-style API without conformsTo, on 127.0.0.1 ------------------------------------------------------
class _V0Api(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, item: dict):
        self.item = item
        super().__init__(("127.0.0.1", 0), _V0Handler)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _V0Handler(BaseHTTPRequestHandler):
    server: _V0Api

    def log_message(self, *args):
        pass

    def _send(self, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        text = (FIXTURES / "v0_landing_page.json").read_text().replace("{root}", self.server.root)
        self._send(json.loads(text))

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send({"type": "FeatureCollection", "features": [self.server.item], "links": []})


@pytest.fixture
def v0_api():
    item = json.loads((FIXTURES / "s2_l2a_cogs_v0_item.json").read_text())
    server = _V0Api(item)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_v0_api_without_conforms_to_is_a_clear_search_error(v0_api: _V0Api) -> None:
    params = SearchParams(collections=("sentinel-s2-l2a-cogs",), bbox=BBOX)
    with pytest.raises(StacSearchError) as ei:
        search_live(v0_api.root, params, max_retries=0)
    msg = str(ei.value)
    assert "ITEM_SEARCH" in msg and "conforms_to" in msg and v0_api.root in msg


def test_v0_api_with_declared_conformance_searches_and_harmonises(v0_api: _V0Api, tmp_path: Path) -> None:
    params = SearchParams(collections=("sentinel-s2-l2a-cogs",), bbox=BBOX, conforms_to=("ITEM_SEARCH",))
    items = search_live(v0_api.root, params, max_retries=0)
    assert [it["id"] for it in items] == ["S2B_34HCH_20210110_0_L2A"]
    ok, rejects = validate_items(items, check_bands=True)
    assert rejects == [] and ok
    from gair_dataset.bands import needs_s2_harmonization, processing_baseline

    assert processing_baseline(ok[0]) == "04.00" and needs_s2_harmonization(ok[0])


def test_unknown_conformance_name_is_a_search_error(v0_api: _V0Api) -> None:
    params = SearchParams(collections=("sentinel-s2-l2a-cogs",), bbox=BBOX, conforms_to=("NO_SUCH_CLASS",))
    with pytest.raises(StacSearchError, match="NO_SUCH_CLASS"):
        search_live(v0_api.root, params, max_retries=0)


def test_fixture_items_are_shaped_like_earth_search() -> None:
    v1 = json.loads((FIXTURES / "s2_l2a_v1_item.json").read_text())
    assert {"blue", "nir08", "swir22", "scl", "visual"} <= set(v1["assets"]) and "B02" not in v1["assets"]
    v0 = json.loads((FIXTURES / "s2_l2a_cogs_v0_item.json").read_text())
    assert {"B02", "B8A", "SCL"} <= set(v0["assets"])
    assert "conformsTo" not in json.loads((FIXTURES / "v0_landing_page.json").read_text())
