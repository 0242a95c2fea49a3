-- Pair street-view points with the tile that contains them, at their true offset.
--
-- Inputs (prepared by gair_dataset/pairing.py):
--   points(pidx, sv_id, lon, lat, image_uri, heading, captured_at)   validated SV points; pidx = row number
--   tiles(...)  the tile grid (docs/DATA_CONTRACT.md): only tiles covered by an item
--   grids(grid_id, grid, tile_crs, origin_x, origin_y, size, lon_min, lat_min, lon_max, lat_max)
--         one row per regular grid present in `tiles` (an XYZ zoom, or one UTM zone), with its extent
-- Output: a table tile_keys (one row per tile, tidx = its number), a VIEW point_cells (each point's cell in each
-- grid, below) and a VIEW assigned: one row per (point, tile) where the point lies in the tile, with the point's
-- columns, the few tile columns the pairs table needs (tidx, tile_id, tile_width, tile_height, split) and the
-- offset (x, y). The other tile attributes stay in tiles.parquet (joined by tile_id where needed). They are
-- views: nothing of the size of the points is materialised here; sql/pair_output.sql streams `assigned` into the
-- sort that writes the pairs file, and the unpaired list reads the points once more.
-- With one grid a point has at most one row; with several (overlapping UTM zones) it can have one per grid,
-- and sql/pair_one_tile_per_point.sql keeps one.
--
-- Method: grid arithmetic; no spatial join. In the grid's CRS (Web-Mercator for XYZ, the UTM zone otherwise)
-- the point's tile coordinates are fx = (X - origin_x) / size and fy = (origin_y - Y) / size; the tile is
-- (floor(fx), floor(fy)) and the offset inside it (x, y) = (fx - floor(fx), fy - floor(fy)).
-- Half-open rule: a tile owns its west and north edges (0 <= x < 1 and 0 <= y < 1 from its top-left
-- corner), so a point on a shared edge or corner belongs to exactly one tile. Values within 1e-9 tile units
-- of a grid line are snapped onto it, so float round-off cannot push an edge point across.
-- The exact check is made once per tile, not per point: tile_keys.off_grid is how far (in tile units) a tile's
-- stored bounds lie from its grid cell (NULL when a bound is missing), and gair_dataset/pairing.py refuses
-- tiles off their grid and two tiles on one cell. A point whose cell is a tile therefore lies inside that
-- tile's stored bounds.

CREATE OR REPLACE TEMP MACRO snap(v) AS CASE WHEN abs(v - round(v)) < 1e-9 THEN round(v) ELSE v END;
-- One BIGINT per (grid, column, row): tile indices up to +-2^24 per axis (XYZ zoom <= 23, UTM tiles >= 1 m).
CREATE OR REPLACE TEMP MACRO tile_key(g, ix, iy) AS g * 1125899906842624 + (ix + 16777216) * 33554432 + (iy + 16777216);
CREATE OR REPLACE TEMP TABLE tile_keys AS
SELECT row_number() OVER (ORDER BY tile_id) AS tidx, tile_key(grid_id, ix, iy) AS k,
       -- greatest() skips NULLs: a missing bound must make the whole deviation NULL (refused), not smaller.
       CASE WHEN fx0 IS NULL OR fy0 IS NULL OR w IS NULL OR h IS NULL THEN NULL
            ELSE greatest(abs(fx0 - ix), abs(fy0 - iy), abs(w - 1), abs(h - 1)) END AS off_grid,
       tile_id, tile_width, tile_height, split
FROM (
    SELECT *, CAST(round(fx0) AS BIGINT) AS ix, CAST(round(fy0) AS BIGINT) AS iy
    FROM (
        SELECT t.*, g.grid_id, (t.tile_minx - g.origin_x) / g.size AS fx0, (g.origin_y - t.tile_maxy) / g.size AS fy0,
               (t.tile_maxx - t.tile_minx) / g.size AS w, (t.tile_maxy - t.tile_miny) / g.size AS h
        FROM tiles t JOIN grids g USING (grid, tile_crs)
    )
);
-- point_cells: one row per (point, grid whose extent holds it): the point's columns, grid_id, its cell key k and
-- its offset (x, y) in that cell, whether or not a tile lies on the cell. Points outside every grid's extent are
-- not in it. With one grid, the unpaired points are its rows whose cell holds no tile plus the points outside the
-- grid's extent (sql/pair_unpaired_one_grid.sql), found without a join the size of the points.
CREATE OR REPLACE TEMP VIEW point_cells AS
WITH projected AS (
    SELECT p.*, g.grid_id, g.origin_x, g.origin_y, g.size, p.lon * 20037508.342789244 / 180.0 AS px,
           ln(tan(pi() / 4.0 + radians(p.lat) / 2.0)) * 20037508.342789244 / pi() AS py
    FROM points p JOIN grids g ON g.grid = 'xyz'
    WHERE p.lon BETWEEN g.lon_min AND g.lon_max AND p.lat BETWEEN g.lat_min AND g.lat_max
    UNION ALL
    SELECT * EXCLUDE (pt), ST_X(pt) AS px, ST_Y(pt) AS py
    FROM (
        SELECT p.*, g.grid_id, g.origin_x, g.origin_y, g.size,
               ST_Transform(ST_Point(p.lon, p.lat), 'EPSG:4326', g.tile_crs, always_xy := true) AS pt
        FROM points p JOIN grids g ON g.grid = 'utm'
        WHERE p.lon BETWEEN g.lon_min AND g.lon_max AND p.lat BETWEEN g.lat_min AND g.lat_max
    )
),
snapped AS (
    SELECT * EXCLUDE (fx_raw, fy_raw), snap(fx_raw) AS fx, snap(fy_raw) AS fy
    FROM (SELECT * EXCLUDE (px, py, origin_x, origin_y, size),
                 (px - origin_x) / size AS fx_raw, (origin_y - py) / size AS fy_raw FROM projected)
)
SELECT * EXCLUDE (fx, fy, ixf, iyf), fx - ixf AS x, fy - iyf AS y,
       tile_key(grid_id, CAST(ixf AS BIGINT), CAST(iyf AS BIGINT)) AS k
FROM (SELECT *, floor(fx) AS ixf, floor(fy) AS iyf FROM snapped);
CREATE OR REPLACE TEMP VIEW assigned AS
SELECT c.* EXCLUDE (grid_id, k, x, y), t.* EXCLUDE (k, off_grid), c.x, c.y
FROM point_cells c JOIN tile_keys t USING (k);
