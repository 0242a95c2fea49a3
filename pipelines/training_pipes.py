"""The external training process, launched by the training asset through Dagster Pipes.

When asked (``rs_stats_samples`` > 0 in the extras) it first computes the per-band RS statistics of the shards
(train split), writes them to ``rs_stats_path`` for the trainer and reports them. It then runs
``python -m gair_model.train`` (one process) or ``torchrun --nproc_per_node=N -m gair_model.train``,
forwards the trainer's progress and validation lines to the Dagster log as they come, and at the end reports the
materialization: final metrics (train and validation loss), checkpoint path, a loss-curve plot (train loss
terms, validation loss as markers) and the trainer's whole ``summary.json`` as ``summary``. ``gair_model`` itself
never imports Dagster; only this thin wrapper speaks Pipes. On a GPU cluster the same wrapper runs inside the pod
that ``PipesK8sClient`` launches (:mod:`pipelines.defs.training.launchers`), with ``nproc_per_node`` set to the
GPUs per node: every path in the extras is on the shared data root, and nothing but Pipes messages goes back to
Dagster.
"""

import base64
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, PipesMetadataValue, open_dagster_pipes

from gair_dataset.atomic import atomic_write_text

METRICS_PREFIX = "GAIR_METRICS "
VAL_PREFIX = "GAIR_VAL "


def trainer_command(nproc: int, args: list[str]) -> list[str]:
    """The command line that starts the trainer on ``nproc`` local processes."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "gair_model.train", *args]
    return [sys.executable, "-m", "gair_model.train", *args]


def _read_val(val_csv: Path | None) -> tuple[list[int], list[float]]:
    """``(steps, val_loss)`` of ``val_metrics.csv`` (empty when absent)."""
    if val_csv is None or not val_csv.exists():
        return [], []
    rows = [r for r in csv.DictReader(val_csv.open()) if r.get("val_loss") not in (None, "")]
    return [int(r["step"]) for r in rows], [float(r["val_loss"]) for r in rows]


def loss_curve_md(metrics_csv: Path, val_csv: Path | None = None) -> str | None:
    """A PNG loss curve of ``metrics.csv`` (and the validation loss of ``val_csv``) as a markdown data URI."""
    if not metrics_csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(metrics_csv.open()))
    if not rows:
        return None
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "sv_rs", "rs_sv", "sv_loc", "rs_loc"):
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if len(vals) == len(steps):
            ax.plot(steps, vals, label=key, lw=1.5 if key == "loss" else 0.8)
    val_steps, val_loss = _read_val(val_csv)
    if val_steps:
        ax.plot(val_steps, val_loss, "o--", color="black", ms=4, lw=1.0, label="val loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title("GAIR training loss" + (" (train and val)" if val_steps else ""), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"![loss curve](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def run_trainer(cmd: list[str], info: Callable[[str], Any], warning: Callable[[str], Any],
                error: Callable[[str], Any]) -> int:
    """Run the trainer, turning its progress and validation lines into log calls; return its exit status.

    Args:
        cmd: The trainer command (:func:`trainer_command`).
        info: Called with a line per logged step and per validation.
        warning: Called with lines that look like errors.
        error: Called once with the last output lines when the trainer fails.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    assert proc.stdout is not None  # stdout=PIPE
    for raw in proc.stdout:
        line = raw.rstrip()
        tail = (tail + [line])[-40:]
        if line.startswith(METRICS_PREFIX):
            m = json.loads(line[len(METRICS_PREFIX):])
            info("step {step} loss {loss:.4f} lr {lr:.2e} {samples_per_s:.1f} samples/s".format(
                **{k: m.get(k, float("nan")) for k in ("step", "loss", "lr", "samples_per_s")}))
        elif line.startswith(VAL_PREFIX):
            v = json.loads(line[len(VAL_PREFIX):])
            info("validation at step {step}: val loss {val_loss:.4f} on {n_samples} samples".format(
                **{k: v.get(k, float("nan")) for k in ("step", "val_loss", "n_samples")}))
        elif "Traceback" in line or "Error" in line:
            warning(line)
    code = proc.wait()
    if code != 0:
        error(f"trainer failed (exit {code}); last lines:\n" + "\n".join(tail))
    return code


def band_statistics(pipes: PipesContext) -> tuple[list[str], dict[str, PipesMetadataValue]]:
    """Compute the RS band statistics the extras ask for: ``(trainer flags, metadata)``, both empty if not asked.

    The statistics are written to ``rs_stats_path`` (on the data root the trainer reads) and reported as metadata.
    """
    samples = int(pipes.get_extra("rs_stats_samples") or 0)
    if samples <= 0:
        return [], {}
    from gair_model.loader import compute_rs_stats  # torch: only when statistics are asked for

    shards = [str(p) for p in pipes.get_extra("shards")]
    stats = compute_rs_stats(shards, max_samples=samples)
    path = Path(pipes.get_extra("rs_stats_path"))
    atomic_write_text(path, json.dumps(stats, indent=1))
    pipes.log.info(f"RS band statistics from up to {samples} samples: mean {[round(v) for v in stats['mean']]}")
    meta: dict[str, PipesMetadataValue] = {"rs_stats": {"raw_value": stats, "type": "json"},
                                           "rs_stats_samples": {"raw_value": samples, "type": "int"}}
    return ["--rs-stats", str(path)], meta


def main() -> int:
    """Run the trainer under Pipes; return its exit status."""
    with open_dagster_pipes() as pipes:
        stats_flags, metadata = band_statistics(pipes)
        args = [str(a) for a in pipes.get_extra("trainer_args")] + stats_flags
        nproc = int(pipes.get_extra("nproc_per_node"))
        out_dir = Path(pipes.get_extra("out_dir"))
        cmd = trainer_command(nproc, args)
        pipes.log.info(f"starting: {' '.join(cmd)}")
        code = run_trainer(cmd, pipes.log.info, pipes.log.warning, pipes.log.error)
        if code != 0:
            return code
        summary = json.loads((out_dir / "summary.json").read_text())
        metadata.update({
            "steps": {"raw_value": int(summary.get("steps", 0)), "type": "int"},
            "final_loss": {"raw_value": float(summary.get("final_loss", float("nan"))), "type": "float"},
            "checkpoint": {"raw_value": str(summary.get("checkpoint", "")), "type": "path"},
            "summary": {"raw_value": summary, "type": "json"},
            "nproc_per_node": {"raw_value": nproc, "type": "int"},
        })
        if summary.get("final_val_loss") is not None:
            metadata["final_val_loss"] = {"raw_value": float(summary["final_val_loss"]), "type": "float"}
            metadata["best_val_loss"] = {"raw_value": float(summary["best_val_loss"]), "type": "float"}
            metadata["best_val_step"] = {"raw_value": int(summary["best_val_step"]), "type": "int"}
        curve = loss_curve_md(out_dir / "metrics.csv", out_dir / "val_metrics.csv")
        if curve:
            metadata["loss_curve"] = {"raw_value": curve, "type": "md"}
        pipes.report_asset_materialization(metadata=metadata)
    return 0


if __name__ == "__main__":
    sys.exit(main())
