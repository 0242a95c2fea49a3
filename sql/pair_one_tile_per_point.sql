-- Run only when the tiles come from more than one grid (e.g. two overlapping UTM zones): a point inside
-- tiles of two grids keeps the tile where it is most central (ties: smallest tile_id, i.e. smallest tidx).
CREATE OR REPLACE TEMP TABLE in_tile AS
SELECT * FROM in_tile
QUALIFY row_number() OVER (PARTITION BY pidx ORDER BY abs(x - 0.5) + abs(y - 0.5), tidx) = 1;
