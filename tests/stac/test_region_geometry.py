"""Regions given as polygons: config parsing, the STAC search, and the tile grid clipped to the polygon."""

import json

import geopandas as gpd
import pandas as pd
import pytest
from shapely.geometry import Polygon, box, shape

from gair_dataset.geo import check_region_geometry
from gair_dataset.stac_catalog import SearchParams, matches
from gair_dataset.tile_grid import GridConfig, SplitConfig, build_tiles
from pipelines.config import load_regions

# An L-shaped region near Lund: the north-east quarter of its bbox is not part of it.
L_SHAPE = Polygon([(13.10, 55.65), (13.30, 55.65), (13.30, 55.70), (13.20, 55.70), (13.20, 55.75), (13.10, 55.75)])
NOTCH = box(13.20, 55.70, 13.30, 55.75)


def _items():
    return gpd.GeoDataFrame(
        [{"item_id": "item0", "collection": "sentinel-2-l2a", "datetime": pd.Timestamp("2022-01-01", tz="UTC"),
          "cloud_cover": 1.0, "platform": "x", "processing_baseline": "04.00", "epsg": 32633, "synthetic": True,
          "geometry": box(13.0, 55.6, 13.4, 55.8)}], geometry="geometry", crs="EPSG:4326")


@pytest.mark.parametrize("grid", [GridConfig(kind="xyz", zoom=14, tile_px=96),
                                  GridConfig(kind="utm", tile_px=96, resolution=10.0)], ids=["xyz", "utm"])
def test_tiles_are_clipped_to_the_region_polygon(grid):
    by_bbox = build_tiles(_items(), L_SHAPE.bounds, grid, SplitConfig())
    by_polygon = build_tiles(_items(), L_SHAPE, grid, SplitConfig())
    assert set(by_polygon.tile_id) < set(by_bbox.tile_id)
    assert by_polygon.geometry.intersects(L_SHAPE).all()
    # Exactly the tiles that miss the L are dropped: the ones in (or overhanging) its notch.
    dropped = by_bbox[~by_bbox.tile_id.isin(by_polygon.tile_id)]
    assert len(dropped) > 0 and not dropped.geometry.intersects(L_SHAPE).any()
    assert dropped.geometry.intersects(NOTCH).all()


def test_region_geometry_from_file_and_inline(tmp_path):
    (tmp_path / "aoi").mkdir()
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"part": 1}, "geometry": box(9, 50, 9.1, 50.1).__geo_interface__},
        {"type": "Feature", "properties": {"part": 2}, "geometry": box(9.2, 50, 9.3, 50.1).__geo_interface__}]}
    (tmp_path / "aoi" / "two.geojson").write_text(json.dumps(fc))
    (tmp_path / "regions.yaml").write_text(
        "regions:\n"
        "  from-file:\n    geometry: aoi/two.geojson\n    streetview: {kind: table, path: p.csv}\n"
        "  inline:\n    geometry: {type: Polygon, coordinates: [[[1, 48], [2, 48], [2, 49], [1, 48]]]}\n"
        "    streetview: {kind: table, path: p.csv}\n")
    regions = load_regions(tmp_path / "regions.yaml")
    two = regions["from-file"]
    assert two.area().geom_type == "MultiPolygon" and two.bbox == pytest.approx((9, 50, 9.3, 50.1))
    params = two.search_params()
    assert params.bbox is None and shape(params.intersects).equals(two.area())
    # Described as a summary, not the full boundary.
    summary = params.describe()["intersects"]
    assert {k: summary[k] for k in ("type", "vertices", "bounds")} == {"type": "MultiPolygon", "vertices": 10,
                                                                     "bounds": [9.0, 50.0, 9.3, 50.1]}
    assert len(summary["sha256"]) == 12  # tells two polygons with the same bounds apart
    # The search intersects the polygon, not its bbox: an item in the gap between the parts is not found.
    gap = {"type": "Feature", "id": "gap", "geometry": box(9.12, 50.02, 9.18, 50.08).__geo_interface__,
           "properties": {"datetime": "2022-01-01T00:00:00Z"}, "collection": "sentinel-2-l2a", "assets": {}}
    inside = {**gap, "id": "in", "geometry": box(9.05, 50.02, 9.08, 50.08).__geo_interface__}
    assert not matches(gap, params) and matches(inside, params)
    assert regions["inline"].area().equals(Polygon([(1, 48), (2, 48), (2, 49)]))


@pytest.mark.parametrize("region, message", [
    ("    bbox: [9, 50, 10, 51]\n    geometry: {type: Polygon, coordinates: [[[1, 48], [2, 48], [2, 49], [1, 48]]]}\n",
     "exactly one of 'bbox'"),
    ("    geometry: missing.geojson\n", "geometry file not found: .*missing.geojson"),
    ("    geometry: {type: Point, coordinates: [1, 48]}\n", "Polygon or MultiPolygon, got Point"),
    ("    geometry: {type: Polygon, coordinates: [[[1, 48], [200, 48], [2, 49], [1, 48]]]}\n", "out of range"),
    ("    geometry: {type: Polygon, coordinates: [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}\n", "invalid: Self-int"),
    ("    geometry: [1, 2]\n", "GeoJSON object"),
    ("    geometry: {type: Feature, geometry: null, properties: {}}\n", "Feature without a geometry"),
    ("    geometry: {type: FeatureCollection, features: [{type: Feature, properties: {},\n"
     "               geometry: {type: Polygon, coordinates: [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}},\n"
     "               {type: Feature, properties: {}, geometry: {type: Polygon, coordinates: [[[5, 5], [6, 5], [6, 6],\n"
     "               [5, 5]]]}}]}\n", "invalid: Self-int"),
])
def test_bad_region_geometry_is_rejected(tmp_path, region, message):
    (tmp_path / "regions.yaml").write_text(f"regions:\n  x:\n{region}    streetview: {{kind: table, path: p.csv}}\n")
    with pytest.raises(ValueError, match=f"region 'x': .*{message}"):
        load_regions(tmp_path / "regions.yaml")


def test_check_region_geometry_unions_features():
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": box(0, 0, 1, 1).__geo_interface__},
        {"type": "Feature", "geometry": box(1, 0, 2, 1).__geo_interface__}]}
    assert check_region_geometry(fc).equals(box(0, 0, 2, 1))


def test_search_params_by_bbox_unchanged():
    params = SearchParams(collections=("sentinel-2-l2a",), bbox=(9, 50, 10, 51))
    assert params.describe()["intersects"] is None and params.describe()["bbox"] == [9, 50, 10, 51]
