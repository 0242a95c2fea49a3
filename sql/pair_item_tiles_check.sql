-- Item tiles (tile_grid kind `item`) the spatial join of sql/pair_item_tiles.sql cannot use, with the reason; read
-- by gair_dataset/pairing.py, which refuses them by tile_id. Input: the table tiles.
SELECT tile_id, CASE
    WHEN tile_crs IS NULL OR tile_crs = '' THEN 'no tile_crs'
    WHEN tile_minx IS NULL OR tile_miny IS NULL OR tile_maxx IS NULL OR tile_maxy IS NULL THEN 'a bound is missing'
    WHEN NOT (tile_minx < tile_maxx AND tile_miny < tile_maxy) THEN 'empty bounds'
    WHEN lon_min IS NULL OR lat_min IS NULL OR lon_max IS NULL OR lat_max IS NULL THEN 'a lon/lat bound is missing'
    WHEN tile_width IS NULL OR tile_height IS NULL OR tile_width < 1 OR tile_height < 1 THEN 'no pixel size'
    WHEN count(*) OVER (PARTITION BY tile_id) > 1 THEN 'tile_id appears more than once'
    END AS why
FROM tiles
QUALIFY why IS NOT NULL
ORDER BY tile_id
