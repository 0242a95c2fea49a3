-- The pairs table as written (docs/DATA_CONTRACT.md), from `pairs_source`: the view `assigned`
-- (sql/pair_points.sql) streamed into the sort (which holds the pairs, spilling beyond the memory limit), or
-- a table of it when a point had to choose between grids or a cap applies. $region is the region name.
-- Slim: the point's own columns, tile_id, the offset (x, y, col, row), the tile's split, the region and the
-- point geometry. The tile's other attributes (CRS, bounds, bbox, item_ids, ...) stay in tiles.parquet and are
-- joined by tile_id where needed: repeating them on every row was most of the cost of this step.
-- Ordered by tile, then by the order of the points file, so re-runs write the same file. The sort is needed:
-- DuckDB joins do not preserve insertion order (without it, rows come out in a different chunk order on every
-- run), and grouping by tile lets the per-tile columns compress into runs. The sort carries only what cannot be
-- derived afterwards: the geometry and the region are computed above it (an order-preserving projection), so
-- they are not in the sort's payload.
SELECT sv_id, lon, lat, image_uri, heading, captured_at, tile_id, x, y, col, "row", split,
       CAST($region AS VARCHAR) AS region, ST_Point(lon, lat) AS geometry
FROM (
    SELECT a.sv_id, a.lon, a.lat, a.image_uri, a.heading, a.captured_at, a.tile_id, a.x, a.y,
           least(CAST(floor(snap(a.x * a.tile_width)) AS INTEGER), a.tile_width - 1) AS col,
           least(CAST(floor(snap(a.y * a.tile_height)) AS INTEGER), a.tile_height - 1) AS "row",
           a.split
    FROM pairs_source a
    ORDER BY a.tidx, a.pidx
)
