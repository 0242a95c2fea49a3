-- Optional cap: keep at most $max_points_per_tile points per tile, a deterministic pseudo-random subset
-- (hash of the SV id), so re-runs keep the same points.
CREATE OR REPLACE TEMP TABLE in_tile AS
SELECT i.* FROM in_tile i JOIN points p USING (pidx)
QUALIFY row_number() OVER (PARTITION BY i.tidx ORDER BY hash(p.sv_id), p.sv_id) <= $max_points_per_tile;
