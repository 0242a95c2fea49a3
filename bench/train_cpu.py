"""CPU training throughput of the tiny GAIR config -> bench/results/train_cpu.json.

Two numbers:

* ``model``: median samples/s over timed windows of full optimiser steps on random tensors
  (``gair_model.benchmark``: forward, 4 losses with a 4096-coordinate queue, backward, AdamW).
* ``trainer``: the real trainer (``gair_model.train``, WebDataset loader on generated synthetic shards,
  single process) - median of its per-step samples/s after the first steps.

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
            "--log-every", str(steps), "--threads", str(threads), "--splits", "none", "--allow-test-split", "true",
            "--device", "cpu",
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-steps", type=int, default=3)
    p.add_argument("--trainer-steps", type=int, default=15)
    p.add_argument("--no-trainer", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = run_benchmark(
        preset_name="tiny",
        device="cpu",
        batch_size=a.batch_size,
        warmup_steps=2,
        window_steps=a.window_steps,
        windows=a.windows,
        threads=a.threads,
    )
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
                "out": str(out),
            }
        )
    )


if __name__ == "__main__":
    main()
