"""Parsing the real STAC items in ../shared/data/stac/items."""

import json

import pytest

from gair_dataset.stac_catalog import (
    SearchParams,
    StacSearchError,
    item_epsg,
    items_to_geodataframe,
    read_items,
    search_local,
    strip_sas_token,
    unsign_item,
    validate_items,
    write_items,
)
from tests.conftest import shared_path

S2_BANDS = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


def _load(name):
    return json.loads(shared_path("stac", "items", name).read_text())


def test_real_sentinel2_items_parse():
    items = _load("stac-geoparquet__sentinel-2-l2a-pc.json")
    ok, rejects = validate_items(items, S2_BANDS)
    assert len(ok) == 4 and rejects == []
    gdf = items_to_geodataframe(ok)
    assert list(gdf["epsg"]) == [item_epsg(it) for it in items]
    assert all(gdf["epsg"].between(32601, 32760))
    assert gdf["processing_baseline"].notna().all()
    assert gdf["cloud_cover"].between(0, 100).all()
    assert gdf.crs.to_epsg() == 4326


def test_proj_code_and_asset_level_projection():
    items = _load("stac-geoparquet__landsat-c2-l2-pc.json")
    assert all(item_epsg(it) is not None for it in items)
    it = json.loads(json.dumps(items[0]))
    props = it["properties"]
    epsg = item_epsg(it)
    props.pop("proj:epsg", None)
    props["proj:code"] = f"EPSG:{epsg}"
    assert item_epsg(it) == epsg


def test_item_without_projection_is_rejected_with_reason():
    items = _load("stac-geoparquet__sentinel-2-l2a-pc.json")
    broken = json.loads(json.dumps(items[0]))
    broken["properties"].pop("proj:epsg", None)
    broken["properties"].pop("proj:code", None)
    for a in broken["assets"].values():
        a.pop("proj:epsg", None)
        a.pop("proj:code", None)
    ok, rejects = validate_items([broken, items[1]], S2_BANDS)
    assert [it["id"] for it in ok] == [items[1]["id"]]
    assert rejects == [{"item_id": broken["id"], "reason": "no projection fields (proj:epsg / proj:code)"}]


def test_missing_band_asset_is_rejected():
    items = _load("stac-geoparquet__sentinel-2-l2a-pc.json")
    broken = json.loads(json.dumps(items[0]))
    del broken["assets"]["B8A"]
    ok, rejects = validate_items([broken], S2_BANDS)
    assert ok == [] and rejects[0]["reason"] == "missing band assets: B8A"


def test_sas_tokens_are_stripped_but_other_query_kept():
    href = ("https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/x/B04_10m.tif"
            "?st=2026-11-26T00%3A00%3A00Z&se=2026-11-28T00%3A00%3A00Z&sp=rl&sv=2024-05-04&sr=c"
            "&skoid=abc&sig=SECRETSIG%3D")
    assert strip_sas_token(href) == "https://sentinel2l2a01.blob.core.windows.net/sentinel2-l2/x/B04_10m.tif"
    keep = "https://planetarycomputer.microsoft.com/api/data/v1/item/map?collection=naip&item=x"
    assert strip_sas_token(keep) == keep
    item = _load("stac-geoparquet__naip-pc.json")[0]
    signed = json.loads(json.dumps(item))
    signed["assets"]["image"]["href"] += "?se=2030-01-01&sig=SECRET"
    assert "sig=" not in json.dumps(unsign_item(signed))


def test_write_items_never_stores_signatures(tmp_path):
    items = _load("stac-geoparquet__naip-pc.json")
    signed = json.loads(json.dumps(items))
    for it in signed:
        it["assets"]["image"]["href"] += "?st=2026&se=2030&sig=SECRET"
    write_items(signed, tmp_path)
    text = (tmp_path / "items.json").read_text()
    assert "SECRET" not in text and "sig=" not in text
    assert [it["id"] for it in read_items(tmp_path)] == [it["id"] for it in items]
    assert not list(tmp_path.glob(".*tmp*"))


def test_local_search_over_real_item_collection():
    path = shared_path("stac", "items", "odc-stac__site2-2020_jun_jul-35MNM.geojson")
    fc = json.loads(path.read_text())
    everything = search_local(path, SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90)))
    assert len(everything) == len(fc["features"]) == 13
    june = search_local(path, SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90),
                                           datetime="2020-06-01/2020-06-30"))
    assert 0 < len(june) < 13
    assert all(it["properties"]["datetime"].startswith("2020-06") for it in june)
    clear = search_local(path, SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90),
                                            max_cloud_cover=5))
    assert all(it["properties"]["eo:cloud_cover"] <= 5 for it in clear)
    nowhere = search_local(path, SearchParams(collections=("sentinel-2-l2a",), bbox=(0, 0, 1, 1)))
    assert nowhere == []


@pytest.mark.parametrize("bbox", [(200, 0, 201, 1), (0, 0, 0, 1), (0, -91, 1, 0), (1, 0, 0, 1)])
def test_invalid_bbox_rejected(bbox):
    with pytest.raises(ValueError):
        SearchParams(collections=("sentinel-2-l2a",), bbox=bbox)


def test_local_catalog_reads_stac_geoparquet(tmp_path):
    """A stac-geoparquet file (written by rustac from the real PC items) searches like the JSON items."""
    import rustac

    items = _load("stac-geoparquet__sentinel-2-l2a-pc.json") + _load("stac-geoparquet__landsat-c2-l2-pc.json")
    as_json = tmp_path / "items.json"
    as_json.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    as_parquet = tmp_path / "items.parquet"
    rustac.write_sync(str(as_parquet), items)
    w, s, e, n = items[0]["bbox"]
    for params in (SearchParams(collections=("sentinel-2-l2a",), bbox=(w, s, e, n)),
                   SearchParams(collections=("sentinel-2-l2a", "landsat-c2-l2"), bbox=(-180, -90, 180, 90),
                                max_cloud_cover=50.0)):
        want, got = search_local(as_json, params), search_local(as_parquet, params)
        assert [it["id"] for it in got] == [it["id"] for it in want] and got
        for g, wnt in zip(got, want, strict=True):
            assert item_epsg(g) == item_epsg(wnt)
            assert g["properties"]["eo:cloud_cover"] == wnt["properties"]["eo:cloud_cover"]
            assert {k: a["href"] for k, a in g["assets"].items()} == {k: a["href"] for k, a in wnt["assets"].items()}
            assert "?" not in g["assets"]["B04" if "B04" in g["assets"] else "red"]["href"]  # stored unsigned


def test_corrupt_stac_geoparquet_is_a_clear_error(tmp_path):
    bad = tmp_path / "items.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(StacSearchError, match="not a readable stac-geoparquet"):
        search_local(bad, SearchParams(collections=("sentinel-2-l2a",), bbox=(0, 0, 1, 1)))
