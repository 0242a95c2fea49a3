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
-- Method: grid arithmetic, then an exact check; no spatial join. In the grid's CRS (Web-Mercator for XYZ,
-- the UTM zone otherwise) a point's tile is ix = floor((X - origin_x) / size), iy = floor((origin_y - Y) / size);
-- the candidate is joined to its tile on (grid_id, ix, iy) and checked against that tile's stored bounds.
-- Half-open rule: a tile owns its west and north edges (0 <= x < 1 and 0 <= y < 1 from its top-left
-- corner), so a point on a shared edge or corner belongs to exactly one tile. Values within 1e-9 tile units
-- of a grid line are snapped onto it, so float round-off cannot push an edge point across.

CREATE OR REPLACE TEMP MACRO snap(v) AS CASE WHEN abs(v - round(v)) < 1e-9 THEN round(v) ELSE v END;

CREATE OR REPLACE TEMP TABLE tile_keys AS
SELECT row_number() OVER (ORDER BY t.tile_id) AS tidx, g.grid_id,
       CAST(round((t.tile_minx - g.origin_x) / g.size) AS BIGINT) AS ix,
       CAST(round((g.origin_y - t.tile_maxy) / g.size) AS BIGINT) AS iy,
       t.* EXCLUDE (geometry, block_id)
FROM tiles t JOIN grids g USING (grid, tile_crs);

CREATE OR REPLACE TEMP TABLE projected AS
SELECT p.pidx, g.grid_id, g.origin_x, g.origin_y, g.size,
       p.lon * 20037508.342789244 / 180.0 AS px,
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
);

CREATE OR REPLACE TEMP TABLE in_tile AS
WITH candidates AS (
    SELECT pidx, grid_id, px, py,
           CAST(floor(snap((px - origin_x) / size)) AS BIGINT) AS ix,
           CAST(floor(snap((origin_y - py) / size)) AS BIGINT) AS iy
    FROM projected
),
checked AS (
    -- The exact check, against the stored bounds of the candidate tile in its own CRS.
    SELECT c.pidx, t.tidx,
           snap((c.px - t.tile_minx) / (t.tile_maxx - t.tile_minx)) AS x_raw,
           snap((t.tile_maxy - c.py) / (t.tile_maxy - t.tile_miny)) AS y_raw
    FROM candidates c JOIN tile_keys t USING (grid_id, ix, iy)
)
SELECT pidx, tidx, greatest(x_raw, 0.0) AS x, greatest(y_raw, 0.0) AS y
FROM checked
WHERE x_raw >= 0 AND x_raw < 1 AND y_raw >= 0 AND y_raw < 1;

DROP TABLE projected;
