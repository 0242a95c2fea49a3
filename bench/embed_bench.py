"""Embedding export throughput on CPU (tiny preset, random weights) -> bench/results/embed.json.

On synthetic 64 px shards generated in a temporary folder, the median over ``--repeats`` runs of:

* ``loader``: the bare evaluation loader (``iter_eval_batches``: read, decode, normalise, batch) without the model,
  the baseline;
* ``model``: the forward passes alone (``embed_batch`` on batches already in memory);
* ``export``: the whole ``export_shard_embeddings`` (loader + model + GeoParquet write, atomic rename), so
  ``export / loader`` shows what the model and the writing cost on top of reading the shards;
* ``points``: ``export_point_embeddings`` of a CSV of random points (CSV parsing + location encoder + write).

Usage: ``python bench/embed_bench.py [--samples 512] [--batch-size 64] [--repeats 3] [--points 50000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import median_time, write_result  # noqa: E402
from gair_model.embed import export_point_embeddings, export_shard_embeddings  # noqa: E402
from gair_model.eval.loading import embed_batch, iter_eval_batches, random_model  # noqa: E402
from gair_model.models.gair import preset  # noqa: E402
from tests.synthetic_shards import write_synthetic_shards  # noqa: E402


def _rate(n: int, seconds: float) -> float:
    return round(n / max(seconds, 1e-9), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--points", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()
    loaded = random_model(preset("tiny"), seed=0)
    cfg = loaded.config
    with tempfile.TemporaryDirectory(prefix="gair_embed_bench_") as tmp:
        shards = Path(tmp) / "shards"
        write_synthetic_shards(shards, a.samples, rs_size=cfg.rs_img_size, sv_size=cfg.sv_img_size,
                               samples_per_shard=128, seed=0)

        def loader_pass() -> None:
            n = sum(len(b["key"]) for b in iter_eval_batches(loaded, str(shards), splits=None,
                                                             batch_size=a.batch_size))
            assert n == a.samples

        batches = list(iter_eval_batches(loaded, str(shards), splits=None, batch_size=a.batch_size))

        def model_pass() -> None:
            for b in batches:
                embed_batch(loaded, b)

        out = Path(tmp) / "emb.parquet"
        export_result: dict = {}

        def export_pass() -> None:
            export_result.update(export_shard_embeddings(loaded, str(shards), out, splits=None,
                                                         batch_size=a.batch_size, log_every=10**9))

        rng = np.random.default_rng(0)
        csv_path = Path(tmp) / "points.csv"
        pts = np.column_stack([rng.uniform(-180, 180, a.points), rng.uniform(-90, 90, a.points)])
        csv_path.write_text("id,lon,lat\n" + "".join(f"p{i},{x:.6f},{y:.6f}\n" for i, (x, y) in enumerate(pts)))

        def points_pass() -> None:
            export_point_embeddings(loaded, csv_path, Path(tmp) / "pts.parquet", log_every=10**9)

        loader_pass()  # warm the page cache and the model before timing
        model_pass()
        t_loader, loader_all = median_time(loader_pass, a.repeats)
        t_model, model_all = median_time(model_pass, a.repeats)
        t_export, export_all = median_time(export_pass, a.repeats)
        t_points, points_all = median_time(points_pass, a.repeats)
        file_mb = round(out.stat().st_size / 2**20, 2)

    loader_sps, model_sps, export_sps = (_rate(a.samples, t) for t in (t_loader, t_model, t_export))
    payload = {
        "benchmark": "embed",
        "config": "tiny preset, random weights: vit_tiny RS 64 px patch 8 (10 bands) + vit_tiny SV 64 px patch 16, "
                  "embed 128; synthetic shards, num_workers=0, CPU",
        "samples": a.samples,
        "batch_size": a.batch_size,
        "threads": a.threads,
        "repeats": a.repeats,
        "loader_samples_per_s": loader_sps,
        "model_samples_per_s": model_sps,
        "export_samples_per_s": export_sps,
        "export_vs_loader": round(export_sps / loader_sps, 3),
        "model_share_of_export_time": round(t_model / t_export, 3),
        "points": a.points,
        "points_per_s": _rate(a.points, t_points),
        "export_file_mb": file_mb,
        "dims": export_result.get("dims"),
        "load_avg_start_end": [load_start, os.getloadavg()],  # other work on the machine skews the figures
        "seconds": {"loader": loader_all, "model": model_all, "export": export_all, "points": points_all},
    }
    path = write_result("embed", payload)
    print(json.dumps({k: payload[k] for k in ("loader_samples_per_s", "model_samples_per_s", "export_samples_per_s",
                                              "export_vs_loader", "points_per_s")} | {"out": str(path)}))


if __name__ == "__main__":
    main()
