"""Benchmark chip reads, shard writing and the loader against bare baselines, in one run.

    .venv/bin/python bench/shards_bench.py [--repeats 5] [--out bench/results/shards.json]

* chips: ``ChipReader.read`` vs a bare rasterio window-read loop over the same windows (same GDAL
  options), warm (datasets kept open, as the pipeline does) and cold (one open per chip).
  Real rasters: the 20 Sentinel-2 L2A patches (10 bands, 96 x 96) and NAIP (4 bands, 128 x 128).
* writer: ``ShardWriter`` (encode npy + json, sha256, manifest) vs raw ``tarfile`` writing the
  same, already-encoded member bytes, MB/s.
* loader: ``build_loader`` (num_workers=0, one torch thread) on 640 x 480 SV JPEGs (real photos)
  and 10 x 96 x 96 RS chips -> batches of 224 px SV / 96 px RS, vs a bare PIL decode + resize +
  normalise loop over the same in-memory bytes.

Every figure is a median over repeats; variants are interleaved (order alternating) to share
machine noise, and ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rasterio  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from gair_dataset.bands import NAIP_BANDS, S2_COMMON_NAMES, S2_L2A_ALL_BANDS, S2_L2A_BANDS  # noqa: E402
from gair_dataset.chips import DEFAULT_GDAL_ENV, ChipReader, TileSpec, read_chip  # noqa: E402
from gair_dataset.samples import DEFAULT_INTERLEAVE_TILES, interleave_order  # noqa: E402
from gair_dataset.shards import (  # noqa: E402
    TAR_MTIME,
    ShardWriter,
    batch_diversity,
    encode_json,
    encode_rs,
    sample_key,
)
from gair_model.loader import IMAGENET_MEAN, IMAGENET_STD, build_loader  # noqa: E402

SHARED = REPO / ".." / "shared" / "data"


def _median_runs(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time every variant ``repeats`` times, interleaved, order reversed every other round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (imports, GDAL caches, page cache)
        fn()
    for i in range(repeats):
        for k in list(fns) if i % 2 == 0 else list(reversed(fns)):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _paired_ratio(times: dict[str, list[float]], baseline: str, ours: str) -> float:
    """Median over rounds of baseline_time / ours_time (ours throughput relative to the baseline)."""
    return statistics.median(b / o for b, o in zip(times[baseline], times[ours], strict=True))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----------------------------------------------------------------------------------------------
def _per_band_assets(patch: Path, folder: Path) -> dict:
    """Write a patch's bands as one GeoTIFF per band, keyed as Earth Search v1 does (``blue``..``swir22``, COG-like)."""
    assets = {}
    with rasterio.open(patch) as src:
        prof = {**src.profile, "count": 1}
        for i, b in enumerate(S2_L2A_ALL_BANDS, start=1):
            path = folder / f"{patch.stem}_{S2_COMMON_NAMES[b]}.tif"
            if not path.exists():
                with rasterio.open(path, "w", **prof) as dst:
                    dst.write(src.read(i), 1)
            cn = S2_COMMON_NAMES[b]
            assets[cn] = {"href": str(path), "eo:bands": [{"name": b, "common_name": cn}]}
    return assets


def chip_jobs(per_band_dir: Path | None = None) -> list[tuple]:
    """(paths, item, tile, window, band indexes) over the real S2 patches and NAIP rasters.

    S2 patches are read as one 12-band asset (``eo:bands`` selection) and, when ``per_band_dir`` is given, also as
    Earth Search v1-style items with one single-band asset per band (the built-in profile's common-name keys).
    """
    rng = np.random.default_rng(0)
    jobs = []  # (path, item, tile, window, indexes)
    s2_idx = [S2_L2A_ALL_BANDS.index(b) + 1 for b in S2_L2A_BANDS]
    for p in sorted((SHARED / "rasters" / "s2_l2a_patches" / "images").glob("*.tif")):
        # The SatCLIP patches are already harmonised (no +1000 offset): the item says so, as Earth Search does.
        item = {"id": p.stem, "collection": "sentinel-2-l2a",
                "properties": {"s2:processing_baseline": "05.00", "earthsearch:boa_offset_applied": True},
                "assets": {"data": {"href": str(p), "eo:bands": [{"name": b} for b in S2_L2A_ALL_BANDS]}}}
        with rasterio.open(p) as src:
            t, crs = src.transform, src.crs.to_string()
        for _ in range(10):
            c, r = (int(v) for v in rng.integers(0, 256 - 96, 2))
            x0, y0 = t @ (c, r)
            x1, y1 = t @ (c + 96, r + 96)
            jobs.append(([str(p)], item, TileSpec(crs, (x0, y1, x1, y0), 96, 96), Window(c, r, 96, 96), [s2_idx]))
    for p in sorted((SHARED / "rasters" / "naip_nd").glob("*.tif")):
        item = {"id": p.stem, "collection": "naip", "properties": {},
                "assets": {"image": {"href": str(p), "eo:bands": [{"name": n} for n in ("Red", "Green", "Blue",
                                                                                         "NIR")]}}}
        with rasterio.open(p) as src:
            t, crs, w, h = src.transform, src.crs.to_string(), src.width, src.height
        for _ in range(10):
            c, r = int(rng.integers(0, w - 128)), int(rng.integers(0, h - 128))
            x0, y0 = t @ (c, r)
            x1, y1 = t @ (c + 128, r + 128)
            jobs.append(([str(p)], item, TileSpec(crs, (x0, y1, x1, y0), 128, 128), Window(c, r, 128, 128),
                         [[1, 2, 3, 4]]))
    if per_band_dir is not None:
        for p in sorted((SHARED / "rasters" / "s2_l2a_patches" / "images").glob("*.tif"))[:8]:
            assets = _per_band_assets(p, per_band_dir)
            item = {"id": f"{p.stem}_v1", "collection": "sentinel-2-l2a",
                    "properties": {"s2:processing_baseline": "05.00", "earthsearch:boa_offset_applied": True},
                    "assets": assets}
            paths = [assets[S2_COMMON_NAMES[b]]["href"] for b in S2_L2A_BANDS]
            with rasterio.open(paths[0]) as src:
                t, crs = src.transform, src.crs.to_string()
            for _ in range(10):
                c, r = (int(v) for v in rng.integers(0, 256 - 96, 2))
                x0, y0 = t @ (c, r)
                x1, y1 = t @ (c + 96, r + 96)
                jobs.append((paths, item, TileSpec(crs, (x0, y1, x1, y0), 96, 96), Window(c, r, 96, 96),
                             [[1]] * len(paths)))
    return jobs


def bench_chips(repeats: int) -> dict:
    per_band = Path(tempfile.mkdtemp(prefix="chips_bench_"))
    try:
        return _bench_chips(repeats, chip_jobs(per_band))
    finally:
        import shutil

        shutil.rmtree(per_band, ignore_errors=True)


def _bench_chips(repeats: int, jobs: list[tuple]) -> dict:

    def ours_warm() -> None:
        with ChipReader(max_open=64) as reader:
            for _, item, tile, _, _ in jobs:
                bands = list(NAIP_BANDS) if item["collection"] == "naip" else None
                res = reader.read(item, tile, bands=bands, max_nodata_fraction=1.0)
                assert res.array is not None

    def bare_warm() -> None:
        with rasterio.Env(**DEFAULT_GDAL_ENV):
            open_ = {}
            for paths, _, _, window, idxs in jobs:
                for path, idx in zip(paths, idxs, strict=True):
                    if path not in open_:
                        open_[path] = rasterio.open(path)
                    open_[path].read(idx, window=window)
            for ds in open_.values():
                ds.close()

    def ours_cold() -> None:
        for _, item, tile, _, _ in jobs:
            bands = list(NAIP_BANDS) if item["collection"] == "naip" else None
            assert read_chip(item, tile, bands=bands, max_nodata_fraction=1.0).array is not None

    def bare_cold() -> None:
        with rasterio.Env(**DEFAULT_GDAL_ENV):
            for paths, _, _, window, idxs in jobs:
                for path, idx in zip(paths, idxs, strict=True):
                    with rasterio.open(path) as src:
                        src.read(idx, window=window)

    t = _median_runs({"ours_warm": ours_warm, "bare_warm": bare_warm, "ours_cold": ours_cold,
                      "bare_cold": bare_cold}, repeats)
    med = {k: statistics.median(v) for k, v in t.items()}
    n = len(jobs)
    return {
        "n_chips": n,
        "chips_per_s": {k: n / v for k, v in med.items()},
        "ratio_warm": _paired_ratio(t, "bare_warm", "ours_warm"),
        "ratio_cold": _paired_ratio(t, "bare_cold", "ours_cold"),
        "note": "ratio = ours/bare throughput; warm = datasets kept open (pipeline pattern), "
                "cold = one open per chip (read_chip one-shot vs open+read); jobs: 12-band S2 asset, NAIP 4-band "
                "asset, and S2 as Earth Search v1 items with one single-band asset per band (built-in profile)",
    }


# ----------------------------------------------------------------------------------------------
def _sv_jpegs(n: int) -> list[bytes]:
    photos = sorted((SHARED / "streetview" / "exif_photos" / "lund").glob("*.jpg"))
    out = []
    for p in photos[:n]:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").resize((640, 480), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _rs_chips(n: int) -> list[np.ndarray]:
    idx = [S2_L2A_ALL_BANDS.index(b) + 1 for b in S2_L2A_BANDS]
    chips = []
    for p in sorted((SHARED / "rasters" / "s2_l2a_patches" / "images").glob("*.tif")):
        with rasterio.open(p) as src:
            a = src.read(idx)
        for r in range(0, 160, 80):
            for c in range(0, 160, 80):
                chips.append(np.ascontiguousarray(a[:, r:r + 96, c:c + 96]))
    return chips[:n]


def _samples(n: int) -> list[tuple[str, np.ndarray, bytes, dict]]:
    svs, rss = _sv_jpegs(29), _rs_chips(80)
    out = []
    for i in range(n):
        tile, sv = f"t{i // 4:05d}", f"sv{i:07d}"
        meta = {"sv_id": sv, "tile_id": tile, "lon": 13.0 + i * 1e-4, "lat": 55.7, "x": (i % 7) / 7,
                "y": (i % 5) / 5, "col": 1, "row": 2, "bbox": [13.0, 55.8, 13.1, 55.7], "crs": "EPSG:32633",
                "item_ids": ["S2A_x"], "datetime": "2022-07-01T10:00:00Z", "collection": "sentinel-2-l2a",
                "platform": "Sentinel-2A", "bands": list(S2_L2A_BANDS), "processing_baseline": "05.00",
                "harmonized": True, "split": "train", "synthetic": False}
        out.append((sample_key(tile, sv), rss[i % len(rss)], svs[i % len(svs)], meta))
    return out


def _batch_diversity_figure(n_tiles: int = 2000, seed: int = 0) -> dict:
    """Distinct tiles per batch of 256, key order vs the shards step's interleaved order, on a skewed layout.

    ``n_tiles`` tiles with a geometric number of samples each (mean 10, as street-view points cluster),
    interleaved in windows of ``DEFAULT_INTERLEAVE_TILES`` tiles exactly as ``build_shards_from_pairs`` does.
    """
    rng = np.random.default_rng(seed)
    counts = rng.geometric(0.1, size=n_tiles)
    groups = [(f"t{t:05d}", [(f"t{t:05d}_sv{j:04d}", f"t{t:05d}") for j in range(k)]) for t, k in enumerate(counts)]
    order = []
    for w in range(0, n_tiles, DEFAULT_INTERLEAVE_TILES):
        order += interleave_order(groups[w:w + DEFAULT_INTERLEAVE_TILES])
    return {"layout": f"{n_tiles} tiles, geometric(0.1) samples per tile (seed {seed})",
            "interleave_tiles": DEFAULT_INTERLEAVE_TILES, **batch_diversity(order)}


def bench_writer(repeats: int, n: int = 400, per_shard: int = 100) -> dict:
    samples = _samples(n)
    encoded = [(k, encode_rs(rs), sv, encode_json(m)) for k, rs, sv, m in samples]
    total = sum(len(a) + len(b) + len(c) for _, a, b, c in encoded)
    tmp = Path(tempfile.mkdtemp(prefix="shards_bench_"))

    runs = itertools.count()

    def fresh(variant: str) -> Path:
        """A new, empty folder per run (the variant's previous one removed): every run writes a set from scratch,
        none replaces the files the previous run left dirty in the page cache."""
        for old in tmp.glob(f"{variant}-*"):
            shutil.rmtree(old)
        return tmp / f"{variant}-{next(runs)}"

    def ours(fsync: bool) -> Callable[[], None]:
        def run() -> None:
            with ShardWriter(fresh(f"ours_{fsync}"), name="b", samples_per_shard=per_shard, fsync=fsync) as w:
                for k, rs, sv, m in samples:
                    w.write(k, rs, sv, m)
        return run

    def raw() -> None:
        out = fresh("raw")
        out.mkdir()
        for s in range(0, n, per_shard):
            with tarfile.open(out / f"b-{s // per_shard:06d}.tar", "w") as tf:
                for k, a, b, c in encoded[s:s + per_shard]:
                    for suffix, data in (("rs.npy", a), ("sv.jpg", b), ("json", c)):
                        ti = tarfile.TarInfo(f"{k}.{suffix}")
                        ti.size, ti.mtime = len(data), TAR_MTIME
                        tf.addfile(ti, io.BytesIO(data))

    try:
        t = _median_runs({"ours": ours(False), "ours_fsync": ours(True), "raw_tarfile": raw}, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in t.items()}
    mb = total / 1e6
    return {
        "n_samples": n, "payload_mb": mb,
        "batch_diversity": _batch_diversity_figure(),
        "mb_per_s": {k: mb / v for k, v in med.items()},
        "ratio": _paired_ratio(t, "raw_tarfile", "ours"),
        "ratio_with_fsync": _paired_ratio(t, "raw_tarfile", "ours_fsync"),
        "note": "ours includes npy/json encoding, sha256 and the GeoParquet manifest; raw writes pre-encoded "
                "members without fsync",
    }


# ----------------------------------------------------------------------------------------------
def bench_loader(repeats: int, n: int = 512, batch: int = 32, sv_size: int = 224, rs_size: int = 96) -> dict:
    torch.set_num_threads(1)
    samples = _samples(n)
    tmp = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    with ShardWriter(tmp, name="l", samples_per_shard=128, fsync=False) as w:
        for k, rs, sv, m in samples:
            w.write(k, rs, sv, m)
    shards = w.info.paths
    raw = [(encode_rs(rs), sv) for _, rs, sv, _ in samples]
    lo = np.array([900 - 2 * 1100] * 10, np.float32).reshape(-1, 1, 1)
    scale = np.float32(1.0 / (4 * 1100))
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)

    def ours() -> None:
        loader = build_loader(shards, batch_size=batch, rs_size=rs_size, sv_size=sv_size, resampled=False,
                              shuffle_buffer=0, num_workers=0)
        k = 0
        for b in loader:
            k += len(b["key"])
        assert k == n

    def ours_train() -> None:
        loader = build_loader(shards, batch_size=batch, rs_size=rs_size, sv_size=sv_size, resampled=True,
                              epoch_samples=n, shuffle_buffer=256, sv_train_aug=True, num_workers=0)
        for _ in loader:
            pass

    def bare() -> None:
        svb, rsb = [], []
        for rs_bytes, jpg in raw:
            rs = np.load(io.BytesIO(rs_bytes), allow_pickle=False).astype(np.float32)
            rsb.append(np.clip((rs - lo) * scale, 0.0, 1.0))
            img = Image.open(io.BytesIO(jpg)).convert("RGB")
            w_, h_ = img.size
            s = min(w_, h_)
            box = ((w_ - s) / 2, (h_ - s) / 2, (w_ + s) / 2, (h_ + s) / 2)
            arr = np.asarray(img.resize((sv_size, sv_size), Image.Resampling.BILINEAR, box=box), np.float32)
            svb.append(((arr / 255.0 - mean) / std).transpose(2, 0, 1))
            if len(svb) == batch:
                torch.from_numpy(np.stack(svb)), torch.from_numpy(np.stack(rsb))
                svb, rsb = [], []

    try:
        t = _median_runs({"ours": ours, "bare": bare, "ours_train_aug": ours_train}, repeats)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "n_samples": n, "batch_size": batch, "sv_in": "640x480 JPEG q90 (real photos)", "sv_out": sv_size,
        "rs_in": "10x96x96 uint16 (real S2)", "rs_out": rs_size, "num_workers": 0, "torch_threads": 1,
        "samples_per_s": {k: n / v for k, v in med.items()},
        "ratio": _paired_ratio(t, "bare", "ours"),
        "note": "ours reads the tar shards too; bare decodes in-memory bytes (no draft, same crop+resize)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "shards.json"))
    ap.add_argument("--only", choices=["chips", "writer", "loader"], default=None)
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"real data not found at {SHARED.resolve()}")
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
                    "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__,
                    "torch": torch.__version__, "load_avg_start": os.getloadavg()},
        "repeats": args.repeats,
    }
    targets = {"chips_ratio": 0.95, "writer_ratio": 0.8, "loader_samples_per_s_per_core": 250, "loader_ratio": 0.8}
    if args.only in (None, "chips"):
        results["chips"] = bench_chips(args.repeats)
        print("chips", json.dumps(results["chips"], indent=1), flush=True)
    if args.only in (None, "writer"):
        results["writer"] = bench_writer(args.repeats)
        print("writer", json.dumps(results["writer"], indent=1), flush=True)
    if args.only in (None, "loader"):
        results["loader"] = bench_loader(args.repeats)
        print("loader", json.dumps(results["loader"], indent=1), flush=True)
    checks = {}
    if "chips" in results:
        checks["chips_ratio_warm"] = results["chips"]["ratio_warm"] >= targets["chips_ratio"]
        checks["chips_ratio_cold"] = results["chips"]["ratio_cold"] >= targets["chips_ratio"]
    if "writer" in results:
        checks["writer_ratio"] = results["writer"]["ratio"] >= targets["writer_ratio"]
    if "loader" in results:
        checks["loader_per_core"] = results["loader"]["samples_per_s"]["ours"] >= targets[
            "loader_samples_per_s_per_core"]
        checks["loader_ratio"] = results["loader"]["ratio"] >= targets["loader_ratio"]
    results["machine"]["load_avg_end"] = os.getloadavg()
    results["targets"], results["meets_targets"] = targets, checks
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print("targets", checks, "->", out)


if __name__ == "__main__":
    main()
