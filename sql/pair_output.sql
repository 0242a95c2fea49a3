-- The pairs table as written (docs/DATA_CONTRACT.md): point and tile columns joined back to in_tile
-- (run_info holds the region name),
-- ordered by tile then input order (the points arrive sorted by sv_id), so re-runs write the same file.
SELECT p.sv_id, p.lon, p.lat, p.image_uri, p.heading, p.captured_at,
       t.tile_id, t.grid, t.tile_crs, t.tile_minx, t.tile_miny, t.tile_maxx, t.tile_maxy,
       t.tile_width, t.tile_height, t.lon_min, t.lat_max, t.lon_max, t.lat_min,
       i.x, i.y,
       least(CAST(floor(snap(i.x * t.tile_width)) AS INTEGER), t.tile_width - 1) AS col,
       least(CAST(floor(snap(i.y * t.tile_height)) AS INTEGER), t.tile_height - 1) AS "row",
       t.item_ids, t.collection, t.split, (SELECT region FROM run_info) AS region,
       ST_Point(p.lon, p.lat) AS geometry
FROM in_tile i
JOIN points p USING (pidx)
JOIN tile_keys t USING (tidx)
ORDER BY i.tidx, i.pidx
