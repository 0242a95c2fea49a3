-- Pair street-view points with the tile that contains them: one tile per point, at its true offset.
--
-- Inputs (views/tables prepared by gair_model/data/pairing.py):
--   points(sv_id, lon, lat, image_uri, heading, captured_at)
--   tiles(...)  the tile grid (docs/DATA_CONTRACT.md), only tiles covered by an item
--   grids(grid, tile_crs, origin_x, origin_y, size, prefix, lon_min, lat_min, lon_max, lat_max)
--         one row per regular grid present in `tiles` (XYZ zoom, or one UTM zone)
-- Output: every point that lies in a tile, once, with `rank_in_tile` (a deterministic hash order within its
-- tile) so that an optional per-tile cap is a plain filter on it (see pairing.py).
--
-- Method: grid arithmetic, then an exact check. A point's tile index is floor((X - origin_x) / size) and
-- floor((origin_y - Y) / size) in the grid's CRS (Web-Mercator for XYZ, the UTM zone otherwise), so no
-- spatial join is needed; the candidate is then checked against the stored bounds of that tile.
-- Half-open rule: a tile owns its west and north edges, i.e. 0 <= x < 1 and 0 <= y < 1 measured from its
-- top-left corner. Values within 1e-9 tile units of a grid line are snapped onto it (float round-off).
-- A point inside tiles of two grids (overlapping UTM zones) goes to the tile where it is most central.

CREATE OR REPLACE TEMP MACRO snap(v) AS CASE WHEN abs(v - round(v)) < 1e-9 THEN round(v) ELSE v END;

WITH projected AS (
    SELECT p.*, g.grid, g.origin_x, g.origin_y, g.size, g.prefix,
           CASE WHEN g.grid = 'xyz' THEN p.lon * 20037508.342789244 / 180.0
                ELSE ST_X(ST_Transform(ST_Point(p.lon, p.lat), 'EPSG:4326', g.tile_crs, always_xy := true)) END AS px,
           CASE WHEN g.grid = 'xyz' THEN ln(tan(pi() / 4.0 + radians(p.lat) / 2.0)) * 20037508.342789244 / pi()
                ELSE ST_Y(ST_Transform(ST_Point(p.lon, p.lat), 'EPSG:4326', g.tile_crs, always_xy := true)) END AS py
    FROM points p
    JOIN grids g
      ON p.lon BETWEEN g.lon_min AND g.lon_max AND p.lat BETWEEN g.lat_min AND g.lat_max
),
candidates AS (
    SELECT *, CAST(floor(snap((px - origin_x) / size)) AS BIGINT) AS ix,
              CAST(floor(snap((origin_y - py) / size)) AS BIGINT) AS iy
    FROM projected
),
keyed AS (
    SELECT *, CASE WHEN grid = 'xyz' THEN prefix || ix || '-' || iy
                   ELSE prefix || 'x' || ix || '-y' || iy END AS tile_id
    FROM candidates
),
checked AS (
    -- Exact check against the tile's own stored bounds, in the tile's CRS.
    SELECT k.sv_id, k.lon, k.lat, k.image_uri, k.heading, k.captured_at, t.* EXCLUDE (geometry, block_id),
           greatest(snap((k.px - t.tile_minx) / (t.tile_maxx - t.tile_minx)), 0.0) AS x,
           greatest(snap((t.tile_maxy - k.py) / (t.tile_maxy - t.tile_miny)), 0.0) AS y
    FROM keyed k
    JOIN tiles t USING (tile_id)
    WHERE snap((k.px - t.tile_minx) / (t.tile_maxx - t.tile_minx)) >= 0
      AND snap((k.px - t.tile_minx) / (t.tile_maxx - t.tile_minx)) < 1
      AND snap((t.tile_maxy - k.py) / (t.tile_maxy - t.tile_miny)) >= 0
      AND snap((t.tile_maxy - k.py) / (t.tile_maxy - t.tile_miny)) < 1
),
one_tile AS (
    SELECT * FROM checked
    QUALIFY (SELECT count(*) FROM grids) = 1
         OR row_number() OVER (PARTITION BY sv_id ORDER BY abs(x - 0.5) + abs(y - 0.5), tile_id) = 1
),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY tile_id ORDER BY hash(sv_id), sv_id) AS rank_in_tile
    FROM one_tile
)
SELECT sv_id, lon, lat, image_uri, heading, captured_at, tile_id, grid, tile_crs,
       tile_minx, tile_miny, tile_maxx, tile_maxy, tile_width, tile_height,
       lon_min, lat_max, lon_max, lat_min, x, y,
       least(CAST(floor(snap(x * tile_width)) AS INTEGER), tile_width - 1) AS col,
       least(CAST(floor(snap(y * tile_height)) AS INTEGER), tile_height - 1) AS "row",
       item_ids, collection, split, rank_in_tile,
       ST_Point(lon, lat) AS geometry
FROM ranked
ORDER BY tile_id, sv_id
