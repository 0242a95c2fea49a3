"""The training asset: launches the torch trainer as an external process through Dagster Pipes."""

import json
import os
import sys
from pathlib import Path

import dagster as dg
from pydantic import Field

from gair_dataset.contract import SHARDS_JSON_NAME
from gair_model.checkpoint import atomic_write_text
from gair_model.loader import compute_rs_stats
from pipelines.common.storage import DataRoot
from pipelines.defs.shards.assets import shards
from pipelines.partitions import REGIONS


class TrainingConfig(dg.Config):
    """What to train. The defaults are the tiny CPU smoke configuration; see ``gair_model.train --help``."""

    preset: str = Field(default="tiny", description="model preset (tiny for CPU, paper for two ViT-Bs)")
    steps: int = Field(default=40, description="optimiser steps")
    batch_size: int = Field(default=16, description="samples per process per micro-step")
    accum_steps: int = 1
    lr: float | None = Field(default=3e-4, description="absolute lr; None = blr * effective batch / 256")
    blr: float = 1.5e-6
    warmup_steps: int | None = 5
    val_every: int = Field(default=10, description="validate on the val split every N optimiser steps and at the "
                           "end (0: no validation); the test split is never read")
    val_batches: int = Field(default=10, description="batches (of batch_size) per validation: the same samples "
                             "every time")
    nproc_per_node: int = Field(default=1, description="processes (GPUs) on this node; >1 uses torchrun")
    device: str = Field(default="auto", description="auto | cpu | cuda")
    precision: str = "auto"
    max_minutes: float | None = Field(default=10.0, description="wall-clock budget of the run")
    num_workers: int = 0
    seed: int = 0
    resume: str | None = Field(default=None, description="'auto' to continue from the latest checkpoint")
    rs_stats_samples: int = Field(default=2000, description="samples used for the per-band RS statistics "
                                  "(0: the loader's built-in Sentinel-2 defaults)")
    extra_args: list[str] = Field(default_factory=list, description="more trainer flags, passed as they are")


def shard_sets(data_root: DataRoot) -> list[Path]:
    """Complete shard sets (with shards.json) of every declared region."""
    out = []
    for region in sorted(REGIONS):
        d = data_root.path / "shards" / region
        if (d / SHARDS_JSON_NAME).exists():
            out.append(d)
    return out


def shard_set_paths(data_root: DataRoot) -> list[str]:
    """The complete shard sets as paths, or a failure saying that `shards` must run first."""
    sets = shard_sets(data_root)
    if not sets:
        raise dg.Failure("no complete shard set under the data root: materialize `shards` first")
    return [str(d) for d in sets]


def trainer_args(cfg: TrainingConfig, shard_list: list[str], out_dir: Path) -> list[str]:
    """The trainer's command-line flags for this config."""
    args = ["--shards", *shard_list, "--out-dir", str(out_dir), "--preset", cfg.preset, "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--accum-steps", str(cfg.accum_steps), "--blr", str(cfg.blr),
            "--device", cfg.device, "--precision", cfg.precision, "--num-workers", str(cfg.num_workers),
            "--seed", str(cfg.seed), "--log-every", "5",
            "--val-every", str(cfg.val_every), "--val-batches", str(cfg.val_batches)]
    if cfg.lr is not None:
        args += ["--lr", str(cfg.lr)]
    if cfg.warmup_steps is not None:
        args += ["--warmup-steps", str(cfg.warmup_steps)]
    if cfg.max_minutes is not None:
        args += ["--max-minutes", str(cfg.max_minutes)]
    # A fresh run replaces the previous run's checkpoints; resume=auto continues from them instead.
    args += ["--resume", cfg.resume] if cfg.resume else ["--overwrite", "true"]
    return args + list(cfg.extra_args)


@dg.asset(group_name="training", deps=[shards], kinds={"pytorch"})
def gair_model_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig, data_root: DataRoot,
                          pipes_subprocess_client: dg.PipesSubprocessClient) -> dg.MaterializeResult:
    """A GAIR checkpoint trained on the train split of every region's shards (safetensors + state)."""
    shard_list = shard_set_paths(data_root)
    out_dir = data_root.stage_dir("training") / "run"
    extra: list[str] = []
    if config.rs_stats_samples > 0:
        # Per-band mean/std of these shards for the clip-and-scale normalisation (nodata ignored).
        stats = compute_rs_stats(shard_list, max_samples=config.rs_stats_samples)
        stats_path = data_root.stage_dir("training") / "rs_stats.json"
        atomic_write_text(stats_path, json.dumps(stats, indent=1))
        extra = ["--rs-stats", str(stats_path)]
        context.log.info("RS band statistics from %d samples: mean %s", config.rs_stats_samples,
                         [round(v) for v in stats["mean"]])
    context.log.info("training on the shard sets of %s", [Path(p).name for p in shard_list])
    result = pipes_subprocess_client.run(
        command=[sys.executable, "-m", "pipelines.training_pipes"],
        context=context,
        extras={"trainer_args": trainer_args(config, shard_list, out_dir) + extra,
                "nproc_per_node": config.nproc_per_node,
                "out_dir": str(out_dir)},
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ).get_materialize_result()
    summary = json.loads((out_dir / "summary.json").read_text())
    report = data_root.stage_dir("reports") / "training_summary.json"
    keep = ("status", "steps", "final_loss", "final_val_loss", "best_val_loss", "best_val_step", "checkpoint", "device",
            "world_size", "samples_seen", "wall_seconds")
    atomic_write_text(report, json.dumps({k: summary.get(k) for k in keep}, indent=1, default=str))
    return result
