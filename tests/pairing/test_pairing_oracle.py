"""DuckDB pairing (grid arithmetic + exact check) against a geopandas sjoin oracle; the slim pairs schema."""

import hashlib
import tempfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box

from gair_dataset.geo import transformer, xyz_tile_lonlat_bounds, xyz_tile_of
from gair_dataset.pairing import PAIRS_COLUMNS, assign_points, connect, pair_points
from gair_dataset.tile_grid import GridConfig, SplitConfig, build_tiles


def _items(*footprints):
    rows = [{"item_id": f"item{i}", "collection": "sentinel-2-l2a", "datetime": pd.Timestamp("2022-01-01", tz="UTC"),
             "cloud_cover": 5.0 * i, "platform": "x", "processing_baseline": "04.00", "epsg": epsg,
             "synthetic": True, "geometry": fp} for i, (fp, epsg) in enumerate(footprints)]
    return gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")


def _points(lon, lat):
    n = len(lon)
    return pd.DataFrame({"sv_id": [f"p{i:06d}" for i in range(n)], "lon": lon, "lat": lat,
                         "image_uri": [f"/img/p{i}.jpg" for i in range(n)], "heading": np.nan, "captured_at": None})


def _oracle(points: pd.DataFrame, tiles: gpd.GeoDataFrame) -> pd.DataFrame:
    """sjoin(intersects) in each grid's CRS, then the half-open rule, then the most central tile."""
    out = []
    for crs, t in tiles.groupby("tile_crs"):
        if crs == "EPSG:3857":  # XYZ tiles are exact rectangles in lon/lat
            polys = [box(r.lon_min, r.lat_min, r.lon_max, r.lat_max) for r in t.itertuples()]
            pts = gpd.GeoDataFrame(points, geometry=gpd.points_from_xy(points.lon, points.lat), crs="EPSG:4326")
            tg = gpd.GeoDataFrame(t.drop(columns="geometry"), geometry=polys, crs="EPSG:4326")
            j = gpd.sjoin(pts, tg, predicate="intersects")
            j = j.assign(west=j.lon_min, north=j.lat_max)
            merc = transformer(4326, 3857)
            px, py = merc.transform(j.lon.to_numpy(), j.lat.to_numpy())
        else:
            polys = [box(r.tile_minx, r.tile_miny, r.tile_maxx, r.tile_maxy) for r in t.itertuples()]
            px_all, py_all = transformer(4326, crs).transform(points.lon.to_numpy(), points.lat.to_numpy())
            pts = gpd.GeoDataFrame(points, geometry=gpd.points_from_xy(px_all, py_all), crs=crs)
            tg = gpd.GeoDataFrame(t.drop(columns="geometry"), geometry=polys, crs=crs)
            j = gpd.sjoin(pts, tg, predicate="intersects")
            j = j.assign(west=j.tile_minx, north=j.tile_maxy)
            px, py = j.geometry.x.to_numpy(), j.geometry.y.to_numpy()
        j = j.assign(x=(px - j.tile_minx) / (j.tile_maxx - j.tile_minx),
                     y=(j.tile_maxy - py) / (j.tile_maxy - j.tile_miny))
        # Half-open: a tile owns its west and north edges -> most eastern candidate, then most southern.
        j = j.sort_values(["sv_id", "west", "north"], ascending=[True, False, True]).drop_duplicates("sv_id")
        out.append(j[["sv_id", "tile_id", "x", "y"]])
    allc = pd.concat(out)
    allc["centrality"] = (allc.x - 0.5).abs() + (allc.y - 0.5).abs()
    return (allc.sort_values(["sv_id", "centrality", "tile_id"]).drop_duplicates("sv_id")
            .sort_values("sv_id").reset_index(drop=True))


def _run(tmp_path, points, tiles, **kw):
    points.to_parquet(tmp_path / "points.parquet")
    tiles.to_parquet(tmp_path / "tiles.parquet")
    res = pair_points(tmp_path / "points.parquet", tmp_path / "tiles.parquet", tmp_path / "pairs.parquet",
                      unpaired_path=tmp_path / "unpaired.parquet", **kw)
    got = gpd.read_parquet(tmp_path / "pairs.parquet")
    # Slim: the point's columns, tile_id, the offset, split, region and geometry; no tile attribute is repeated.
    assert tuple(got.columns) == PAIRS_COLUMNS
    assert got.crs == "OGC:CRS84" and (got.geometry.x == got.lon).all() and (got.geometry.y == got.lat).all()
    return res, got.sort_values("sv_id").reset_index(drop=True)


def _check_unpaired(unpaired: pd.DataFrame, points: pd.DataFrame, paired: pd.DataFrame) -> None:
    """unpaired.parquet: exactly the points the oracle pairs with no tile, with the points' columns, in input order."""
    want = points[~points.sv_id.isin(paired.sv_id)].reset_index(drop=True)
    assert list(unpaired.columns) == list(points.columns) and unpaired.captured_at.isna().all()  # all-null here
    pd.testing.assert_frame_equal(unpaired.drop(columns="captured_at"), want.drop(columns="captured_at"))


def _with_tiles(pairs: pd.DataFrame, tiles: pd.DataFrame) -> pd.DataFrame:
    """The pairs joined with their tile's attributes by tile_id (every pair has its tile)."""
    joined = pairs.merge(pd.DataFrame(tiles.drop(columns="geometry")), on="tile_id", how="left",
                         suffixes=("", "_tile"), validate="many_to_one")
    assert joined["tile_crs"].notna().all()
    assert (joined["split"] == joined["split_tile"]).all()  # the pair's split is its tile's
    return joined


def _compare(got, want):
    assert got["sv_id"].tolist() == want["sv_id"].tolist()
    assert (got["tile_id"].to_numpy() == want["tile_id"].to_numpy()).all()
    np.testing.assert_allclose(got["x"], want["x"].clip(lower=0), atol=1e-7)
    np.testing.assert_allclose(got["y"], want["y"].clip(lower=0), atol=1e-7)


def test_xyz_random_edges_corners_outside(tmp_path):
    zoom = 14
    region = (13.10, 55.65, 13.30, 55.75)
    items = _items((box(13.0, 55.6, 13.4, 55.8), 32633))
    tiles = build_tiles(items, region, GridConfig(kind="xyz", zoom=zoom, tile_px=96), SplitConfig(block_tiles=2))
    # Holes: drop a few tiles (no item covers them) -> points there are outside every tile.
    holes = tiles.tile_id.iloc[[3, 10, 17]].tolist()
    tiles = tiles[~tiles.tile_id.isin(holes)].reset_index(drop=True)
    rng = np.random.default_rng(0)
    lon = list(rng.uniform(13.05, 13.35, 3000))
    lat = list(rng.uniform(55.62, 55.78, 3000))
    # Exactly on shared edges and corners of interior tiles.
    for r in tiles.itertuples():
        lon += [r.lon_min, r.lon_min, (r.lon_min + r.lon_max) / 2]
        lat += [r.lat_max, (r.lat_min + r.lat_max) / 2, r.lat_max]
    # Far outside.
    lon += [0.0 + 1e-3, -120.0, 13.2]
    lat += [45.0, 40.0, -10.0]
    pts = _points(np.array(lon), np.array(lat))
    res, got = _run(tmp_path, pts, tiles)
    want = _oracle(pts, tiles)
    _compare(got, want)
    assert res.outside == len(pts) - len(want) > 0
    assert got["sv_id"].is_unique
    # Edge/corner points: each went to the tile that owns that edge (its west / north edge).
    tx, ty = xyz_tile_of(got.lon.to_numpy(), got.lat.to_numpy(), zoom)
    assert (got.tile_id == [f"z{zoom}-{a}-{b}" for a, b in zip(tx, ty, strict=True)]).all()
    unpaired = pd.read_parquet(tmp_path / "unpaired.parquet")
    assert len(unpaired) == res.outside and not set(unpaired.sv_id) & set(got.sv_id)
    _check_unpaired(unpaired, pts, want)  # holes (a cell without a tile) and far outside the grid's extent
    assert assign_points(tmp_path / "points.parquet", tmp_path / "tiles.parquet") == res.paired
    # Joined with the tile table by tile_id: every point lies in its tile's bbox; pixels from the tile's size.
    joined = _with_tiles(got, tiles)
    assert joined.lon.between(joined.lon_min, joined.lon_max).all() and joined.lat.between(joined.lat_min,
                                                                                           joined.lat_max).all()
    assert (joined["col"] == np.minimum(np.floor(joined.x * joined.tile_width), joined.tile_width - 1)).all()
    assert (joined["row"] == np.minimum(np.floor(joined.y * joined.tile_height), joined.tile_height - 1)).all()


def test_pixel_and_bbox_fields(tmp_path):
    items = _items((box(13.0, 55.6, 13.4, 55.8), 32633))
    tiles = build_tiles(items, (13.15, 55.68, 13.2, 55.7), GridConfig(kind="xyz", zoom=14, tile_px=96), SplitConfig())
    tx, ty = (int(v) for v in tiles.tile_id.iloc[0].split("-")[1:])
    lon0, lat0, lon1, lat1 = xyz_tile_lonlat_bounds(tx, ty, 14)
    pts = _points(np.array([lon0, lon0 + (lon1 - lon0) * 0.25]), np.array([lat1, lat1 - (lat1 - lat0) * 0.5]))
    _, got = _run(tmp_path, pts, tiles, region="lund")
    assert got.tile_id.tolist() == [f"z14-{tx}-{ty}"] * 2 and got.region.tolist() == ["lund"] * 2
    first, second = _with_tiles(got, tiles).iloc[0], _with_tiles(got, tiles).iloc[1]
    assert (first.x, first.y, first.col, first.row) == (0.0, 0.0, 0, 0)  # the tile's own NW corner
    assert second.col == 24 and abs(second.x - 0.25) < 1e-12 and 0.45 < second.y < 0.55
    assert [first.lon_min, first.lat_max, first.lon_max, first.lat_min] == pytest.approx([lon0, lat1, lon1, lat0])


def test_two_utm_zones_each_point_once(tmp_path):
    # Items on both sides of the 12E zone boundary, overlapping between 11.8E and 12.2E.
    west = box(11.5, 49.9, 12.2, 50.1)
    east = box(11.8, 49.9, 12.5, 50.1)
    items = _items((west, 32632), (east, 32633))
    tiles = build_tiles(items, (11.5, 49.9, 12.5, 50.1), GridConfig(kind="utm", tile_px=96, resolution=10.0),
                        SplitConfig(block_tiles=4))
    assert set(tiles.tile_crs) == {"EPSG:32632", "EPSG:32633"}
    rng = np.random.default_rng(1)
    pts = _points(rng.uniform(11.45, 12.55, 4000), rng.uniform(49.88, 50.12, 4000))
    res, got = _run(tmp_path, pts, tiles)
    want = _oracle(pts, tiles)
    _compare(got, want)
    assert got.sv_id.is_unique
    overlap = _with_tiles(got, tiles)
    overlap = overlap[(overlap.lon > 11.85) & (overlap.lon < 12.15)]
    assert set(overlap.tile_crs) == {"EPSG:32632", "EPSG:32633"}  # the most central tile wins, either zone
    assert res.paired + res.outside == len(pts)
    _check_unpaired(pd.read_parquet(tmp_path / "unpaired.parquet"), pts, want)  # the several-grid path
    # The assignment alone (what the benchmark times) takes the same multi-grid path.
    con = connect()
    assert assign_points(tmp_path / "points.parquet", tmp_path / "tiles.parquet", con=con) == res.paired
    assigned = con.execute("SELECT count(DISTINCT pidx), count(*) FROM assigned_rows").fetchone()
    assert assigned == (res.paired, res.paired)


def test_cap_points_per_tile_is_deterministic(tmp_path):
    items = _items((box(13.0, 55.6, 13.4, 55.8), 32633))
    tiles = build_tiles(items, (13.1, 55.65, 13.3, 55.75), GridConfig(kind="xyz", zoom=14, tile_px=96), SplitConfig())
    rng = np.random.default_rng(2)
    pts = _points(rng.uniform(13.1, 13.3, 2000), rng.uniform(55.65, 55.75, 2000))
    res1, a = _run(tmp_path, pts, tiles, max_points_per_tile=5)
    _, b = _run(tmp_path, pts, tiles, max_points_per_tile=5)
    assert a.groupby("tile_id").size().max() == 5
    assert a.sv_id.tolist() == b.sv_id.tolist()
    assert res1.capped > 0 and res1.paired + res1.capped + res1.outside == len(pts)
    # A capped point lies inside a tile: it is not listed as unpaired.
    unpaired = pd.read_parquet(tmp_path / "unpaired.parquet")
    assert len(unpaired) == res1.outside
    capped = set(pts.sv_id) - set(a.sv_id) - set(unpaired.sv_id)
    assert len(capped) == res1.capped


def test_rows_ordered_by_tile_then_input_and_reruns_identical(tmp_path):
    # Enough points for many DuckDB chunks on several threads: row order must not depend on scheduling.
    items = _items((box(13.0, 55.6, 13.4, 55.8), 32633))
    tiles = build_tiles(items, (13.1, 55.65, 13.3, 55.75), GridConfig(kind="xyz", zoom=14, tile_px=96), SplitConfig())
    rng = np.random.default_rng(3)
    pts = _points(rng.uniform(13.08, 13.32, 200_000), rng.uniform(55.64, 55.76, 200_000))
    pts.to_parquet(tmp_path / "points.parquet")
    tiles.to_parquet(tmp_path / "tiles.parquet")
    digests = []
    for run in range(2):
        out = tmp_path / f"pairs{run}.parquet"
        pair_points(tmp_path / "points.parquet", tmp_path / "tiles.parquet", out, con=connect(threads=2))
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    got = pd.read_parquet(tmp_path / "pairs0.parquet", columns=["sv_id", "tile_id"])
    assert got.tile_id.is_monotonic_increasing
    assert all(g.sv_id.is_monotonic_increasing for _, g in got.groupby("tile_id"))  # sv_id = input order here
    want = _oracle(pts, tiles)
    assert sorted(got.sv_id) == want.sv_id.tolist()


def test_tile_off_its_grid_is_refused(tmp_path):
    items = _items((box(13.0, 55.6, 13.4, 55.8), 32633))
    tiles = build_tiles(items, (13.15, 55.68, 13.25, 55.72), GridConfig(kind="xyz", zoom=14, tile_px=96), SplitConfig())
    bad = tiles.tile_id.iloc[1]
    tiles.loc[tiles.tile_id == bad, ["tile_minx", "tile_maxx"]] += 10.0  # 10 m east of its cell
    pts = _points(np.array([13.2]), np.array([55.7]))
    with pytest.raises(ValueError, match=f"1 tile.*not lie on a regular grid.*{bad}"):
        _run(tmp_path, pts, tiles)
    assert not (tmp_path / "pairs.parquet").exists()


def test_tile_with_a_missing_bound_or_sharing_a_cell_is_refused(tmp_path):
    items = _items((box(13.0, 55.6, 13.4, 55.8), 32633))
    tiles = build_tiles(items, (13.15, 55.68, 13.25, 55.72), GridConfig(kind="xyz", zoom=14, tile_px=96), SplitConfig())
    pts = _points(np.array([13.2]), np.array([55.7]))
    for column in ("tile_maxx", "tile_miny", "tile_minx"):  # greatest() would skip a NULL: must still be refused
        broken = tiles.copy()
        broken.loc[1, column] = None
        with pytest.raises(ValueError, match=f"{broken.tile_id.iloc[1]} \\(a bound is missing\\)"):
            _run(tmp_path, pts, broken)
    twin = pd.concat([tiles, tiles.iloc[[2]].assign(tile_id="twin")], ignore_index=True)
    with pytest.raises(ValueError, match=f"1 grid cell.*more than one tile.*twin, {tiles.tile_id.iloc[2]}"):
        _run(tmp_path, pts, twin)
    assert not (tmp_path / "pairs.parquet").exists()


def test_spill_folder_is_per_process_not_the_working_directory():
    setting = connect().execute("SELECT current_setting('temp_directory')").fetchone()[0]
    assert Path(setting).parent == Path(tempfile.gettempdir()) and setting != ".tmp"


def test_spatial_extension_loads_offline():
    con = connect()
    assert con.execute("SELECT ST_AsText(ST_Point(1, 2))").fetchone()[0] == "POINT (1 2)"
    x, y = con.execute("SELECT ST_X(p), ST_Y(p) FROM (SELECT ST_Transform(ST_Point(13.19, 55.7), 'EPSG:4326', "
                       "'EPSG:32633', always_xy := true) AS p)").fetchone()
    ex, ey = transformer(4326, 32633).transform(13.19, 55.7)
    assert abs(x - ex) < 1e-3 and abs(y - ey) < 1e-3
