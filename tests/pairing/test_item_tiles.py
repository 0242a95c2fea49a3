"""Pre-cut tiles (tile_grid kind ``item``): a folder of real EPSG:4326 GeoTIFF tiles as the catalog, one tile per
item, points paired by the spatial join at hand-computed offsets, and the wrong inputs refused with a reason."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio

from gair_dataset.item_tiles import item_grid, item_tile_id
from gair_dataset.local_tiles import FolderCatalog, band_names, search_folder
from gair_dataset.pairing import PAIRS_COLUMNS, assign_points, pair_points
from gair_dataset.stac_catalog import SearchParams, StacSearchError, items_to_geodataframe
from gair_dataset.tile_grid import GridConfig, SplitConfig, build_tiles
from tests.pairing.item_tile_fixtures import PX, SIDE, write_tiles


def _params(bounds: dict, **kw) -> SearchParams:
    west = min(b[0] for b in bounds.values()) - 0.01
    south = min(b[1] for b in bounds.values()) - 0.01
    east = max(b[2] for b in bounds.values()) + 0.01
    north = max(b[3] for b in bounds.values()) + 0.01
    return SearchParams(collections=("sentinel-2-l2a",), bbox=(west, south, east, north), **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiles")
    return path, write_tiles(path)


@pytest.fixture(scope="module")
def tiles(folder):
    path, bounds = folder
    items = search_folder(FolderCatalog(path), _params(bounds, datetime="2023-01-01/2023-12-31",
                                                       max_cloud_cover=30))
    gdf = items_to_geodataframe(items)
    tiles = build_tiles(gdf, _params(bounds).area(), GridConfig(kind="item", tile_px=96), SplitConfig(block_tiles=2),
                        item_dicts=items)
    return items, tiles


def test_folder_catalog_makes_one_item_per_geotiff(folder, tiles):
    path, bounds = folder
    items, _ = tiles
    assert sorted(it["id"] for it in items) == sorted(bounds)
    it = next(i for i in items if i["id"] == "s2tile_a_20230601")
    assert it["collection"] == "sentinel-2-l2a"  # the search's one collection
    assert it["properties"]["datetime"] == "2023-06-01T00:00:00Z"  # from the file name
    props = it["properties"]
    assert props.get("proj:code", "EPSG:4326") == "EPSG:4326" and props.get("proj:epsg", 4326) == 4326
    assert it["properties"]["proj:shape"] == [PX, PX]
    asset = it["assets"]["data"]
    assert asset["href"] == str((path / "s2tile_a_20230601.tif").resolve())
    # 12 bands, named after the collection's band list by count (the files' descriptions are not band names).
    assert [b["name"] for b in asset["eo:bands"]][:3] == ["B01", "B02", "B03"] and len(asset["eo:bands"]) == 12
    assert asset["eo:bands"][1]["common_name"] == "blue" and asset["raster:bands"][0]["data_type"] == "uint16"
    # The datetime filter applies like a STAC API's.
    assert search_folder(FolderCatalog(path), _params(bounds, datetime="2024-01-01/2024-12-31")) == []


def test_item_tiles_are_the_rasters(folder, tiles):
    path, bounds = folder
    _, t = tiles
    assert list(t.tile_id) == sorted(bounds)
    assert set(t.grid) == {"item"} and set(t.tile_crs) == {"EPSG:4326"} and set(t.n_items) == {1}
    assert (t.tile_width == PX).all() and (t.tile_height == PX).all()  # the raster's size, not tile_px
    for row in t.itertuples():
        with rasterio.open(path / f"{row.tile_id}.tif") as ds:
            assert (row.tile_minx, row.tile_miny, row.tile_maxx, row.tile_maxy) == tuple(ds.bounds)
        assert (row.lon_min, row.lat_min, row.lon_max, row.lat_max) == bounds[row.tile_id]
        assert list(row.item_ids) == [row.tile_id]
    assert set(t.split) <= {"train", "val", "test"}


def _points(bounds):
    lon0, lat0 = bounds["s2tile_a_20230601"][0], bounds["s2tile_a_20230601"][3]

    def at(dx, dy):  # in tile sides east / south of tile a's north-west corner
        return lon0 + dx * SIDE, lat0 - dy * SIDE

    spots = {
        "in_a": at(0.25, 0.5),        # a: x 0.25, y 0.5
        "edge_ab": at(1.0, 0.25),     # on the a|b edge: b owns its west edge -> b, x 0, y 0.25
        "north_edge_a": at(0.375, 0.0),  # a owns its north edge -> a, y 0
        "edge_ac": at(0.25, 1.0),     # on the a/c edge: c owns its north edge -> c, x 0.25, y 0
        "overlap_ae": at(0.875, 0.875),  # in a (x 0.875, y 0.875) and e (x 0.375, y 0.375): e is more central
        "tie_be": at(1.25, 0.75),     # b (0.25, 0.75) and e (0.75, 0.25) equally central: smallest tile_id (b)
        "in_d": at(1.75, 1.5),        # d: x 0.75, y 0.5 (outside e, which ends at 1.5)
        "east_edge_d": at(2.0, 1.25),  # d's east edge: no tile owns it -> unpaired
        "outside": at(5.0, 5.0),      # outside every tile -> unpaired
    }
    names = list(spots)
    return pd.DataFrame({"sv_id": names, "lon": [spots[n][0] for n in names], "lat": [spots[n][1] for n in names],
                         "image_uri": [f"/img/{n}.jpg" for n in names], "heading": np.nan, "captured_at": None})


EXPECTED = {  # sv_id -> (tile, x, y), hand-computed above
    "in_a": ("a", 0.25, 0.5), "edge_ab": ("b", 0.0, 0.25), "north_edge_a": ("a", 0.375, 0.0),
    "edge_ac": ("c", 0.25, 0.0), "overlap_ae": ("e", 0.375, 0.375), "tie_be": ("b", 0.25, 0.75),
    "in_d": ("d", 0.75, 0.5),
}


def test_pairs_points_at_hand_computed_offsets(tmp_path, folder, tiles):
    _, bounds = folder
    _, t = tiles
    points = _points(bounds)
    points.to_parquet(tmp_path / "points.parquet")
    t.to_parquet(tmp_path / "tiles.parquet")
    res = pair_points(tmp_path / "points.parquet", tmp_path / "tiles.parquet", tmp_path / "pairs.parquet",
                      unpaired_path=tmp_path / "unpaired.parquet", region="r")
    got = gpd.read_parquet(tmp_path / "pairs.parquet")
    assert tuple(got.columns) == PAIRS_COLUMNS
    assert {r.sv_id: (r.tile_id, r.x, r.y) for r in got.itertuples()} == {
        k: (f"s2tile_{tile}_20230601", x, y) for k, (tile, x, y) in EXPECTED.items()}
    assert list(got.col) == [min(int(x * PX), PX - 1) for x in got.x]
    assert list(got.row) == [min(int(y * PX), PX - 1) for y in got.y]
    # Ordered by tile, then by the order of the points file.
    order = got.merge(points.reset_index()[["sv_id", "index"]], on="sv_id")
    assert list(zip(order.tile_id, order["index"], strict=True)) == sorted(zip(order.tile_id, order["index"],
                                                                                   strict=True))
    unpaired = pd.read_parquet(tmp_path / "unpaired.parquet")
    assert list(unpaired.sv_id) == ["east_edge_d", "outside"]
    assert (res.points, res.paired, res.outside, res.capped) == (9, 7, 2, 0)
    assert assign_points(tmp_path / "points.parquet", tmp_path / "tiles.parquet") == 7
    # The same inputs write the same file.
    pair_points(tmp_path / "points.parquet", tmp_path / "tiles.parquet", tmp_path / "again.parquet", region="r")
    assert (tmp_path / "again.parquet").read_bytes() == (tmp_path / "pairs.parquet").read_bytes()


def test_pairing_projects_points_into_a_utm_item_tile(tmp_path, shared_data):
    """An item tile in its own UTM CRS (the real patch itself): offsets from the point projected into that CRS."""
    from pyproj import Transformer

    patch = shared_data / "rasters" / "s2_l2a_patches" / "images" / "patch_252161.tif"
    # The patches' names hold no date and the files no date tag: they need the datetime setting.
    with pytest.raises(StacSearchError, match=r"patch_.*tif: no datetime: set the catalog's datetime"):
        search_folder(FolderCatalog(patch.parent, datetime=None),
                      SearchParams(collections=("sentinel-2-l2a",), bbox=(19.8, -32.9, 19.95, -32.75)))
    search = SearchParams(collections=("sentinel-2-l2a",), bbox=(19.8, -32.9, 19.95, -32.75))
    items = [it for it in search_folder(FolderCatalog(patch.parent, datetime="2022-03-01"), search)
             if it["id"] == "patch_252161"]
    t = build_tiles(items_to_geodataframe(items), (19.8, -32.9, 19.95, -32.75), GridConfig(kind="item"),
                    SplitConfig(), item_dicts=items)
    with rasterio.open(patch) as ds:
        crs, (x0, y0, x1, y1) = ds.crs, ds.bounds
    assert t.tile_crs[0] == f"EPSG:{crs.to_epsg()}" and (t.tile_width[0], t.tile_height[0]) == (256, 256)
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = to_ll.transform(x0 + 0.3 * (x1 - x0), y1 - 0.6 * (y1 - y0))
    pts = pd.DataFrame({"sv_id": ["p"], "lon": [lon], "lat": [lat], "image_uri": ["/i.jpg"], "heading": [np.nan],
                        "captured_at": [None]})
    pts.to_parquet(tmp_path / "p.parquet")
    t.to_parquet(tmp_path / "t.parquet")
    pair_points(tmp_path / "p.parquet", tmp_path / "t.parquet", tmp_path / "pairs.parquet")
    got = pd.read_parquet(tmp_path / "pairs.parquet")
    assert got.x[0] == pytest.approx(0.3, abs=1e-6) and got.y[0] == pytest.approx(0.6, abs=1e-6)
    assert (got.col[0], got.row[0]) == (76, 153)


def test_duplicate_item_id_is_refused_by_name(folder):
    path, bounds = folder
    items = search_folder(FolderCatalog(path), _params(bounds))
    twice = items_to_geodataframe([*items, items[0]])
    for kind in ("item", "xyz", "utm"):
        with pytest.raises(ValueError, match=r"1 item id\(s\) appear more than once .*'s2tile_a_20230601' \(2x\)"):
            build_tiles(twice, _params(bounds).area(), GridConfig(kind=kind), SplitConfig(),
                        item_dicts=[*items, items[0]])


def test_two_files_of_one_name_are_refused(tmp_path, folder):
    path, bounds = folder
    for sub in ("one", "two"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "s2tile_a_20230601.tif").write_bytes((path / "s2tile_a_20230601.tif").read_bytes())
    with pytest.raises(StacSearchError, match="two GeoTIFFs give the item id 's2tile_a_20230601'"):
        search_folder(FolderCatalog(tmp_path), _params(bounds))


def test_utm_grid_on_epsg4326_items_says_why(folder):
    path, bounds = folder
    items = search_folder(FolderCatalog(path), _params(bounds))
    with pytest.raises(ValueError, match=r"kind 'utm' cuts tiles in each item's UTM zone, but 5 of 5 items are "
                                         r"not in a UTM CRS: s2tile_a_20230601 \(EPSG:4326\).*"
                                         r"use tile_grid: \{kind: item\}"):
        build_tiles(items_to_geodataframe(items), _params(bounds).area(), GridConfig(kind="utm"), SplitConfig())


def test_item_grid_needs_item_json_and_a_north_up_grid():
    with pytest.raises(ValueError, match="needs the items' STAC JSON"):
        build_tiles(items_to_geodataframe([_item("x")]), (0, 0, 1, 1), GridConfig(kind="item"), SplitConfig())
    rotated = _item("r", transform=[0.1, 0.01, 0, 0, -0.1, 1])
    with pytest.raises(ValueError, match="item r: its raster is rotated"):
        item_grid(rotated)
    assert item_grid(_item("ok")).bounds == (0.0, 0.0, 1.0, 1.0)
    assert item_tile_id("S2A_MSIL2A.20230601 tile/7") == "S2A_MSIL2A_20230601_tile_7"
    assert band_names(3, ["x", None, "z"], "sentinel-2-l2a") == ["b1", "b2", "b3"]
    assert band_names(4, [None] * 4, "naip") == ["R", "G", "B", "NIR"]
    with pytest.raises(ValueError, match="2 band names given"):
        band_names(3, [], "x", ["a", "b"])


def _item(item_id, transform=(0.1, 0, 0, 0, -0.1, 1)):
    return {"id": item_id, "type": "Feature", "collection": "c",
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]},
            "properties": {"datetime": "2023-01-01T00:00:00Z", "proj:code": "EPSG:4326", "proj:shape": [10, 10],
                           "proj:transform": list(transform)}, "assets": {}}


def test_tile_grid_asset_refuses_a_duplicate_item_id_and_writes_nothing(tmp_path, folder):
    """The tile_grid asset on an items table listing one item twice: the reason, and no tiles file (nor a temp)."""
    import dagster as dg

    from pipelines.common.storage import DataRoot
    from pipelines.defs.stac.assets import tile_grid

    path, bounds = folder
    items = search_folder(FolderCatalog(path), _params(bounds))
    root = DataRoot(root=str(tmp_path / "data"))
    stac_dir = root.stage_dir("stac", "sample-lund")
    items_to_geodataframe([*items, items[0]]).to_parquet(stac_dir / "items.parquet")
    with pytest.raises(Exception, match=r"item id\(s\) appear more than once .*'s2tile_a_20230601' \(2x\)"):
        dg.materialize([tile_grid], partition_key="sample-lund", resources={"data_root": root})
    tiles_dir = tmp_path / "data" / "tiles" / "sample-lund"
    assert not tiles_dir.exists() or list(tiles_dir.iterdir()) == []


def test_a_whole_scene_as_an_item_tile_is_refused_with_the_way_out(folder):
    from gair_dataset.item_tiles import item_tile_rows

    path, bounds = folder
    items = search_folder(FolderCatalog(path), _params(bounds))
    gdf = items_to_geodataframe(items)
    scene = {**items[0], "properties": {**items[0]["properties"], "proj:shape": [10980, 10980]}}
    dicts = {str(d["id"]): d for d in items} | {str(scene["id"]): scene}
    if "proj:transform" not in scene["properties"]:
        pytest.skip("folder items carry no proj:transform")
    with pytest.raises(ValueError, match=rf"item {scene['id']}: its raster is 10980x10980 px.*use tile_grid kind utm"):
        item_tile_rows(gdf, dicts, _params(bounds).area(), 1)
    assert item_tile_rows(gdf, {str(d["id"]): d for d in items}, _params(bounds).area(), 1)  # the real tiles pass
