-- The points outside every tile (unpaired.parquet): the points table's columns, in input order, less the points of
-- `pairs_source` (sql/pair_output.sql). Used when the tiles form several grids (a point can have a cell in each,
-- sql/pair_unpaired_one_grid.sql does not apply); pairs_source is then a table. Read before any
-- max_points_per_tile cap: a capped point lies in a tile, it is not unpaired.
SELECT p.* EXCLUDE (pidx)
FROM points p ANTI JOIN (SELECT pidx FROM pairs_source) USING (pidx)
ORDER BY p.pidx
