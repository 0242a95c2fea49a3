"""Evaluation assets: is the trained model geo-aligned, and how good are its representations on real tasks.

- ``eval_alignment``: the geo-alignment benchmark on the test split of every shard set (retrieval, in-tile
  localisation, offset rings), for the trained checkpoint and the same architecture with random weights.
- ``eval_location`` / ``eval_streetview`` / ``eval_remote_sensing``: frozen-encoder probes on the tasks of the
  registry (``config/eval_tasks.yaml``), one asset per task family so that one family can be rerun alone.
- ``gair_embeddings``: SV, localised-RS, global-RS and location embeddings of every shard set, as GeoParquet.
- ``evaluation_report``: ``reports/evaluation.md`` + ``evaluation.json`` + plots from the above.

The work itself is done by :mod:`gair_model.eval` and :mod:`gair_model.embed`; these assets wire paths and config,
log progress and put the figures in the materialization metadata.
"""

import json
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from gair_dataset.atomic import atomic_write_text
from gair_model.eval.loading import LoadedModel, ModelLoadError, load_trained, random_model, read_checkpoint_config
from gair_model.eval.report import (
    build_evaluation,
    downstream_results,
    probe_scores_figure,
    render_markdown,
    save_figure,
    write_report,
)
from pipelines.common.plots import figure_md, png_md
from pipelines.common.policies import GPU_POOL
from pipelines.common.storage import DataRoot
from pipelines.defs.evaluation.resources import EvalTasks
from pipelines.defs.shards.assets import shards
from pipelines.defs.training.assets import gair_model_checkpoint, held_shard_sets, shard_sets

#: Task families, each its own asset (``eval_<family>``).
FAMILIES = ("location", "streetview", "remote_sensing")


class EvalConfig(dg.Config):
    """Which model to evaluate, and how."""

    checkpoint: str = Field(default="", description="training run folder, checkpoint folder or .safetensors "
                            "('' = the run of the gair_model_checkpoint asset)")
    device: str = Field(default="cpu", description="cpu | cuda | auto")
    batch_size: int = Field(default=64, description="samples per forward pass")
    random_seed: int = Field(default=0, description="seed of the random-weights baseline model")


class AlignmentConfig(EvalConfig):
    """Geo-alignment benchmark settings."""

    grid: int = Field(default=48, description="positions per side queried inside each tile (in-tile localisation)")
    splits: list[str] = Field(default_factory=lambda: ["test"], description="splits evaluated (never train)")


class DownstreamConfig(EvalConfig):
    """Downstream-probe settings."""

    tasks: list[str] = Field(default_factory=list, description="run only these tasks of the family ([] = all)")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def training_run_dir(data_root: DataRoot) -> Path:
    """Where the training asset writes its run (checkpoints, config.json, summary.json)."""
    return data_root.path / "training" / "run"


def load_models(config: EvalConfig, data_root: DataRoot) -> tuple[LoadedModel, LoadedModel]:
    """The trained model and the random-weights model of the same architecture (same RS statistics)."""
    path = Path(config.checkpoint) if config.checkpoint else training_run_dir(data_root)
    try:
        trained = load_trained(path, device=_device(config.device))
    except ModelLoadError as exc:
        raise dg.Failure(f"no model to evaluate: {exc}. Materialize `gair_model_checkpoint` first or set "
                         "`checkpoint` in the config.") from exc
    baseline = random_model(trained.config, seed=config.random_seed, device=_device(config.device),
                            rs_stats=trained.rs_stats, preprocessing=trained.preprocessing)
    baseline.label = "random_init"
    return trained, baseline


def eval_dir(data_root: DataRoot) -> Path:
    """``<data root>/evaluation``: each evaluation asset's JSON output."""
    return data_root.stage_dir("evaluation")


def write_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically (a reader never sees half a file)."""
    return atomic_write_text(path, json.dumps(payload, indent=1, default=str))


@dg.asset(group_name="evaluation", deps=[gair_model_checkpoint, shards], kinds={"pytorch"}, pool=GPU_POOL)
def eval_alignment(context: dg.AssetExecutionContext, config: AlignmentConfig,
                   data_root: DataRoot) -> dg.MaterializeResult:
    """Geo-alignment benchmark (test split): retrieval, in-tile localisation and offset rings, model vs baselines."""
    with held_shard_sets(data_root) as shard_list:
        return _eval_alignment(context, config, data_root, shard_list)


def _eval_alignment(context: dg.AssetExecutionContext, config: AlignmentConfig, data_root: DataRoot,
                    shard_list: list[str]) -> dg.MaterializeResult:
    """The body of :func:`eval_alignment`, with the shard sets held."""
    from gair_model.eval.alignment import benchmark_alignment
    from gair_model.eval.alignment_plots import plot_localisation_examples, plot_offset_rings

    if "train" in config.splits:
        raise dg.Failure("the alignment benchmark never evaluates the train split")
    trained, baseline = load_models(config, data_root)
    results = {}
    t0 = time.perf_counter()
    for lm in (trained, baseline):
        context.log.info("alignment benchmark: %s model (%s localiser) on splits %s of %d shard sets",
                         lm.label, lm.config.localizer, config.splits, len(shard_list))
        try:
            results[lm.label] = benchmark_alignment(lm, shard_list, splits=tuple(config.splits), grid=config.grid,
                                                    batch_size=config.batch_size, log=context.log.info)
        except ValueError as exc:
            # No held-out sample (e.g. a one-tile region): say so in the report instead of losing the report.
            context.log.warning("alignment benchmark not run: %s", exc)
            out = write_json(eval_dir(data_root) / "alignment.json",
                             {"checkpoint": trained.checkpoint, "step": trained.step, "splits": config.splits,
                              "skipped": str(exc)})
            return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(out)), "skipped": str(exc)})
    summaries = {k: v.summary for k, v in results.items()}
    out = write_json(eval_dir(data_root) / "alignment.json",
                     {"checkpoint": trained.checkpoint, "step": trained.step, "splits": config.splits,
                      "results": summaries, "wall_s": round(time.perf_counter() - t0, 3)})
    reports = data_root.stage_dir("reports")
    rings_png = save_figure(plot_offset_rings(summaries), reports / "evaluation_offset_rings.png")
    examples_png = save_figure(plot_localisation_examples(trained, shard_list, results[trained.label], n=6,
                                                          splits=tuple(config.splits)),
                               reports / "evaluation_examples.png")
    model, rand = summaries[trained.label], summaries[baseline.label]
    loc, ret = model["localisation"], model["retrieval"]
    context.log.info("SV->RS R@1 %.3f (random weights %.3f); in-tile median error %.0f m (tile centre answer %.0f m)",
                     ret["sv_to_rs"]["recall@1"], rand["retrieval"]["sv_to_rs"]["recall@1"],
                     loc["model"]["median_m"], loc["centre_baseline"]["median_m"])
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)),
        "checkpoint": dg.MetadataValue.path(str(trained.checkpoint)),
        "splits": dg.MetadataValue.json(config.splits),
        "rs_stats_source": trained.rs_stats_source,
        "num_samples": int(model["n_samples"]),
        "num_tiles": int(model["n_tiles"]),
        "sv_to_rs_recall@1": float(ret["sv_to_rs"]["recall@1"]),
        "sv_to_rs_recall@1_random_init": float(rand["retrieval"]["sv_to_rs"]["recall@1"]),
        "sv_to_rs_recall@1_chance": float(ret["sv_to_rs"]["chance_recall@1"]),
        "sv_to_location_median_km": float(ret["sv_to_loc"]["median_error_km"]),
        "localisation_median_error_m": float(loc["model"]["median_m"]),
        "localisation_median_error_m_tile_centre": float(loc["centre_baseline"]["median_m"]),
        "localisation_within_one_cell": float(loc["model"]["within_cell"]),
        "offset_rings_plot": png_md(rings_png, "offset rings"),
        "examples_plot": png_md(examples_png, "examples"),
        "summary": dg.MetadataValue.json({k: {"retrieval": v["retrieval"], "localisation": v["localisation"]}
                                          for k, v in summaries.items()}),
    })


def _downstream_table_md(rows: list[dict]) -> str:
    evaluation = {"results": downstream_results(rows), "skipped": [
        {"task": r["task"], "family": r.get("family"), "reason": r["skipped"]} for r in rows if "skipped" in r]}
    text = render_markdown(evaluation)
    start = text.find("## Downstream")
    end = text.find("## Localiser")
    return text[start:end].strip()


def _downstream_asset(family: str) -> dg.AssetsDefinition:
    @dg.asset(name=f"eval_{family}", group_name="evaluation", deps=[gair_model_checkpoint], kinds={"scikitlearn"},
              pool=GPU_POOL,
              description=f"Frozen-encoder probes on the registry's {family} tasks: the trained model next to "
                          "random weights (and, for locations, raw coordinates and pretrained GeoCLIP).")
    def _asset(context: dg.AssetExecutionContext, config: DownstreamConfig, data_root: DataRoot,
               eval_tasks: EvalTasks) -> dg.MaterializeResult:
        from gair_model.eval.downstream import run_tasks
        from gair_model.eval.tasks import load_task_specs

        try:
            tasks = load_task_specs(eval_tasks.tasks_path)
        except (ValueError, FileNotFoundError) as exc:
            raise dg.Failure(f"task registry {eval_tasks.tasks_path}: {exc}") from exc
        tasks = [t for t in tasks if t.family == family and (not config.tasks or t.name in config.tasks)]
        unknown = sorted(set(config.tasks) - {t.name for t in tasks})
        if unknown:
            raise dg.Failure(f"unknown {family} task(s) {unknown} in {eval_tasks.tasks_path}")
        trained, baseline = load_models(config, data_root)
        t0 = time.perf_counter()
        context.log.info("%d %s task(s) from %s, data under %s", len(tasks), family, eval_tasks.tasks_path,
                         eval_tasks.data_path)
        try:
            rows = run_tasks(tasks, {"gair": trained, "random_init": baseline}, eval_tasks.data_path,
                             log=context.log.info)
        except ValueError as exc:
            raise dg.Failure(f"{family} tasks of {eval_tasks.tasks_path}: {exc}") from exc
        for r in rows:
            if "skipped" in r:
                context.log.warning("task %s skipped: %s", r["task"], r["skipped"])
        wall = round(time.perf_counter() - t0, 3)
        out = write_json(eval_dir(data_root) / f"downstream_{family}.json",
                         {"family": family, "checkpoint": trained.checkpoint, "step": trained.step,
                          "tasks_file": str(eval_tasks.tasks_path), "rows": rows, "wall_s": wall})
        ran = sorted({r["task"] for r in rows if "skipped" not in r})
        skipped = sorted({r["task"] for r in rows if "skipped" in r})
        metadata: dict[str, Any] = {
            "path": dg.MetadataValue.path(str(out)),
            "tasks_run": dg.MetadataValue.json(ran),
            "tasks_skipped": dg.MetadataValue.json(skipped),
            "results": dg.MetadataValue.md(_downstream_table_md(rows)),
            "wall_seconds": wall,
        }
        fig = probe_scores_figure(downstream_results(rows))
        if fig is not None:
            metadata["probe_scores"] = figure_md(fig, "probe scores")
        return dg.MaterializeResult(metadata=metadata)

    return _asset


eval_location, eval_streetview, eval_remote_sensing = (_downstream_asset(f) for f in FAMILIES)


@dg.asset(group_name="evaluation", deps=[gair_model_checkpoint, shards], kinds={"geoparquet"}, pool=GPU_POOL)
def gair_embeddings(context: dg.AssetExecutionContext, config: EvalConfig,
                    data_root: DataRoot) -> dg.MaterializeResult:
    """SV, localised-RS, global-RS and location embeddings of every sample of every shard set (GeoParquet)."""
    from gair_model.embed import export_shard_embeddings

    trained, _ = load_models(config, data_root)
    out_dir = data_root.stage_dir("embeddings")
    per_set: dict[str, dict] = {}
    with held_shard_sets(data_root) as shard_list:
        for shard_set in shard_list:
            name = Path(shard_set).name
            context.log.info("embedding every sample of %s", name)
            stats = export_shard_embeddings(trained, [shard_set], out_dir / f"{name}.parquet", splits=None,
                                            batch_size=config.batch_size, log=context.log.info)
            per_set[name] = stats
    rows = sum(int(s.get("n_rows", 0)) for s in per_set.values())
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out_dir)),
        "num_rows": rows,
        "per_shard_set": dg.MetadataValue.json(per_set),
        "checkpoint": dg.MetadataValue.path(str(trained.checkpoint)),
    })


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _checkpoint_provenance(checkpoint: str | None) -> tuple[dict | None, int | None, dict]:
    """Model configuration and step from the checkpoint's own header; the training summary of its own run."""
    if not checkpoint or not Path(checkpoint).is_file():
        return None, None, {}
    config, step = read_checkpoint_config(checkpoint)
    summary = _read_json(Path(checkpoint).parent.parent / "summary.json") or {}
    if summary.get("checkpoint") and Path(summary["checkpoint"]).resolve() != Path(checkpoint).resolve():
        summary = {}  # the run folder has moved on to another checkpoint since
    keep = ("steps", "final_loss", "final_val_loss", "best_val_loss", "best_val_step", "wall_seconds", "device")
    return config.to_dict(), step, {k: summary.get(k) for k in keep if k in summary}


@dg.asset(group_name="evaluation", kinds={"markdown"},
          deps=[eval_alignment, eval_location, eval_streetview, eval_remote_sensing,
                dg.AssetKey("localizer_ablation")])
def evaluation_report(context: dg.AssetExecutionContext, data_root: DataRoot) -> dg.MaterializeResult:
    """``reports/evaluation.md`` + ``evaluation.json`` + plots: every evaluation's model and baseline values."""
    from gair_model.eval.downstream import rgb_to_bands_note

    edir = data_root.path / "evaluation"
    alignment = _read_json(edir / "alignment.json") or {}
    family_docs = {f: _read_json(edir / f"downstream_{f}.json") for f in FAMILIES}
    ablation = _read_json(edir / "ablation.json")
    if not alignment and not any(family_docs.values()) and not ablation:
        raise dg.Failure("nothing to report: materialize eval_alignment, an eval_<family> asset or "
                         "localizer_ablation first")
    # One report = one checkpoint: inputs computed on another checkpoint are left out and named.
    checkpoint = alignment.get("checkpoint") or next((d["checkpoint"] for d in family_docs.values() if d), None)
    stale: list[str] = []
    if alignment and alignment.get("checkpoint") != checkpoint:
        stale.append("eval_alignment")
        alignment = {}
    for f, doc in family_docs.items():
        if doc and doc.get("checkpoint") != checkpoint:
            stale.append(f"eval_{f}")
            family_docs[f] = None
    rows = [r for doc in family_docs.values() if doc for r in doc["rows"]]
    model_config, step, training = _checkpoint_provenance(checkpoint)
    synthetic = any((data_root.read_stats("shards", Path(s).name) or {}).get("synthetic", False)
                    or (data_root.read_stats("stac", Path(s).name) or {}).get("synthetic", False)
                    for s in (shard_sets(data_root)))
    walls = {"alignment": alignment.get("wall_s", 0.0)} if alignment else {}
    walls.update({f"downstream_{f}": d["wall_s"] for f, d in family_docs.items() if d})
    notes = [rgb_to_bands_note()]
    missing = [f for f, d in family_docs.items() if d is None]
    if missing:
        notes.append(f"Task families not evaluated yet (materialize eval_<family>): {', '.join(missing)}.")
    if not alignment:
        notes.append("The geo-alignment benchmark has not run yet for this checkpoint (materialize eval_alignment).")
    if stale:
        notes.append(f"Left out, computed on another checkpoint than {checkpoint}: {', '.join(stale)} "
                     "(materialize them again).")
    if ablation:
        notes.append("The localiser ablation trains its own models (its budget is in its section); it does not "
                     "evaluate the checkpoint above.")
    evaluation = build_evaluation(
        checkpoint=checkpoint, step=step, model_config=model_config, alignment=alignment.get("results"),
        alignment_skipped=alignment.get("skipped"), downstream_rows=rows, ablation=ablation,
        synthetic_data=synthetic, training=training, notes=notes, wall_s=walls)
    reports = data_root.stage_dir("reports")
    figures = {"probe_scores": probe_scores_figure(evaluation["results"])}
    written = write_report(reports, evaluation, figures,
                           extra_plots={title: name for title, name in (
                               ("offset rings", "evaluation_offset_rings.png"),
                               ("examples", "evaluation_examples.png"),
                               ("localizer ablation", "ablation_offset_rings.png"))
                               if (reports / name).is_file()})
    context.log.info("evaluation report: %d results, %d skipped tasks -> %s", len(evaluation["results"]),
                     len(evaluation["skipped"]), written["md"])
    metadata: dict[str, Any] = {
        "path": dg.MetadataValue.path(str(written["md"])),
        "json": dg.MetadataValue.path(str(written["json"])),
        "num_results": len(evaluation["results"]),
        "tasks_skipped": dg.MetadataValue.json(evaluation["skipped"]),
        "report": dg.MetadataValue.md(written["md"].read_text()),
    }
    for name in ("probe_scores",):
        if name in written:
            metadata[f"{name}_plot"] = png_md(written[name], name)
    for name in ("evaluation_offset_rings", "evaluation_examples", "ablation_offset_rings"):
        if (reports / f"{name}.png").is_file():
            metadata[f"{name}_plot"] = png_md(reports / f"{name}.png", name)
    return dg.MaterializeResult(metadata=metadata)
