-- The pairs table as written (docs/DATA_CONTRACT.md), from `pairs_source`: the view `assigned`
-- (sql/pair_points.sql) streamed into the sort (which holds the pairs, spilling beyond the memory limit), or
-- a table of it when a point had to choose between grids or a cap applies. run_info holds the region name.
-- Ordered by tile, then by the order of the points file, so re-runs write the same file. The sort is needed:
-- DuckDB joins do not preserve insertion order (without it, rows come out in a different chunk order on every
-- run), and grouping by tile lets the per-tile columns compress into runs.
SELECT a.sv_id, a.lon, a.lat, a.image_uri, a.heading, a.captured_at,
       a.tile_id, a.grid, a.tile_crs, a.tile_minx, a.tile_miny, a.tile_maxx, a.tile_maxy,
       a.tile_width, a.tile_height, a.lon_min, a.lat_max, a.lon_max, a.lat_min,
       a.x, a.y,
       least(CAST(floor(snap(a.x * a.tile_width)) AS INTEGER), a.tile_width - 1) AS col,
       least(CAST(floor(snap(a.y * a.tile_height)) AS INTEGER), a.tile_height - 1) AS "row",
       a.item_ids, a.collection, a.split, (SELECT region FROM run_info) AS region,
       ST_Point(a.lon, a.lat) AS geometry
FROM pairs_source a
ORDER BY a.tidx, a.pidx

