"""CPU training throughput of the tiny GAIR config, and the loader's rate per worker -> bench/results/train_cpu.json.

Three numbers:

* ``model``: median samples/s over timed windows of ``gair_model.training.step.train_step`` - the trainer's own
  step (forward, 4 losses with a 4096-coordinate queue, backward, AdamW) - on random tensors
  (``gair_model.benchmark``).
* ``trainer``: the real trainer (``gair_model.train``, WebDataset loader on generated synthetic shards,
  single process) - median of its per-step samples/s after the first steps.
* ``loader``: samples/s of one loader process with the ``paper`` preprocessing (3-date 96 px 10-band chips,
  480 px SV JPEGs resized to 224, bicubic RS resize, jitter, flips), i.e. per DataLoader worker, and how many
  workers one GPU needs to be fed at the 1,500 pairs/s target of the paper preset.

Usage: ``python bench/train_cpu.py [--threads N] [--batch-size 32] [--no-trainer]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gair_model.benchmark import run_benchmark  # noqa: E402
from gair_model.training.config import resolve_config  # noqa: E402

#: Pairs/s one GPU must be fed at for the paper preset (issue target on one H100/H200).
GPU_TARGET_PAIRS_PER_S = 1500.0

RESULTS = REPO / "bench" / "results" / "train_cpu.json"


def trainer_throughput(batch_size: int, steps: int, threads: int) -> dict:
    from gair_model.train import main as train_main
    from tests.synthetic_shards import write_synthetic_shards

    with tempfile.TemporaryDirectory(prefix="gair_bench_") as tmp:
        shards = Path(tmp) / "shards"
        write_synthetic_shards(shards, 256, rs_size=64, sv_size=64, samples_per_shard=64, seed=0)
        out = Path(tmp) / "run"
        args = [
            "--shards", str(shards), "--out-dir", str(out), "--preset", "tiny",
            "--batch-size", str(batch_size), "--steps", str(steps), "--save-every", "0",
            "--log-every", "1", "--threads", str(threads), "--splits", "none", "--allow-test-split", "true",
            "--device", "cpu", "--val-every", "0",
        ]  # fmt: skip
        summary = train_main(args)
        with open(out / "metrics.csv") as fh:
            rates = [float(r["samples_per_s"]) for r in csv.DictReader(fh)]
    skip = min(3, len(rates) - 1)
    return {
        "what": "gair_model.train, single process, WebDataset loader (num_workers=0) on synthetic 64 px shards",
        "batch_size": batch_size,
        "steps": steps,
        "samples_per_s_median": round(statistics.median(rates[skip:]), 3),
        "samples_per_s_steps": rates,
        "wall_seconds": summary["wall_seconds"],
    }


def loader_throughput(batches: int, threads: int) -> dict:
    """Samples/s of one loader process (= one DataLoader worker) with the paper preset's preprocessing."""
    import math

    from gair_model.loader import build_loader
    from gair_model.training.data import loader_preprocessing
    from tests.synthetic_shards import write_synthetic_shards

    paper = resolve_config({"preset": "paper"})
    batch = 32
    with tempfile.TemporaryDirectory(prefix="gair_bench_") as tmp:
        shards = Path(tmp) / "shards"
        write_synthetic_shards(shards, 256, rs_size=96, sv_size=480, samples_per_shard=64, seed=0, dates=3)
        loader = build_loader(str(shards), batch_size=batch, rs_size=paper.rs_img_size, sv_size=paper.sv_img_size,
                              resampled=True, shuffle_buffer=100, num_workers=0, seed=0, splits=None,
                              sv_train_aug=True, rs_train_aug=True, **loader_preprocessing(paper))
        it = iter(loader)
        next(it)  # opens the shards
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            rates.append(batches * batch / (time.perf_counter() - t0))
    per_worker = statistics.median(rates)
    return {"what": "build_loader, one process (num_workers=0), paper preprocessing: 3-date 96 px 10-band chips, "
                    "480 px SV JPEGs -> 224 px, bicubic RS resize, three-band jitter, SV flip + jitter",
            "torch_threads": threads, "batch_size": batch, "samples_per_s_per_worker": round(per_worker, 1),
            "samples_per_s_windows": [round(r, 1) for r in rates],
            "gpu_target_pairs_per_s": GPU_TARGET_PAIRS_PER_S,
            "workers_per_gpu_for_target": math.ceil(GPU_TARGET_PAIRS_PER_S / per_worker)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-steps", type=int, default=3)
    p.add_argument("--trainer-steps", type=int, default=15)
    p.add_argument("--no-trainer", action="store_true")
    p.add_argument("--loader-batches", type=int, default=8, help="batches of 32 per timed loader window")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = run_benchmark(resolve_config({"preset": "tiny", "batch_size": a.batch_size, "threads": a.threads}),
                          device="cpu", warmup_steps=2, window_steps=a.window_steps, windows=a.windows)
    result = {
        "benchmark": "train_cpu",
        "config": "tiny: vit_tiny RS 64 px patch 8 (10 bands, 8x8 grid) + vit_tiny SV 64 px patch 16, embed 128",
        "samples_per_s": model["samples_per_s"],
        "model": model,
        "machine": model["machine"],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not a.no_trainer:
        result["trainer"] = trainer_throughput(a.batch_size, a.trainer_steps, a.threads)
    result["loader"] = loader_throughput(a.loader_batches, a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(
        json.dumps(
            {k: result[k] for k in ("samples_per_s",)}
            | {
                "trainer_samples_per_s": result.get("trainer", {}).get("samples_per_s_median"),
                "loader_samples_per_s_per_worker": result["loader"]["samples_per_s_per_worker"],
                "loader_workers_per_gpu_for_1500": result["loader"]["workers_per_gpu_for_target"],
                "out": str(out),
            }
        )
    )


if __name__ == "__main__":
    main()
