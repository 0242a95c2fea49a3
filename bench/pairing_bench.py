"""Pairing benchmark: DuckDB grid pairing vs geopandas ``sjoin`` on the same points and a 10k-tile grid.

Prints figures and writes ``bench/results/pairing.json``. The DuckDB step runs in a child process so that
its own peak memory (ru_maxrss) is measured; it includes reading the points Parquet and writing the pairs, with
the pipeline's DuckDB memory_limit (``DEFAULT_MEMORY_LIMIT``).
The sjoin baseline is timed on the same points (already in memory) against the same tile polygons.
Two DuckDB figures are reported: the whole step (read Parquet, assign, check, write the full pairs GeoParquet)
and the assignment alone (read, assign, check; what sjoin computes).

    python bench/pairing_bench.py [--sizes 1000000 10000000] [--repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
from shapely.geometry import box

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_result  # noqa: E402
from gair_model.data.geo import xyz_tile_id, xyz_tile_lonlat_bounds, xyz_tile_merc_bounds  # noqa: E402

ZOOM, TX0, TY0, SIDE = 14, 8790, 5120, 100  # 100 x 100 = 10,000 tiles near Lund


def make_tiles(path: Path) -> gpd.GeoDataFrame:
    rows = []
    for tx in range(TX0, TX0 + SIDE):
        for ty in range(TY0, TY0 + SIDE):
            lon0, lat0, lon1, lat1 = xyz_tile_lonlat_bounds(tx, ty, ZOOM)
            mx0, my0, mx1, my1 = xyz_tile_merc_bounds(tx, ty, ZOOM)
            rows.append({"tile_id": xyz_tile_id(tx, ty, ZOOM), "grid": "xyz", "tile_crs": "EPSG:3857",
                         "tile_minx": mx0, "tile_miny": my0, "tile_maxx": mx1, "tile_maxy": my1,
                         "tile_width": 96, "tile_height": 96, "lon_min": lon0, "lat_max": lat1, "lon_max": lon1,
                         "lat_min": lat0, "item_ids": ["bench"], "n_items": 1, "collection": "sentinel-2-l2a",
                         "block_id": "b", "split": "train", "geometry": box(lon0, lat0, lon1, lat1)})
    tiles = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
    tiles.to_parquet(path)
    return tiles


def make_points(n: int, tiles: gpd.GeoDataFrame, path: Path, seed: int = 0) -> pd.DataFrame:
    w, s, e, nn = tiles.total_bounds
    rng = np.random.default_rng(seed)
    pad = 0.02 * (e - w)  # ~4% of the points fall outside the grid
    df = pd.DataFrame({"sv_id": pd.array(np.char.add("p", np.arange(n).astype(str)), dtype="string"),
                       "lon": rng.uniform(w - pad, e + pad, n), "lat": rng.uniform(s - pad, nn + pad, n),
                       "image_uri": "x.jpg", "heading": np.nan, "captured_at": None})
    df.to_parquet(path, index=False)
    return df


CHILD = """
import json, resource, sys, time
from gair_model.data.pairing import DEFAULT_MEMORY_LIMIT, connect, pair_points
t = time.perf_counter()
r = pair_points(sys.argv[1], sys.argv[2], sys.argv[3], con=connect(memory_limit=DEFAULT_MEMORY_LIMIT))
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "join_seconds": r.join_seconds, "paired": r.paired, "outside": r.outside,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def duckdb_run(points: Path, tiles: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(points), str(tiles), str(out)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss_mb() -> float:
    code = "import resource; from gair_model.data.pairing import connect; connect(); " \
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])  # DuckDB may print a progress bar first


def sjoin_run(df: pd.DataFrame, tiles: gpd.GeoDataFrame) -> tuple[float, int]:
    t = time.perf_counter()
    pts = gpd.GeoDataFrame(df[["sv_id"]], geometry=gpd.points_from_xy(df.lon, df.lat), crs="EPSG:4326")
    joined = gpd.sjoin(pts, tiles[["tile_id", "geometry"]], predicate="within", how="inner")
    return time.perf_counter() - t, len(joined)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sjoin-repeats-large", type=int, default=1, help="sjoin repeats at >= 5M points (slow)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiles = make_tiles(tmp / "tiles.parquet")
        base_rss = baseline_rss_mb()
        for n in args.sizes:
            df = make_points(n, tiles, tmp / f"points_{n}.parquet")
            ddb = [duckdb_run(tmp / f"points_{n}.parquet", tmp / "tiles.parquet", tmp / "pairs.parquet")
                   for _ in range(args.repeats)]
            reps = args.sjoin_repeats_large if n >= 5_000_000 else args.repeats
            sj = [sjoin_run(df, tiles) for _ in range(reps)]
            d_med = statistics.median(r["seconds"] for r in ddb)
            j_med = statistics.median(r["join_seconds"] for r in ddb)
            s_med = statistics.median(t for t, _ in sj)
            peak = max(r["peak_rss_mb"] for r in ddb)
            row = {"points": n, "tiles": len(tiles), "duckdb_seconds_median": round(d_med, 3),
                   "duckdb_seconds": [round(r["seconds"], 3) for r in ddb],
                   "sjoin_seconds_median": round(s_med, 3), "sjoin_seconds": [round(t, 3) for t, _ in sj],
                   "speedup_vs_sjoin": round(s_med / d_med, 2),
                   "duckdb_join_seconds_median": round(j_med, 3),
                   "join_only_speedup_vs_sjoin": round(s_med / j_med, 2), "paired": ddb[0]["paired"],
                   "sjoin_matches": sj[0][1], "duckdb_process_peak_rss_mb": round(peak, 1),
                   "pairing_step_peak_mb_above_import": round(peak - base_rss, 1)}
            assert row["paired"] == row["sjoin_matches"] or abs(row["paired"] - row["sjoin_matches"]) < n * 1e-6
            results.append(row)
            print(f"{n:>11,} points x {len(tiles):,} tiles: sjoin {s_med:7.2f}s | duckdb pairing incl. GeoParquet "
                  f"write {d_med:7.2f}s = {s_med / d_med:5.1f}x | "
                  f"assignment only {j_med:6.2f}s = {s_med / j_med:5.1f}x | "
                  f"peak RSS {peak:,.0f} MB "
                  f"(+{peak - base_rss:,.0f} MB over an idle connection)", flush=True)
            del df
    out = write_result("pairing", {"benchmark": "pairing", "zoom": ZOOM, "target": ">= 15x sjoin at 10M, < 2 GB",
                                   "baseline_process_rss_mb": round(base_rss, 1), "results": results})
    print(f"written {out}")


if __name__ == "__main__":
    main()
