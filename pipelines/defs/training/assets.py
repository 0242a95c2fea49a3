"""The training asset: launches the torch trainer as an external process through Dagster Pipes (any launcher)."""

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, create_model

from gair_dataset.atomic import atomic_write_text
from gair_dataset.contract import SHARDS_JSON_NAME
from gair_model.training.config import TRAIN_PRESETS, TrainConfig, resolve_config, to_flags
from pipelines.common.policies import GPU_POOL
from pipelines.common.storage import DataRoot
from pipelines.defs.shards.assets import shards
from pipelines.defs.training.launchers import run_training
from pipelines.partitions import REGIONS


def _preset_default(name: str) -> tuple[Any, Any]:
    """A trainer field as a Dagster config field: optional, None meaning the preset's value."""
    f = TrainConfig.model_fields[name]
    annotation: Any = f.annotation
    return (annotation | None, Field(default=None, description=f"{f.description} (unset: the preset's value)"))


#: Trainer fields a Dagster run can set (the asset decides where the shards and outputs are).
TRAINER_FIELDS = tuple(n for n in TrainConfig.model_fields if n not in ("preset", "shards", "out_dir", "overwrite"))

_FIELDS: dict[str, Any] = {
    "preset": (str, Field(default="tiny", description=f"preset {sorted(TRAIN_PRESETS)}: tiny = CPU smoke run, paper "
                          "= the authors' training (python -m gair_model.train --preset paper --print-config)")),
    **{name: _preset_default(name) for name in TRAINER_FIELDS},
    "nproc_per_node": (int, Field(default=1, description="processes (GPUs) on this node; >1 uses torchrun")),
    "rs_stats_samples": (int, Field(default=2000, description="samples used for the per-band RS statistics (0: the "
                                    "loader's built-in Sentinel-2 defaults)")),
    "extra_args": (list[str], Field(default_factory=list, description="more trainer flags, passed as they are")),
}
_TrainingFields = create_model("_TrainingFields", __base__=dg.Config, **_FIELDS)


class TrainingConfig(_TrainingFields):  # type: ignore[misc,valid-type]
    """What to train: a preset plus the fields you set, resolved exactly as the trainer's command line does.

    Every trainer setting of :class:`gair_model.training.config.TrainConfig` is a field here; an unset field keeps
    the preset's value (``tiny``: the CPU smoke run).
    """


def trainer_overrides(cfg: TrainingConfig) -> dict[str, Any]:
    """The trainer settings this Dagster config sets explicitly (the preset always)."""
    chosen = {name: getattr(cfg, name) for name in cfg.model_fields_set if name in TRAINER_FIELDS}
    return {"preset": cfg.preset, **dict(sorted(chosen.items()))}


def resolved_config(cfg: TrainingConfig, shard_list: list[str], out_dir: Path) -> TrainConfig:
    """The trainer configuration this Dagster config gives (what the trainer will resolve from its flags)."""
    return resolve_config({**trainer_overrides(cfg), "shards": shard_list, "out_dir": str(out_dir),
                           "overwrite": not cfg.resume}, require_shards=True)


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


@contextlib.contextmanager
def held_shard_sets(data_root: DataRoot) -> Iterator[list[str]]:
    """The complete shard sets, held for the block (:meth:`DataRoot.shard_set_lock`, shared, every region).

    A refresh of a region meanwhile builds its new set and waits to swap it in until the block ends, so training
    and evaluation read one unchanged set from start to end.
    """
    with contextlib.ExitStack() as stack:
        for region in sorted(REGIONS):
            stack.enter_context(data_root.shard_set_lock(region, shared=True))
        yield shard_set_paths(data_root)


def trainer_args(cfg: TrainingConfig, shard_list: list[str], out_dir: Path) -> list[str]:
    """The trainer's command-line flags for this config (checked by resolving them first)."""
    resolved_config(cfg, shard_list, out_dir)  # a bad value fails here, before a process is started
    # A fresh run replaces the previous run's checkpoints; resume=auto continues from them instead.
    fresh = {} if cfg.resume else {"overwrite": True}
    return to_flags({**trainer_overrides(cfg), "shards": shard_list, "out_dir": str(out_dir), **fresh}) + \
        list(cfg.extra_args)


#: The training summary fields kept in ``reports/training_summary.json`` (read by ``run_summary``).
SUMMARY_FIELDS = ("status", "steps", "final_loss", "final_val_loss", "best_val_loss", "best_val_step", "checkpoint",
                  "device", "world_size", "samples_seen", "wall_seconds")


def training_extras(cfg: TrainingConfig, shard_list: list[str], out_dir: Path, stats_path: Path) -> dict[str, Any]:
    """The Pipes extras of a training run: the same for a local subprocess and a pod on a cluster.

    Band statistics are asked of the training process (``rs_stats_samples`` > 0, written to ``rs_stats_path``)
    unless the config names a statistics file, which wins.
    """
    samples = cfg.rs_stats_samples if cfg.rs_stats is None else 0
    return {"trainer_args": trainer_args(cfg, shard_list, out_dir), "nproc_per_node": cfg.nproc_per_node,
            "out_dir": str(out_dir), "shards": shard_list,
            "rs_stats_samples": samples, "rs_stats_path": str(stats_path)}


def summary_report(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The kept summary fields of the materialization's ``summary`` metadata (missing fields as None).

    Raises:
        dg.Failure: If the training process reported no ``summary``.
    """
    entry = metadata.get("summary")
    summary = entry.value if isinstance(entry, dg.MetadataValue) else entry
    if not isinstance(summary, dict):
        raise dg.Failure("the training process reported no `summary` metadata")
    return {k: summary.get(k) for k in SUMMARY_FIELDS}


@dg.asset(group_name="training", deps=[shards], kinds={"pytorch"}, pool=GPU_POOL)
def gair_model_checkpoint(context: dg.AssetExecutionContext, config: TrainingConfig, data_root: DataRoot,
                          training_pipes_client: dg.ResourceParam[dg.PipesClient]) -> dg.MaterializeResult:
    """A GAIR checkpoint trained on the train split of every region's shards (safetensors + state).

    The trainer runs wherever ``training_pipes_client`` puts it (a local subprocess, or a pod on Kubernetes with
    the data root on a shared volume); band statistics, progress and the run summary come back through Pipes.
    """
    with held_shard_sets(data_root) as shard_list:  # a refresh meanwhile waits to swap its new set in
        out_dir = data_root.stage_dir("training") / "run"
        extras = training_extras(config, shard_list, out_dir, data_root.stage_dir("training") / "rs_stats.json")
        context.log.info("training on the shard sets of %s", [Path(p).name for p in shard_list])
        result = run_training(training_pipes_client, context, extras).get_materialize_result()
    report = data_root.stage_dir("reports") / "training_summary.json"
    atomic_write_text(report, json.dumps(summary_report(result.metadata or {}), indent=1, default=str))
    return result
