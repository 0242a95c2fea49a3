"""The localiser ablation: one model per localiser, trained at equal budget, then the same alignment benchmark.

Every run uses the same shards, steps, batch, learning rate, seed and RS statistics; only ``--localizer`` differs.
The default budget is the tiny CPU preset, sized so that the five runs fit a 2-core machine in a few minutes.
"""

import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from gair_dataset.atomic import atomic_write_text
from gair_model.eval.loading import load_trained
from gair_model.loader import compute_rs_stats
from gair_model.models.nili import LOCALIZERS
from pipelines.common.plots import png_md
from pipelines.common.policies import GPU_POOL
from pipelines.common.storage import DataRoot
from pipelines.defs.evaluation.assets import eval_dir, write_json
from pipelines.defs.shards.assets import shards
from pipelines.defs.training.assets import TrainingConfig, held_shard_sets, trainer_args
from pipelines.training_pipes import run_trainer, trainer_command


class AblationConfig(dg.Config):
    """The budget shared by every run of the ablation."""

    localizers: list[str] = Field(default_factory=lambda: list(LOCALIZERS),
                                  description=f"localisers to compare ({', '.join(LOCALIZERS)})")
    preset: str = Field(default="tiny", description="model preset of every run")
    steps: int = Field(default=100, description="optimiser steps per run")
    batch_size: int = Field(default=16, description="samples per step")
    lr: float = 3e-4
    warmup_steps: int = 5
    seed: int = Field(default=0, description="model init and data-order seed, the same for every run")
    device: str = "auto"
    max_minutes: float = Field(default=10.0, description="wall-clock cap per run (a run stopped by it is flagged)")
    grid: int = Field(default=48, description="positions per side for in-tile localisation")
    rs_stats_samples: int = 2000


@dg.asset(group_name="evaluation", deps=[shards], kinds={"pytorch"}, pool=GPU_POOL)
def localizer_ablation(context: dg.AssetExecutionContext, config: AblationConfig,
                       data_root: DataRoot) -> dg.MaterializeResult:
    """NILI against mean-pool, centre, bilinear and bicubic localisers, trained at equal budget on the same data."""
    with held_shard_sets(data_root) as shard_list:  # every run sees the same sets
        return _localizer_ablation(context, config, data_root, shard_list)


def _localizer_ablation(context: dg.AssetExecutionContext, config: AblationConfig, data_root: DataRoot,
                        shard_list: list[str]) -> dg.MaterializeResult:
    """The body of :func:`localizer_ablation`, with the shard sets held."""
    from gair_model.eval.alignment import run_alignment_benchmark
    from gair_model.eval.alignment_plots import plot_offset_rings
    from gair_model.eval.report import render_ablation_markdown, save_figure

    unknown = sorted(set(config.localizers) - set(LOCALIZERS))
    if unknown or not config.localizers:
        raise dg.Failure(f"unknown localiser(s) {unknown}; choose from {list(LOCALIZERS)}")
    root = data_root.stage_dir("training") / "ablation"
    root.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if config.rs_stats_samples > 0:  # one set of RS statistics for every run
        stats_path = root / "rs_stats.json"
        atomic_write_text(stats_path, json.dumps(compute_rs_stats(shard_list, max_samples=config.rs_stats_samples)))
        extra = ["--rs-stats", str(stats_path)]
    train_cfg = TrainingConfig(preset=config.preset, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                               warmup_steps=config.warmup_steps, seed=config.seed, device=config.device,
                               max_minutes=config.max_minutes, val_every=config.steps, val_batches=10)
    budget = {"preset": config.preset, "steps": config.steps, "batch_size": config.batch_size,
              "samples_seen": config.steps * config.batch_size, "lr": config.lr, "seed": config.seed,
              "shard_sets": [Path(s).name for s in shard_list], "device": config.device}
    runs: dict[str, dict[str, Any]] = {}
    benches: dict[str, dict] = {}
    for i, loc in enumerate(config.localizers, 1):
        out_dir = root / loc
        context.log.info("[%d/%d] training with the %s localiser (%d steps x %d)", i, len(config.localizers), loc,
                         config.steps, config.batch_size)
        t0 = time.perf_counter()
        cmd = trainer_command(1, [*trainer_args(train_cfg, shard_list, out_dir), *extra, "--localizer", loc])
        if run_trainer(cmd, context.log.info, context.log.warning, context.log.error) != 0:
            raise dg.Failure(f"training with the {loc} localiser failed; see the log")
        summary = json.loads((out_dir / "summary.json").read_text())
        wall_train = time.perf_counter() - t0
        loaded = load_trained(out_dir)
        bench = run_alignment_benchmark(loaded, shard_list, grid=config.grid, log=context.log.info)
        benches[loc] = bench
        runs[loc] = {"final_loss": summary.get("final_loss"), "final_val_loss": summary.get("final_val_loss"),
                     "status": summary.get("status"), "steps": summary.get("steps"), "wall_s": round(wall_train, 1),
                     "checkpoint": summary.get("checkpoint"), "benchmark": bench}
        if summary.get("status") != "completed":
            context.log.warning("%s run stopped early (%s): budgets differ", loc, summary.get("status"))
        context.log.info("%s: in-tile median error %.0f m (tile centre answer %.0f m), SV->RS R@1 %.3f", loc,
                         bench["localisation"]["model"]["median_m"],
                         bench["localisation"]["centre_baseline"]["median_m"],
                         bench["retrieval"]["sv_to_rs"]["recall@1"])
    ablation = {"budget": budget, "runs": runs}
    out = write_json(eval_dir(data_root) / "ablation.json", ablation)
    reports = data_root.stage_dir("reports")
    png = save_figure(plot_offset_rings(benches), reports / "ablation_offset_rings.png")
    md = reports / "ablation.md"
    atomic_write_text(md, render_ablation_markdown(ablation, plot=png.name))
    table = {k: {"median_error_m": v["benchmark"]["localisation"]["model"]["median_m"],
                 "sv_to_rs_recall@1": v["benchmark"]["retrieval"]["sv_to_rs"]["recall@1"],
                 "final_loss": v["final_loss"]} for k, v in runs.items()}
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)),
        "report": dg.MetadataValue.path(str(md)),
        "budget": dg.MetadataValue.json(budget),
        "results": dg.MetadataValue.json(table),
        "offset_rings_plot": png_md(png, "ablation offset rings"),
    })
