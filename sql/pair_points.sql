-- Pair street-view points with the tile that contains them, at their true offset.
--
-- Inputs (prepared by gair_model/data/pairing.py):
--   points(pidx, sv_id, lon, lat, image_uri, heading, captured_at)   validated SV points; pidx = row number
--   tiles(...)  the tile grid (docs/DATA_CONTRACT.md): only tiles covered by an item
--   grids(grid_id, grid, tile_crs, origin_x, origin_y, size, lon_min, lat_min, lon_max, lat_max)
--         one row per regular grid present in `tiles` (an XYZ zoom, or one UTM zone), with its extent
-- Output: table in_tile(pidx, tidx, x, y), one row per (point, tile) where the point lies in the tile;
-- sql/pair_output.sql joins the point and tile columns back when writing.
--
-- Method: grid arithmetic, then a check; no spatial join. In the grid's CRS (Web-Mercator for XYZ, the UTM
-- zone otherwise) the point's tile coordinates are fx = (X - origin_x) / size and fy = (origin_y - Y) / size;
-- the tile is (floor(fx), floor(fy)) and the offset inside it (x, y) = (fx - floor(fx), fy - floor(fy)).
-- Half-open rule: a tile owns its west and north edges (0 <= x < 1 and 0 <= y < 1 from its top-left
-- corner), so a point on a shared edge or corner belongs to exactly one tile. Values within 1e-9 tile units
-- of a grid line are snapped onto it, so float round-off cannot push an edge point across.
-- The candidate is joined to its tile by one integer key and checked against that tile's stored bounds
-- (to 1e-6 tile units: the check catches a wrong grid or key, while the assignment itself stays the
-- arithmetic one, so a point on an edge is never lost to round-off between the two computations).

CREATE OR REPLACE TEMP MACRO snap(v) AS CASE WHEN abs(v - round(v)) < 1e-9 THEN round(v) ELSE v END;
-- One BIGINT per (grid, column, row): tile indices up to +-2^24 per axis (XYZ zoom <= 23, UTM tiles >= 1 m).
CREATE OR REPLACE TEMP MACRO tile_key(g, ix, iy) AS g * 1125899906842624 + (ix + 16777216) * 33554432 + (iy + 16777216);
CREATE OR REPLACE TEMP TABLE tile_keys AS
SELECT row_number() OVER (ORDER BY t.tile_id) AS tidx,
       tile_key(g.grid_id, CAST(round((t.tile_minx - g.origin_x) / g.size) AS BIGINT),
                CAST(round((g.origin_y - t.tile_maxy) / g.size) AS BIGINT)) AS k,
       t.* EXCLUDE (geometry, block_id)
FROM tiles t JOIN grids g USING (grid, tile_crs);
CREATE OR REPLACE TEMP TABLE in_tile AS
WITH projected AS (
    SELECT p.pidx, g.grid_id, g.origin_x, g.origin_y, g.size, p.lon * 20037508.342789244 / 180.0 AS px,
           ln(tan(pi() / 4.0 + radians(p.lat) / 2.0)) * 20037508.342789244 / pi() AS py
    FROM points p JOIN grids g ON g.grid = 'xyz'
    WHERE p.lon BETWEEN g.lon_min AND g.lon_max AND p.lat BETWEEN g.lat_min AND g.lat_max
    UNION ALL
    SELECT pidx, grid_id, origin_x, origin_y, size, ST_X(pt) AS px, ST_Y(pt) AS py
    FROM (
        SELECT p.pidx, g.grid_id, g.origin_x, g.origin_y, g.size,
               ST_Transform(ST_Point(p.lon, p.lat), 'EPSG:4326', g.tile_crs, always_xy := true) AS pt
        FROM points p JOIN grids g ON g.grid = 'utm'
        WHERE p.lon BETWEEN g.lon_min AND g.lon_max AND p.lat BETWEEN g.lat_min AND g.lat_max
    )
),
candidates AS (
    SELECT pidx, px, py, fx, fy, tile_key(grid_id, CAST(floor(fx) AS BIGINT), CAST(floor(fy) AS BIGINT)) AS k
    FROM (SELECT pidx, grid_id, px, py, snap((px - origin_x) / size) AS fx, snap((origin_y - py) / size) AS fy
          FROM projected)
)
SELECT c.pidx, t.tidx, c.fx - floor(c.fx) AS x, c.fy - floor(c.fy) AS y
FROM candidates c JOIN tile_keys t USING (k)
WHERE (c.px - t.tile_minx) / (t.tile_maxx - t.tile_minx) BETWEEN -1e-6 AND 1 + 1e-6
  AND (t.tile_maxy - c.py) / (t.tile_maxy - t.tile_miny) BETWEEN -1e-6 AND 1 + 1e-6;
