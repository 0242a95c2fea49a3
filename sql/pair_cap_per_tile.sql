-- Optional cap on the table assigned_rows: keep at most $max_points_per_tile points per tile, a deterministic
-- pseudo-random subset (hash of the SV id), so re-runs keep the same points.
CREATE OR REPLACE TEMP TABLE assigned_rows AS
SELECT * FROM assigned_rows
QUALIFY row_number() OVER (PARTITION BY tidx ORDER BY hash(sv_id), sv_id) <= $max_points_per_tile;
