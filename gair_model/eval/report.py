"""The evaluation report: ``evaluation.json`` (flat, machine-readable) and ``evaluation.md`` (for people) + plots.

Inputs are what the evaluation steps return: the geo-alignment benchmark per model (``trained``, ``random_init``;
see :func:`gair_model.eval.alignment.run_alignment_benchmark`), the downstream probe rows (see
:func:`gair_model.eval.downstream.run_tasks`) and, when it was run, the localiser ablation. Every number in the
report is one of those inputs; nothing is computed here but tables, pivots and plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from gair_dataset.atomic import atomic_write, atomic_write_text

#: Metrics reported per task type, the first one is the headline.
METRICS = {"regression": ("r2", "mae"), "classification": ("accuracy", "macro_f1")}
#: Order of the methods in tables (others follow alphabetically).
METHOD_ORDER = ("gair", "random_init", "raw_lonlat_rad", "geoclip_pretrained")
#: Which direction is better for each metric (True: higher is better).
HIGHER_IS_BETTER = {"r2": True, "mae": False, "accuracy": True, "macro_f1": True, "recall@1": True,
                    "recall@5": True, "recall@10": True, "median_rank": False, "median_error_km": False,
                    "within_1km": True, "median_m": False, "p90_m": False, "median_px": False, "median_frac": False,
                    "within_cell": True, "tile_hit@1": True}


def _ordered(methods: Sequence[str]) -> list[str]:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def _num(v: Any) -> float | None:
    """A finite float or None (JSON has no NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------------------------------------
# flat results
# ---------------------------------------------------------------------------------------------------------------
def downstream_results(rows: Sequence[Mapping[str, Any]], *, model_method: str = "gair") -> list[dict[str, Any]]:
    """Pivot probe rows into one result per (task, probe, metric): the model's value and every baseline's.

    Args:
        rows: Rows of :func:`gair_model.eval.downstream.run_tasks` (skipped rows are ignored here).
        model_method: The method that is "the model"; every other method is a baseline.

    Returns:
        Flat result records with ``task``, ``family``, ``type``, ``probe``, ``metric``, ``value``, ``baselines``
        (method -> value), ``n_train``, ``n_test``, ``seed``, ``wall_s`` and ``checkpoint``.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        if "skipped" in r:
            continue
        groups.setdefault((r["task"], r["probe"]), []).append(r)
    out = []
    for (task, probe), rs in groups.items():
        first = rs[0]
        by_method = {r["method"]: r for r in rs}
        model_row = by_method.get(model_method)
        for metric in METRICS.get(first["type"], tuple(first["metrics"])):
            out.append({
                "task": task, "family": first["family"], "encoder": first.get("encoder"), "type": first["type"],
                "target": first.get("target"), "probe": probe, "metric": metric,
                "value": _num(model_row["metrics"].get(metric)) if model_row else None,
                "baselines": {m: _num(r["metrics"].get(metric)) for m, r in by_method.items() if m != model_method},
                "n_train": first["n_train"], "n_test": first["n_test"], "seed": first.get("seed"),
                "wall_s": round(sum(float(r.get("wall_s", 0.0)) for r in rs), 3),
                "checkpoint": model_row.get("checkpoint") if model_row else None,
            })
    return out


def alignment_results(by_model: Mapping[str, Mapping[str, Any]], *, model_label: str = "trained",
                      checkpoint: str | None = None) -> list[dict[str, Any]]:
    """Flat results of the geo-alignment benchmark: the trained model against random init and the centre answer.

    Args:
        by_model: Benchmark dicts keyed by model label (``trained``, ``random_init``, ...).
        model_label: Which key is the model.
        checkpoint: The model's checkpoint (recorded with each result).

    Returns:
        Flat result records (``task`` prefixed ``alignment/``).
    """
    model = by_model.get(model_label)
    if not model:
        return []
    others = {k: v for k, v in by_model.items() if k != model_label}
    out: list[dict[str, Any]] = []

    def add(task: str, metric: str, getter: Any, extra_baselines: Mapping[str, Any] | None = None) -> None:
        baselines = {k: _num(getter(v)) for k, v in others.items()}
        baselines.update({k: _num(v) for k, v in (extra_baselines or {}).items()})
        out.append({"task": f"alignment/{task}", "family": "alignment", "type": "alignment", "probe": None,
                    "metric": metric, "value": _num(getter(model)), "baselines": baselines,
                    "n_train": 0, "n_test": model.get("n_samples"), "seed": None, "wall_s": model.get("wall_s"),
                    "checkpoint": checkpoint})

    for direction in ("sv_to_rs", "rs_to_sv"):
        part = model.get("retrieval", {}).get(direction, {})
        n = part.get("n") or model.get("n_samples") or 0
        chance = {"recall@1": part.get("chance_recall@1"), "recall@5": min(1.0, 5 / n) if n else None,
                  "recall@10": min(1.0, 10 / n) if n else None, "median_rank": (n + 1) / 2 if n else None,
                  "tile_hit@1": part.get("tile_chance@1")}
        for metric in ("recall@1", "recall@5", "recall@10", "median_rank", "tile_hit@1"):
            add(direction, metric, lambda d, a=direction, m=metric: d.get("retrieval", {}).get(a, {}).get(m),
                {"chance": chance[metric]})
    loc_part = model.get("retrieval", {}).get("sv_to_loc", {})
    n_loc = loc_part.get("n") or model.get("n_samples") or 0
    loc_chance = {"recall@1": {"chance": loc_part.get("chance_recall@1")},
                  "median_error_km": {"chance": loc_part.get("chance_median_error_km"),
                                      "best_constant": loc_part.get("best_constant_median_error_km")},
                  "within_1km": {}}
    for metric in ("recall@1", "median_error_km", "within_1km"):
        add("sv_to_location", metric, lambda d, m=metric: d.get("retrieval", {}).get("sv_to_loc", {}).get(m),
            loc_chance[metric] if n_loc else {})
    centre = model.get("localisation", {}).get("centre_baseline", {})
    for metric in ("median_m", "p90_m", "median_px", "median_frac", "within_cell"):
        add("in_tile_localisation", metric, lambda d, m=metric: d.get("localisation", {}).get("model", {}).get(m),
            {"tile_centre": centre.get(metric)})
    return out


def build_evaluation(*, checkpoint: str | None, step: int | None, model_config: Mapping[str, Any] | None,
                     alignment: Mapping[str, Mapping[str, Any]] | None = None, alignment_skipped: str | None = None,
                     downstream_rows: Sequence[Mapping[str, Any]] = (),
                     ablation: Mapping[str, Any] | None = None, training: Mapping[str, Any] | None = None,
                     synthetic_data: bool | None = None, notes: Sequence[str] = (),
                     wall_s: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Assemble ``evaluation.json``.

    Args:
        checkpoint: The evaluated checkpoint.
        step: Its optimiser step.
        model_config: Its model configuration.
        alignment: Geo-alignment benchmark dicts keyed by model label (``trained`` first).
        alignment_skipped: Why the alignment benchmark did not run (e.g. no held-out sample), if it did not.
        downstream_rows: Probe rows of every task family (skipped tasks included).
        ablation: The localiser ablation (``{"budget": {...}, "runs": {localizer: benchmark}}``) or None.
        training: The training run's summary (final train/val loss).
        synthetic_data: Whether the shards the model saw are synthetic.
        notes: Free-text notes (e.g. how RGB is mapped onto the RS bands).
        wall_s: Wall time per evaluation step.

    Returns:
        The JSON-serialisable evaluation record.
    """
    results = alignment_results(alignment or {}, checkpoint=checkpoint) + downstream_results(downstream_rows)
    skipped = [{"task": r["task"], "family": r.get("family"), "method": r.get("method"), "reason": r["skipped"]}
               for r in downstream_rows if "skipped" in r]
    seeds = sorted({r["seed"] for r in downstream_rows if r.get("seed") is not None})
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "checkpoint": checkpoint, "step": step, "model_config": dict(model_config or {}),
        "synthetic_data": synthetic_data, "seeds": {"probe_split": seeds},
        "training": dict(training or {}),
        "results": results, "headline": headline(results), "skipped": skipped,
        "alignment": {k: dict(v) for k, v in (alignment or {}).items()}, "alignment_skipped": alignment_skipped,
        "downstream": [dict(r) for r in downstream_rows],
        "ablation": dict(ablation) if ablation else None,
        "notes": list(notes), "wall_s": dict(wall_s or {}),
    }


#: The alignment metrics shown in the headline table.
HEADLINE_ALIGNMENT = {("alignment/sv_to_rs", "recall@1"), ("alignment/rs_to_sv", "recall@1"),
                      ("alignment/sv_to_location", "median_error_km"), ("alignment/in_tile_localisation", "median_m")}


def headline(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per task: its headline metric, the model's value, the best baseline and whether the model beats it.

    Headline metrics: R@1 of both retrieval directions, the SV -> location median error, the in-tile median
    error, and the ridge probe's R2 or accuracy of each downstream task.
    """
    out = []
    for r in results:
        is_align = r["family"] == "alignment"
        if is_align and (r["task"], r["metric"]) not in HEADLINE_ALIGNMENT:
            continue
        if not is_align and (r["probe"] != "ridge" or r["metric"] != METRICS[r["type"]][0]):
            continue
        higher = HIGHER_IS_BETTER.get(r["metric"], True)
        known = {k: v for k, v in r["baselines"].items() if v is not None}
        best = (max if higher else min)(known, key=known.__getitem__) if known else None
        beats = None
        if best is not None and r["value"] is not None:
            beats = r["value"] > known[best] if higher else r["value"] < known[best]
        out.append({"task": r["task"], "metric": r["metric"], "value": r["value"], "best_baseline": best,
                    "best_baseline_value": known.get(best) if best else None, "model_better": beats})
    return out


# ---------------------------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    f = _num(v)
    if f is None:
        return "–"
    if abs(f) >= 1000:
        return f"{f:,.0f}"
    return f"{f:.3f}" if abs(f) < 100 else f"{f:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _alignment_md(evaluation: Mapping[str, Any]) -> list[str]:
    align = evaluation.get("alignment") or {}
    if not align:
        reason = evaluation.get("alignment_skipped")
        return [f"_Geo-alignment benchmark not run{': ' + reason if reason else ''}._", ""]
    labels = list(align)
    first = align[labels[0]]
    splits = ", ".join(first.get("splits") or ["test"])
    out = [f"Split(s) {splits}: {first.get('n_samples')} SV samples in {first.get('n_tiles')} tiles; localiser "
           f"`{first.get('localizer')}`. Retrieval is among the test samples (cosine of L2-normalised embeddings); "
           "in-tile localisation queries the localiser on a "
           f"{first.get('localisation', {}).get('grid', '?')}x{first.get('localisation', {}).get('grid', '?')} grid "
           "of positions inside the SV's own tile and takes the best match.", ""]
    rows = [r for r in evaluation.get("results", []) if r["family"] == "alignment"]
    header = ["benchmark", "metric", *labels]
    extra = sorted({b for r in rows for b in r["baselines"] if b not in align})
    header += extra
    table = []
    for r in rows:
        vals = [_fmt(r["value"])] + [_fmt(r["baselines"].get(k)) for k in labels[1:]]
        table.append([r["task"].removeprefix("alignment/"), r["metric"], *vals,
                      *[_fmt(r["baselines"].get(b)) for b in extra]])
    out += [_table(header, table), ""]
    rings = first.get("rings") or []
    if rings:
        out += [f"In-tile localisation by the SV's distance from the tile centre (tile fractions), "
                f"`{labels[0]}` model:", ""]
        out += [_table(["ring", "n", "median error (m)", "tile centre answer (m)", "within 1 token cell",
                        "SV->RS R@1"],
                       [[f"{_fmt(r.get('lo'))}-{_fmt(r.get('hi'))}", r.get("n", 0),
                         _fmt((r.get("model") or {}).get("median_m")),
                         _fmt((r.get("centre_baseline") or {}).get("median_m")),
                         _fmt((r.get("model") or {}).get("within_cell")), _fmt(r.get("sv_to_rs_recall@1"))]
                        for r in rings]), ""]
    return out


def _downstream_md(evaluation: Mapping[str, Any]) -> list[str]:
    rows = [r for r in evaluation.get("results", []) if r["family"] != "alignment"]
    out: list[str] = []
    if not rows:
        out += ["_No downstream task ran._", ""]
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        methods = _ordered(sorted({"gair", *{m for r in fam for m in r["baselines"]}}))
        out += [f"### {family}", ""]
        out += [_table(["task", "n train/test", "probe", "metric", *methods],
                       [[r["task"], f"{r['n_train']}/{r['n_test']}", r["probe"], r["metric"],
                         *[_fmt(r["value"] if m == "gair" else r["baselines"].get(m)) for m in methods]]
                        for r in fam]), ""]
    skipped = evaluation.get("skipped") or []
    if skipped:
        out += ["Skipped (data absent or unusable, never faked):", ""]
        out += [f"- `{s['task']}` ({s.get('family')}{', method ' + s['method'] if s.get('method') else ''}): "
                f"{s['reason']}" for s in skipped]
        out.append("")
    return out


def _ablation_md(ablation: Mapping[str, Any] | None) -> list[str]:
    if not ablation:
        return ["_Not run in this evaluation: launch the `ablate_localizers` job (`make ablation`)._", ""]
    budget = ablation.get("budget", {})
    runs = ablation.get("runs", {})
    complete = all(r.get("status") == "completed" and r.get("steps") == budget.get("steps") for r in runs.values())
    head = ("Budget (identical for every run): " if complete else
            "**Not an equal budget: some runs stopped early (see status).** Budget asked: ")
    out = [head + ", ".join(f"{k} = {v}" for k, v in budget.items()), ""]
    header = ["localiser", "steps", "status", "final train loss", "final val loss", "SV->RS R@1", "RS->SV R@1",
              "in-tile median error (m)", "p90 (m)", "within 1 cell", "tile centre answer (m)", "train wall (s)"]
    table = []
    for name, run in runs.items():
        bench = run.get("benchmark", {})
        loc = bench.get("localisation", {})
        ret = bench.get("retrieval", {})
        model = loc.get("model", {})
        table.append([name, run.get("steps", "–"), run.get("status", "–"), _fmt(run.get("final_loss")),
                      _fmt(run.get("final_val_loss")), _fmt(ret.get("sv_to_rs", {}).get("recall@1")),
                      _fmt(ret.get("rs_to_sv", {}).get("recall@1")), _fmt(model.get("median_m")),
                      _fmt(model.get("p90_m")), _fmt(model.get("within_cell")),
                      _fmt(loc.get("centre_baseline", {}).get("median_m")), _fmt(run.get("wall_s"))])
    return [*out, _table(header, table), ""]


def render_ablation_markdown(ablation: Mapping[str, Any], plot: str | None = None) -> str:
    """``ablation.md``: the localiser ablation's budget and its rows side by side (and the offset-ring plot)."""
    lines = ["# Localiser ablation (equal budget)", "",
             "Each localiser trained with the same data, steps, batch, learning rate, seed and RS statistics, "
             "then evaluated with the same geo-alignment benchmark on the test split; the final val loss is measured "
             "once, at the end, on the same val batches for every run. `tile centre answer` is the error of always "
             "answering the tile centre.", ""]
    lines += _ablation_md(ablation)
    if plot:
        lines += [f"![localisation error by offset ring]({plot})", ""]
    return "\n".join(lines)


def render_markdown(evaluation: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """``evaluation.md``: what was evaluated, the tables, the plots (relative file names), notes.

    Args:
        evaluation: The record of :func:`build_evaluation`.
        plots: Plot title -> file name (relative to the markdown file).

    Returns:
        Markdown text.
    """
    cfg = evaluation.get("model_config") or {}
    training = evaluation.get("training") or {}
    lines = ["# GAIR evaluation", ""]
    if evaluation.get("synthetic_data"):
        lines += ["> **Synthetic data.** The model was trained and the alignment benchmark run on the embedded "
                  "synthetic sample: the figures test the pipeline, not the method.", ""]
    lines += [f"- Generated: {evaluation.get('generated_at')}",
              f"- Checkpoint: `{evaluation.get('checkpoint')}` (step {evaluation.get('step')})",
              f"- Model: RS `{cfg.get('rs_arch')}` {cfg.get('rs_img_size')} px / patch {cfg.get('rs_patch_size')}, "
              f"SV `{cfg.get('sv_arch')}` {cfg.get('sv_img_size')} px, embed {cfg.get('embed_dim')}, "
              f"localiser `{cfg.get('localizer')}`, location encoder `{cfg.get('location_encoder')}`"]
    if training:
        lines.append(f"- Training: {training.get('steps')} steps, final train loss {_fmt(training.get('final_loss'))}"
                     f", final val loss {_fmt(training.get('final_val_loss'))}")
    heads = headline(evaluation.get("results", []))
    if heads:
        wins = sum(1 for h in heads if h["model_better"])
        lines += ["", "## Headline", "",
                  f"The model beats its best baseline on {wins} of {len(heads)} headline metrics "
                  "(higher is better except for errors and ranks).", ""]
        lines.append(_table(["task", "metric", "model", "best baseline", "baseline value", "model better"],
                            [[h["task"], h["metric"], _fmt(h["value"]), h["best_baseline"] or "–",
                              _fmt(h["best_baseline_value"]),
                              {True: "yes", False: "no", None: "–"}[h["model_better"]]] for h in heads]))
    lines += ["", "## Geo-alignment (held-out split)", ""] + _alignment_md(evaluation)
    lines += ["## Downstream tasks (frozen encoders, linear probes)", "",
              "Protocol: one 80/20 random split (seed 42); features min-max scaled on the training split; "
              "`RidgeCV(alphas=(0.1, 1, 10), cv=3)` for regression (R2, MAE on raw targets), "
              "`RidgeClassifierCV` with the same alphas for classes (accuracy, macro-F1); kNN (k=10) beside it. "
              "`gair` is the evaluated checkpoint; `random_init` the same architecture with random weights; "
              "`raw_lonlat_rad` the coordinates in radians; `geoclip_pretrained` GeoCLIP's released location "
              "encoder (weights from the installed `geoclip` package).", ""]
    lines += _downstream_md(evaluation)
    lines += ["## Localiser ablation (equal budget)", ""] + _ablation_md(evaluation.get("ablation"))
    if plots:
        lines += ["## Plots", ""] + [f"![{title}]({name})" for title, name in plots.items()] + [""]
    notes = evaluation.get("notes") or []
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    walls = evaluation.get("wall_s") or {}
    if walls:
        lines += ["Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in walls.items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# plots and files
# ---------------------------------------------------------------------------------------------------------------
def probe_scores_figure(results: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Headline probe score per task (ridge probe), the model next to each baseline; None when nothing ran."""
    rows = [r for r in results if r["family"] != "alignment" and r["probe"] == "ridge"
            and r["metric"] == METRICS[r["type"]][0]]
    if not rows:
        return None
    methods = _ordered(sorted({"gair", *{m for r in rows for m in r["baselines"]}}))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [(r["value"] if m == "gair" else r["baselines"].get(m)) for r in rows]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=m)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['task']}\n({r['metric']})" for r in rows], fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("score (R2 or accuracy)")
    ax.set_title("Downstream probes (ridge): model vs baselines", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 90) -> Path:
    """Save a figure as PNG atomically and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def write_report(out_dir: str | Path, evaluation: Mapping[str, Any], figures: Mapping[str, Figure | None],
                 *, stem: str = "evaluation", extra_plots: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``<stem>.json``, the PNG plots and ``<stem>.md`` (last) into ``out_dir``, each atomically.

    Args:
        out_dir: Report folder.
        evaluation: The record of :func:`build_evaluation`.
        figures: File stem -> figure (``None`` entries are skipped); titles in the markdown are the stems.
        stem: Base name of the JSON and markdown files.
        extra_plots: Title -> PNG file name (in ``out_dir``) written by other steps, linked from the markdown.

    Returns:
        Written paths keyed by ``json``, ``md`` and each figure stem.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    plots: dict[str, str] = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        written[name] = save_figure(fig, out_dir / f"{stem}_{name}.png")
        plots[name.replace("_", " ")] = written[name].name
    plots.update(extra_plots or {})
    written["json"] = atomic_write_text(out_dir / f"{stem}.json", json.dumps(evaluation, indent=1, default=str))
    written["md"] = atomic_write_text(out_dir / f"{stem}.md", render_markdown(evaluation, plots))
    return written
