-- Run only when the tiles come from more than one grid (e.g. two overlapping UTM zones), on the table
-- assigned_rows (materialised from the view `assigned`): a point inside tiles of two grids keeps the tile
-- where it is most central (ties: smallest tile_id, i.e. smallest tidx).
CREATE OR REPLACE TEMP TABLE assigned_rows AS
SELECT * FROM assigned_rows
QUALIFY row_number() OVER (PARTITION BY pidx ORDER BY abs(x - 0.5) + abs(y - 0.5), tidx) = 1;
