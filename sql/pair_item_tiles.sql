-- Pair street-view points with pre-cut tiles (tile_grid kind `item`: each tile is one raster, at its own size and
-- CRS; tiles may overlap or leave gaps), at their true offset. The xyz/utm grids use sql/pair_points.sql (grid
-- arithmetic); these tiles lie on no grid, so they are found with a spatial join.
--
-- Inputs (prepared by gair_dataset/pairing.py): points(pidx, sv_id, lon, lat, image_uri, heading, captured_at) and
-- tiles(...) (docs/DATA_CONTRACT.md), every tile of grid 'item' with its CRS, bounds and lon/lat bbox checked.
-- $margin: degrees added around each tile's lon/lat bbox for the candidate search (the exact test is in the tile's
-- own CRS).
-- Output: a table tile_keys (one row per tile, tidx = its number in tile_id order) and a VIEW assigned with the same
-- columns as the one of sql/pair_points.sql: one row per (point, tile) where the point lies in the tile, with the
-- point's columns, tidx, tile_id, tile_width, tile_height, split and the offset (x, y). A point inside several
-- overlapping tiles has a row for each; sql/pair_one_tile_per_point.sql keeps the most central one (ties: smallest
-- tile_id), the rule of overlapping UTM zones.
--
-- Method: an R-tree spatial join (DuckDB spatial SPATIAL_JOIN) of the points with the tiles' lon/lat bboxes gives the
-- candidates; each candidate point is then projected into its tile's CRS (EPSG:4326 tiles use lon/lat as they are)
-- and its offset from the tile's top-left corner computed: x = (X - minx) / (maxx - minx), y = (maxy - Y) /
-- (maxy - miny), x east and y down, as for the grids. Half-open rule, as for the grids: a tile owns its west and
-- north edges (0 <= x < 1 and 0 <= y < 1), so a point on an edge shared by two abutting tiles belongs to exactly one;
-- values within 1e-9 tile units of an edge are snapped onto it.

CREATE OR REPLACE TEMP MACRO snap(v) AS CASE WHEN abs(v - round(v)) < 1e-9 THEN round(v) ELSE v END;
CREATE OR REPLACE TEMP TABLE tile_keys AS
SELECT row_number() OVER (ORDER BY tile_id) AS tidx, tile_id, tile_width, tile_height, split, tile_crs,
       tile_minx, tile_miny, tile_maxx, tile_maxy,
       tile_crs IN ('EPSG:4326', 'OGC:CRS84') AS lonlat,
       ST_MakeEnvelope(lon_min - $margin, lat_min - $margin, lon_max + $margin, lat_max + $margin) AS envelope
FROM tiles;
CREATE OR REPLACE TEMP VIEW assigned AS
WITH candidates AS (
    SELECT p.*, t.tidx, t.tile_id, t.tile_width, t.tile_height, t.split, t.tile_minx, t.tile_miny, t.tile_maxx,
           t.tile_maxy,
           CASE WHEN t.lonlat THEN ST_Point(p.lon, p.lat)
                ELSE ST_Transform(ST_Point(p.lon, p.lat), 'EPSG:4326', t.tile_crs, always_xy := true) END AS pt
    FROM points p JOIN tile_keys t ON ST_Intersects(t.envelope, ST_Point(p.lon, p.lat))
),
offsets AS (
    SELECT * EXCLUDE (pt, tile_minx, tile_miny, tile_maxx, tile_maxy),
           snap((ST_X(pt) - tile_minx) / (tile_maxx - tile_minx)) AS x,
           snap((tile_maxy - ST_Y(pt)) / (tile_maxy - tile_miny)) AS y
    FROM candidates
)
SELECT * FROM offsets WHERE x >= 0 AND x < 1 AND y >= 0 AND y < 1;
