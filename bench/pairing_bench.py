"""Pairing benchmark: DuckDB grid pairing vs geopandas ``sjoin`` on the same points and a 10k-tile grid.

Prints figures and writes ``bench/results/pairing.json``. Every DuckDB run is a child process so that its own
peak memory (VmHWM) is measured, with the pipeline's DuckDB memory_limit (``DEFAULT_MEMORY_LIMIT``).
The sjoin baseline is timed on the same points (already in memory) against the same tile polygons.
Two DuckDB figures are reported:

- the assignment (``assign_points``: read the points Parquet, grid arithmetic, lookup of the tile by its cell,
  a table of (point, tile, x, y)): what ``sjoin`` computes, and the figure the target applies to;
- the whole pipeline step (``pair_points`` as the ``pairs`` asset calls it: the assignment, then the slim 14-column
  pairs GeoParquet sorted by tile (``PAIRS_COLUMNS``: the point, tile_id, offsets, split, region, geometry; the
  tile attributes stay in the tile table), and ``unpaired.parquet``).

Targets at the largest size: assignment >= 15x ``sjoin``, whole step >= 3x ``sjoin``, step peak RSS < 2 GB. The
load average is recorded with every size: other jobs on a shared machine slow both sides, compare the ratios.

    python bench/pairing_bench.py [--sizes 1000000 10000000] [--repeats 3]
"""

import argparse
import json
import os
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
from bench.common import write_result
from gair_dataset.geo import xyz_tile_id, xyz_tile_lonlat_bounds, xyz_tile_merc_bounds

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
import json, sys, time
from pathlib import Path
from bench.common import peak_rss_mb
from gair_dataset.pairing import DEFAULT_MEMORY_LIMIT, assign_points, connect, pair_points
mode, points, tiles, out = sys.argv[1:5]
con = connect(memory_limit=DEFAULT_MEMORY_LIMIT)
t = time.perf_counter()
if mode == "assign":
    paired = assign_points(points, tiles, con=con)
else:
    paired = pair_points(points, tiles, out, unpaired_path=Path(out).with_name("unpaired.parquet"), con=con).paired
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "paired": paired, "peak_rss_mb": peak_rss_mb()}))
"""


def duckdb_run(mode: str, points: Path, tiles: Path, out: Path) -> dict:
    """One DuckDB run in a child process: ``mode`` is ``assign`` or ``step``."""
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(points), str(tiles), str(out)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss_mb() -> float:
    code = "from bench.common import peak_rss_mb; from gair_dataset.pairing import connect; connect(); " \
           "print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])  # DuckDB may print a progress bar first


def sjoin_run(df: pd.DataFrame, tiles: gpd.GeoDataFrame) -> tuple[float, int]:
    t = time.perf_counter()
    pts = gpd.GeoDataFrame(df[["sv_id"]], geometry=gpd.points_from_xy(df.lon, df.lat), crs="EPSG:4326")
    joined = gpd.sjoin(pts, tiles[["tile_id", "geometry"]], predicate="within", how="inner")
    return time.perf_counter() - t, len(joined)


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other work on the machine slows every figure)."""
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sjoin-repeats-large", type=int, default=1, help="sjoin repeats at >= 5M points (slow)")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tiles = make_tiles(tmp / "tiles.parquet")
        base_rss = baseline_rss_mb()
        for n in args.sizes:
            df = make_points(n, tiles, tmp / f"points_{n}.parquet")
            run = [tmp / f"points_{n}.parquet", tmp / "tiles.parquet", tmp / "pairs.parquet"]
            load_before = load_average()
            assign = [duckdb_run("assign", *run) for _ in range(args.repeats)]
            step = [duckdb_run("step", *run) for _ in range(args.repeats)]
            reps = args.sjoin_repeats_large if n >= 5_000_000 else args.repeats
            sj = [sjoin_run(df, tiles) for _ in range(reps)]
            a_med = statistics.median(r["seconds"] for r in assign)
            st_med = statistics.median(r["seconds"] for r in step)
            s_med = statistics.median(t for t, _ in sj)
            a_peak = max(r["peak_rss_mb"] for r in assign)
            st_peak = max(r["peak_rss_mb"] for r in step)
            row = {"points": n, "tiles": len(tiles),
                   "sjoin_seconds_median": round(s_med, 3), "sjoin_seconds": [round(t, 3) for t, _ in sj],
                   "assign_seconds_median": round(a_med, 3), "assign_seconds": [round(r["seconds"], 3) for r in assign],
                   "assign_speedup_vs_sjoin": round(s_med / a_med, 2),
                   "assign_process_peak_rss_mb": round(a_peak, 1),
                   "assign_peak_mb_above_idle_connection": round(a_peak - base_rss, 1),
                   "step_seconds_median": round(st_med, 3), "step_seconds": [round(r["seconds"], 3) for r in step],
                   "step_speedup_vs_sjoin": round(s_med / st_med, 2),
                   "step_process_peak_rss_mb": round(st_peak, 1),
                   "step_peak_mb_above_idle_connection": round(st_peak - base_rss, 1),
                   "pairs_file_mb": round((tmp / "pairs.parquet").stat().st_size / 1e6, 1),
                   "paired": step[0]["paired"], "sjoin_matches": sj[0][1],
                   "load_average_before": load_before, "load_average_after": load_average()}
            # Random points hit a shared edge with probability ~0; sjoin(within) and the half-open rule agree.
            assert row["paired"] == assign[0]["paired"] == row["sjoin_matches"], row
            results.append(row)
            print(f"{n:>11,} points x {len(tiles):,} tiles: sjoin {s_med:6.2f}s | "
                  f"duckdb assignment {a_med:5.2f}s = {s_med / a_med:5.1f}x (peak RSS {a_peak:,.0f} MB) | "
                  f"whole step incl. sorted GeoParquet + unpaired {st_med:6.2f}s = {s_med / st_med:4.1f}x "
                  f"(peak RSS {st_peak:,.0f} MB, +{st_peak - base_rss:,.0f} MB over an idle connection) | "
                  f"load {load_before} -> {row['load_average_after']}", flush=True)
            del df
        big = max(results, key=lambda r: r["points"])
        met = {"assignment_15x": big["assign_speedup_vs_sjoin"] >= 15, "step_3x": big["step_speedup_vs_sjoin"] >= 3,
               "step_peak_under_2gb": big["step_process_peak_rss_mb"] < 2048}
        print(f"targets at {big['points']:,} points: assignment >= 15x sjoin: {big['assign_speedup_vs_sjoin']}x "
              f"({'met' if met['assignment_15x'] else 'NOT met'}); whole step >= 3x: {big['step_speedup_vs_sjoin']}x "
              f"({'met' if met['step_3x'] else 'NOT met'}); step peak < 2 GB: "
              f"{big['step_process_peak_rss_mb']:,.0f} MB ({'met' if met['step_peak_under_2gb'] else 'NOT met'})")
    target = ">= 15x sjoin at 10M (assignment), whole step >= 3x sjoin, step peak < 2 GB"
    out = write_result("pairing", {"benchmark": "pairing", "zoom": ZOOM, "target": target,
                                   "target_met": all(met.values()), "targets": met,
                                   "baseline_process_rss_mb": round(base_rss, 1), "results": results})
    print(f"written {out}")


if __name__ == "__main__":
    main()
