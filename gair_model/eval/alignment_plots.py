"""Figures of the geo-alignment benchmark (:mod:`gair_model.eval.alignment`).

Every function returns a :class:`matplotlib.figure.Figure` drawn on an Agg canvas, without pyplot (no global figure
registry, no GUI backend); the caller saves it (``fig.savefig(path)``).

* :func:`plot_offset_rings`: localisation error by offset ring, model(s) vs the tile-centre baseline.
* :func:`plot_localisation_examples`: RS chips (RGB) with the true and predicted SV positions, beside the SV image.
* :func:`plot_similarity_heatmap`: the similarity map over the localisation grid for one sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gair_model.eval.alignment import AlignmentResult
from gair_model.eval.loading import LoadedModel, iter_eval_batches
from gair_model.loader import IMAGENET_MEAN, IMAGENET_STD

#: Sentinel-2 bands shown as red, green, blue.
RGB_BANDS = ("B04", "B03", "B02")
_BASELINE_COLOUR = "0.6"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _as_results(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """One summary (it has ``rings``) or a mapping ``name -> summary``, as the latter."""
    if "rings" in results:
        return {str(results.get("localizer") or "model"): results}
    return {str(k): v for k, v in results.items()}


def _ring_value(entry: Mapping[str, Any], part: str, metric: str) -> float:
    block = entry.get(part)
    value = block.get(metric) if block else None
    return float(value) if value is not None else np.nan


def plot_offset_rings(results: Mapping[str, Any], *, metric: str | None = None) -> Figure:
    """Localisation error and share within one token cell by offset ring, model(s) vs the centre baseline.

    Args:
        results: A :func:`~gair_model.eval.alignment.run_alignment_benchmark` summary, or a mapping
            ``localiser name -> summary`` (one bar per localiser in each ring; the centre baseline is drawn from the
            first summary).
        metric: Error metric of the left panel (``median_m``, ``median_px``, ``median_frac``, ``p90_m``...);
            default: ``median_m`` when metres are known, else ``median_px``.

    Returns:
        A figure with two panels (error, within one token cell).
    """
    res = _as_results(results)
    first = next(iter(res.values()))
    rings = first["rings"]
    if metric is None:
        has_m = any(r.get("model") and r["model"].get("median_m") is not None for r in rings)
        metric = "median_m" if has_m else "median_px"
    unit = {"m": "m", "px": "tile px", "frac": "tile fraction"}.get(metric.rsplit("_", 1)[-1], "")
    labels = [f"{r['lo']:.1f}-{r['hi']:.2f}\nn={r['n']}" for r in rings]
    x = np.arange(len(rings))
    series = [(name, [_ring_value(r, "model", metric) for r in s["rings"]]) for name, s in res.items()]
    cells = [(name, [_ring_value(r, "model", "within_cell") for r in s["rings"]]) for name, s in res.items()]
    base = [_ring_value(r, "centre_baseline", metric) for r in rings]
    base_cells = [_ring_value(r, "centre_baseline", "within_cell") for r in rings]

    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    width = 0.8 / (len(series) + 1)
    error_label = f"{metric.split('_', 1)[0]} localisation error ({unit})"
    for ax, data, baseline, ylabel in ((axes[0], series, base, error_label),
                                       (axes[1], cells, base_cells, "share within one token cell")):
        for i, (name, values) in enumerate(data):
            ax.bar(x + (i - len(data) / 2) * width, values, width, label=name)
        ax.bar(x + (len(data) / 2) * width, baseline, width, label="tile centre", color=_BASELINE_COLOUR,
               hatch="//", edgecolor="white")
        for j, r in enumerate(rings):
            if r.get("empty") or not r["n"]:
                ax.text(x[j], 0, "empty", ha="center", va="bottom", fontsize=8, color="0.4")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel("distance of the SV from the tile centre (tile fraction)")
        ax.set_ylabel(ylabel)
    axes[1].set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle("In-tile localisation by offset ring")
    return fig


def _rgb_indices(meta: Mapping[str, Any], n_bands: int) -> list[int]:
    names = [str(b) for b in meta.get("bands") or []]
    if all(b in names for b in RGB_BANDS) and len(names) == n_bands:
        return [names.index(b) for b in RGB_BANDS]
    return [2, 1, 0] if n_bands >= 3 else [0] * 3


def rs_rgb(chip: np.ndarray, meta: Mapping[str, Any] | None = None, *, percentiles: tuple[float, float] = (2, 98)
           ) -> np.ndarray:
    """An ``H x W x 3`` display image in [0, 1] of a ``C x H x W`` RS chip (B04, B03, B02, percentile-stretched)."""
    chip = np.asarray(chip, dtype=np.float32)
    rgb = chip[_rgb_indices(meta or {}, chip.shape[0])].transpose(1, 2, 0)
    lo, hi = np.percentile(rgb, percentiles, axis=(0, 1))
    return np.clip((rgb - lo) / np.maximum(hi - lo, 1e-6), 0, 1)


def sv_display(sv: np.ndarray) -> np.ndarray:
    """An ``H x W x 3`` display image in [0, 1] of a loader SV tensor (``3 x H x W``, ImageNet-normalised)."""
    img = np.asarray(sv, dtype=np.float32).transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(img, 0, 1)


def pick_examples(result: AlignmentResult, n: int = 6) -> list[str]:
    """``n`` sample keys spread over the offset range (evenly spaced in offset order), deterministic."""
    table = result.per_sample.sort_values(["offset", "key"], kind="stable")
    idx = np.unique(np.linspace(0, len(table) - 1, num=min(n, len(table))).round().astype(int))
    return [str(k) for k in table["key"].iloc[idx]]


def fetch_samples(loaded: LoadedModel, shards: str | Sequence[str], keys: Sequence[str], *,
                  splits: Sequence[str] | None = ("test",), batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """The loader view (``rs``, ``sv`` as numpy, ``meta``) of the given sample keys, read from the shards."""
    wanted, found = set(keys), {}
    for batch in iter_eval_batches(loaded, shards, splits=splits, batch_size=batch_size):
        for i, key in enumerate(batch["key"]):
            if key in wanted:
                found[key] = {"rs": batch["rs"][i].numpy(), "sv": batch["sv"][i].numpy(), "meta": batch["meta"][i]}
        if len(found) == len(wanted):
            break
    return found


def _mark_positions(ax: Axes, row: pd.Series) -> None:
    ax.plot(row["x"], row["y"], "o", ms=9, mfc="none", mec="lime", mew=2, label="true")
    ax.plot(row["pred_x"], row["pred_y"], "x", ms=9, color="red", mew=2, label="predicted")
    ax.plot(0.5, 0.5, "+", ms=8, color="white", mew=1.5, label="tile centre")


def plot_localisation_examples(loaded: LoadedModel, shards: str | Sequence[str], result: AlignmentResult, *,
                               n: int = 6, keys: Sequence[str] | None = None,
                               splits: Sequence[str] | None = ("test",), heatmap: bool = False,
                               batch_size: int = 64) -> Figure:
    """RS chips with the true and predicted SV positions, each beside its SV image.

    Args:
        loaded: The model the result was computed with (its loader view of the chips is shown).
        shards: The shard set of the result.
        result: :func:`~gair_model.eval.alignment.benchmark_alignment` output.
        n: Number of examples (spread over the offset range) when ``keys`` is not given.
        keys: Sample keys to show.
        splits: Splits the result was computed on.
        heatmap: Overlay the similarity map on the chip.
        batch_size: Loader batch size while looking for the samples.

    Returns:
        A figure with two (chip, SV) pairs per row.
    """
    keys = list(keys) if keys is not None else pick_examples(result, n)
    samples = fetch_samples(loaded, shards, keys, splits=splits, batch_size=batch_size)
    table = result.per_sample.reset_index(drop=True)
    index = {k: i for i, k in enumerate(table["key"])}
    keys = [k for k in keys if k in samples and k in index]
    n_rows = max(1, (len(keys) + 1) // 2)
    fig = _figure(12, 3.2 * n_rows)
    axes = np.atleast_2d(fig.subplots(n_rows, 4))
    for ax in axes.ravel():
        ax.set_axis_off()
    for j, key in enumerate(keys):
        i, sample = index[key], samples[key]
        row = table.iloc[i]
        ax_rs, ax_sv = axes[j // 2, 2 * (j % 2)], axes[j // 2, 2 * (j % 2) + 1]
        ax_rs.imshow(rs_rgb(sample["rs"], sample["meta"]), extent=(0, 1, 1, 0), interpolation="nearest")
        if heatmap:
            ax_rs.imshow(result.scores[i], extent=(0, 1, 1, 0), cmap="magma", alpha=0.35, interpolation="nearest")
        _mark_positions(ax_rs, row)
        ax_rs.set_xlim(0, 1)
        ax_rs.set_ylim(1, 0)
        err = f"{row['err_m']:.0f} m" if np.isfinite(row["err_m"]) else f"{row['err_px']:.1f} px"
        flag = " (degenerate)" if row["degenerate"] else ""
        ax_rs.set_title(f"{key}\nerror {err}, offset {row['offset']:.2f}{flag}", fontsize=8)
        ax_sv.imshow(sv_display(sample["sv"]))
        ax_sv.set_title(f"SV rank {row['sv_to_rs_rank']:.0f} of {len(table)}", fontsize=8)
    if keys:
        axes[0, 0].legend(loc="lower left", fontsize=7, framealpha=0.6)
    fig.suptitle(f"In-tile localisation examples ({result.summary.get('localizer', 'model')})")
    return fig


def plot_similarity_heatmap(result: AlignmentResult, sample: int | str = 0) -> Figure:
    """The SV-to-localised-RS similarity over the localisation grid of one sample.

    Args:
        result: :func:`~gair_model.eval.alignment.benchmark_alignment` output.
        sample: Row index or key of the sample.

    Returns:
        A figure with the map, the true and predicted positions and a colour bar.
    """
    table = result.per_sample.reset_index(drop=True)
    i = int(np.flatnonzero(table["key"].to_numpy() == sample)[0]) if isinstance(sample, str) else int(sample)
    row = table.iloc[i]
    fig = _figure(5.2, 4.4)
    ax = fig.subplots()
    im = ax.imshow(result.scores[i], extent=(0, 1, 1, 0), cmap="magma", interpolation="nearest")
    _mark_positions(ax, row)
    ax.set_xlabel("x (tile fraction, from the left)")
    ax.set_ylabel("y (tile fraction, from the top)")
    ax.set_title(f"{row['key']}: cosine(SV, localised RS)", fontsize=9)
    ax.legend(loc="lower left", fontsize=7, framealpha=0.6)
    fig.colorbar(im, ax=ax, shrink=0.85)
    return fig
