-- The points outside every tile (unpaired.parquet) when the tiles form one grid: the points table's columns, in
-- input order. A point is in at most one cell of the grid (point_cells, sql/pair_points.sql); it is unpaired when
-- no tile lies on that cell, or when it is outside the grid's extent. Both parts join with something the size of
-- the tiles (tile_keys, grids: one row), not of the points: about 2/3 of the CPU of sql/pair_unpaired.sql.
-- Read before any max_points_per_tile cap: a capped point lies in a tile, it is not unpaired.
SELECT * EXCLUDE (pidx)
FROM (
    SELECT c.* EXCLUDE (grid_id, k, x, y) FROM point_cells c ANTI JOIN tile_keys t USING (k)
    UNION ALL
    SELECT p.* FROM points p JOIN grids g
        ON NOT (p.lon BETWEEN g.lon_min AND g.lon_max AND p.lat BETWEEN g.lat_min AND g.lat_max)
)
ORDER BY pidx
