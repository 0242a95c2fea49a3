"""The one training configuration: the trainer's flags, the presets and the Dagster ``TrainingConfig``.

:class:`TrainConfig` (pydantic) holds every setting of a run; its model fields carry the names of
:class:`gair_model.models.gair.GAIRConfig`, so the model configuration is a plain projection of it. A run is
resolved in one place, :func:`resolve_config`: the field defaults, then the preset (:data:`TRAIN_PRESETS` on top of
the model preset of the same name), then a config file, then explicit overrides (the command line, or the fields a
Dagster user set). ``python -m gair_model.train --preset paper --print-config`` prints the result.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gair_model.models.gair import PRESETS as MODEL_PRESETS
from gair_model.models.gair import GAIRConfig
from gair_model.models.location import LOCATION_ENCODERS
from gair_model.models.nili import LOCALIZERS

#: Trainer settings of each preset (the model settings come from ``gair_model.models.gair.PRESETS``).
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # CPU smoke run: what the Dagster asset and `make demo` train.
    "tiny": {"steps": 40, "batch_size": 16, "lr": 3e-4, "warmup_steps": 5, "val_every": 10, "val_batches": 10,
             "log_every": 5},
    # Our ViT-B configuration: the authors' architecture with our choices where they measured better or are
    # cheaper (see README, "The paper preset").
    "base": {"batch_size": 256},
    # The authors' training (DESIGN.md section 2, their released code): batch 256 per GPU x 96 accumulation
    # steps, blr 1.5e-6 (lr 1.44e-4 on one GPU), AdamW wd 0.05 with timm's rule, distillation 0.2 (on when
    # teacher weights are given), bicubic RS resize, colour jitter on three RS bands with p=0.7, SV resized
    # whole to 224 px.
    "paper": {"batch_size": 256, "accum_steps": 96, "blr": 1.5e-6, "weight_decay": 0.05, "wd_rule": "timm",
              "distill_weight": 0.2, "rs_resize": "bicubic", "rs_jitter": "three_bands", "rs_jitter_p": 0.7,
              "sv_resize": "full"},
}

#: A setting the user gives sends these preset values back to their field defaults (unless also given): a preset's
#: ``steps`` must not beat the user's ``epochs``, nor its ``lr`` the user's ``blr``, nor its warm-up a new length.
DEPENDENT_SETTINGS: dict[str, tuple[str, ...]] = {
    "epochs": ("steps", "warmup_steps"),
    "steps": ("epochs", "warmup_steps"),
    "blr": ("lr",),
}

#: TrainConfig fields that are GAIRConfig fields (the model part of a run).
MODEL_FIELDS: tuple[str, ...] = tuple(GAIRConfig.__dataclass_fields__)

_MODEL_DEFAULTS = GAIRConfig()


def _model_field(name: str, description: str) -> Any:
    default = getattr(_MODEL_DEFAULTS, name)
    if isinstance(default, list):
        return Field(default_factory=lambda d=list(default): list(d), description=description)
    return Field(default=default, description=description)


class TrainConfig(BaseModel):
    """Every setting of a training run (each field is also a ``--flag``; see :func:`resolve_config`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- what and where
    preset: str = Field("tiny", description=f"preset: {sorted(TRAIN_PRESETS)} (model + trainer settings)")
    shards: list[str] = Field(default_factory=list, description="shard paths, a brace pattern, a glob or a "
                              "shard-set folder")
    out_dir: str = Field("runs/gair", description="output folder (checkpoints, metrics.csv, summary.json)")
    overwrite: bool = Field(False, description="start fresh in an --out-dir holding an earlier run's checkpoints")
    publish_to: str | None = Field(None, description="URL prefix (s3://bucket/runs/name/, any fsspec URL) the final "
                                   "checkpoint, config.json and summary.json are published to at the end, "
                                   "checkpoint.json last; every checkpoint's training state goes to "
                                   "<prefix>/state/step_XXXXXXXX/ (--resume auto fetches the newest when --out-dir has "
                                   "none; credentials from the environment)")
    # --- model (GAIRConfig fields)
    embed_dim: int = _model_field("embed_dim", "shared embedding size (authors: 768)")
    rs_arch: str = _model_field("rs_arch", "RS ViT: tiny|small|base|large or a timm name")
    rs_img_size: int = _model_field("rs_img_size", "RS chip size fed to the model (px)")
    rs_patch_size: int = _model_field("rs_patch_size", "RS ViT patch size")
    rs_bands: int = _model_field("rs_bands", "RS bands")
    rs_weights: str | None = _model_field("rs_weights", "local RS ViT weights (.safetensors or torch state "
                                          "dict; never downloaded)")
    rs_weights_prefix: str = _model_field("rs_weights_prefix", "key prefix of the RS ViT in --rs-weights")
    sv_arch: str = _model_field("sv_arch", "SV ViT: tiny|small|base|large or a timm name")
    sv_img_size: int = _model_field("sv_img_size", "SV image size fed to the model (px)")
    sv_patch_size: int = _model_field("sv_patch_size", "SV ViT patch size")
    sv_weights: str | None = _model_field("sv_weights", "local SV ViT weights")
    sv_weights_prefix: str = _model_field("sv_weights_prefix", "key prefix of the SV ViT in --sv-weights")
    localizer: str = _model_field("localizer", "nili | mean | centre | bilinear | bicubic")
    location_encoder: str = _model_field("location_encoder", "geoclip | sh | mlp")
    loc_hidden: list[int] | None = _model_field("loc_hidden", "hidden widths of the location encoder MLP")
    loc_n_freqs: int = _model_field("loc_n_freqs", "random Fourier features per branch")
    loc_sigmas: list[float] = _model_field("loc_sigmas", "RFF branch sigmas")
    loc_sh_degree: int = _model_field("loc_sh_degree", "spherical-harmonics degree (location_encoder sh)")
    loc_seed: int = _model_field("loc_seed", "seed of the fixed RFF frequencies")
    temperature: float = _model_field("temperature", "softmax temperature")
    drop_path_rate: float = _model_field("drop_path_rate", "stochastic depth of both ViTs")
    location_negatives: str = _model_field("location_negatives", "negatives of the location terms: queue "
                                           "(authors: own location vs the queue only) | batch+queue")
    sv_distill_feature: str = _model_field("sv_distill_feature", "SV feature distilled: pooled (authors) | cls")
    # --- data
    splits: list[str] | None = Field(default_factory=lambda: ["train"], description="keep only these splits "
                                     "('none' for all; 'test' and 'none' need --allow-test-split true)")
    allow_test_split: bool = Field(False, description="let training read the test split (smoke runs only)")
    epoch_samples: int | None = Field(None, description="samples per epoch over all ranks (default: n_samples of "
                                      "shards.json)")
    shuffle_buffer: int = Field(1000, description="samples in the loader's shuffle buffer")
    num_workers: int = Field(0, description="loader worker processes per rank")
    rs_stats: str | None = Field(None, description="JSON file {mean: [...], std: [...]} of per-band RS statistics")
    sv_aug: bool = Field(True, description="SV flip + colour jitter")
    rs_aug: bool = Field(True, description="RS colour jitter (see --rs-jitter)")
    rs_resize: str = Field("bilinear", description="RS resize to --rs-img-size: bilinear (ours) | bicubic (authors)")
    rs_jitter: str = Field("all_bands", description="RS colour jitter: all_bands (ours) | three_bands (authors)")
    rs_jitter_p: float = Field(0.7, description="probability of the three_bands jitter per sample")
    sv_resize: str = Field("crop", description="SV resize: crop (shorter side + centre crop, ours) | full "
                           "(whole image to a square, authors)")
    # --- validation
    val_every: int = Field(0, description="validate every N optimiser steps and at the end (0: never)")
    val_splits: list[str] | None = Field(default_factory=lambda: ["val"], description="splits read by validation "
                                         "('test' is refused unless --val-allow-test true)")
    val_batches: int = Field(20, description="batches per validation (the first ones of one unshuffled pass)")
    val_batch_size: int | None = Field(None, description="samples per validation batch (default: --batch-size)")
    val_allow_test: bool = Field(False, description="allow the test split in --val-splits")
    # --- schedule and optimiser
    batch_size: int = Field(32, ge=1, description="samples per rank per micro-step")
    accum_steps: int = Field(1, ge=1, description="gradient accumulation micro-steps per optimiser step")
    steps: int | None = Field(None, description="total optimiser steps (else --epochs x steps per epoch)")
    epochs: float | None = Field(None, description="epochs (with a known epoch size)")
    blr: float = Field(1.5e-6, description="base lr per 256 samples of effective batch")
    lr: float | None = Field(None, description="absolute lr (overrides the --blr scaling)")
    min_lr_ratio: float = Field(0.0, description="final lr as a fraction of the peak (cosine)")
    warmup_steps: int | None = Field(None, description="warm-up optimiser steps (default 5%% of the steps)")
    weight_decay: float = Field(0.05, description="AdamW weight decay")
    wd_rule: str = Field("exempt_embeddings", description="which parameters decay: exempt_embeddings (ours: not "
                         "norms, biases, position embeddings, CLS token) | timm (authors: not norms, biases)")
    grad_clip: float = Field(0.0, description="max grad norm (0: no clipping)")
    # --- GAIR specifics
    queue_size: int = Field(4096, description="coordinate queue size (location negatives)")
    queue_init: str = Field("auto", description="pre-fill of the queue: auto (manifest.parquet if present, else "
                            "loader) | manifest | loader | none | a .npy/.csv/.json/.parquet file of lon,lat")
    distill_weight: float = Field(0.0, description="weight of the cosine distillation to frozen teachers (on only "
                                  "with --rs-teacher-weights/--sv-teacher-weights)")
    rs_teacher_weights: str | None = Field(None, description="local weights of the frozen RS teacher")
    sv_teacher_weights: str | None = Field(None, description="local weights of the frozen SV teacher (authors: "
                                           "an ImageNet-21k ViT-B/16)")
    gather_with_grad: bool = Field(False, description="SV<->RS negatives from every rank, gathered with gradients")
    # --- runtime
    device: str = Field("auto", description="auto | cpu | cuda")
    precision: str = Field("auto", description="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    compile: str = Field("auto", description="torch.compile the model: auto (on CUDA) | true | false")
    seed: int = Field(0, description="seed")
    threads: int | None = Field(None, description="torch intra-op threads")
    log_every: int = Field(10, description="print a GAIR_METRICS line every N steps")
    save_every: int = Field(500, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, description="checkpoints kept, locally and under --publish-to (0 or less: "
                                  "all)")
    resume: str | None = Field(None, description="'auto' (latest in --out-dir if any, else the newest state "
                               "published under --publish-to) or a checkpoint path")
    resume_data: str = Field("reseed", description="reseed (fresh random stream: cheap) | skip (replay the "
                             "stream up to the checkpoint: exact, decodes the skipped samples again)")
    max_minutes: float | None = Field(None, description="wall-clock budget; checkpoint and stop when exceeded "
                                      "(checked at logging and checkpoint steps)")

    def gair_config(self) -> GAIRConfig:
        """The model configuration of this run."""
        return GAIRConfig(**{name: getattr(self, name) for name in MODEL_FIELDS})

    def check(self) -> TrainConfig:
        """Raise ``ValueError`` for settings that contradict each other; returns ``self``."""
        choices = {"resume_data": ("skip", "reseed"), "rs_resize": ("bilinear", "bicubic"),
                   "rs_jitter": ("all_bands", "three_bands"), "sv_resize": ("crop", "full"),
                   "wd_rule": ("exempt_embeddings", "timm"), "location_negatives": ("queue", "batch+queue"),
                   "sv_distill_feature": ("pooled", "cls"), "compile": ("auto", "true", "false"),
                   "precision": ("auto", "bf16", "fp32"), "localizer": LOCALIZERS,
                   "location_encoder": LOCATION_ENCODERS, "device": ("auto", "cpu", "cuda")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.val_every > 0:
            from gair_model.validation import check_val_splits

            check_val_splits(self.val_splits, allow_test=self.val_allow_test)
        if not self.allow_test_split and (self.splits is None or "test" in self.splits):
            raise ValueError(f"--splits {self.splits or 'none'} trains on the 'test' split, which is held out for "
                             "evaluation; train on 'train' (or pass --allow-test-split true for a smoke run)")
        if self.publish_to:
            from gair_dataset.object_store import check_url

            check_url(self.publish_to)
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume contradict each other")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        self.gair_config()  # the model fields' own checks (location_negatives, sv_distill_feature, ...)
        return self


def preset_values(name: str) -> dict[str, Any]:
    """The field values a preset sets (model preset of the same name + its trainer settings)."""
    if name not in TRAIN_PRESETS or name not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(TRAIN_PRESETS)}")
    return {**MODEL_PRESETS[name], **TRAIN_PRESETS[name], "preset": name}


def resolve_config(overrides: Mapping[str, Any] | None = None, *, config_file: str | Path | None = None,
                   require_shards: bool = False) -> TrainConfig:
    """The configuration of a run: field defaults < preset < config file < ``overrides``.

    Args:
        overrides: Explicit settings (the command line, or the fields a Dagster user set); ``preset`` picks the
            preset (else the config file's, else ``tiny``).
        config_file: A JSON or YAML mapping of field names (``-`` or ``_``).
        require_shards: Raise when no shards are given (the trainer needs them; printing a config does not).

    Returns:
        The validated configuration.

    Raises:
        ValueError: Unknown keys, bad values or contradictory settings.
    """
    file_values = _read_config_file(config_file) if config_file else {}
    explicit = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    name = explicit.get("preset") or file_values.get("preset") or "tiny"
    given = {**file_values, **explicit}
    preset = preset_values(name)
    for key, dependents in DEPENDENT_SETTINGS.items():
        if key in given:
            for dep in dependents:
                if dep not in given:
                    preset.pop(dep, None)
    values = {**preset, **given}
    unknown = sorted(set(values) - set(TrainConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}")
    if isinstance(values.get("shards"), str):
        values["shards"] = [values["shards"]]
    for key in ("splits", "val_splits"):
        if values.get(key) is not None and [str(s).lower() for s in values[key]] == ["none"]:
            values[key] = None
    cfg = TrainConfig.model_validate(values).check()
    if require_shards and not cfg.shards:
        raise ValueError("--shards is required")
    return cfg


def _read_config_file(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return {k.replace("-", "_"): v for k, v in data.items()}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {v}")


def _optional(fn: Any) -> Any:
    def conv(v: str) -> Any:
        return None if v.lower() in ("none", "null") else fn(v)

    return conv


def build_parser(prog: str = "python -m gair_model.train") -> argparse.ArgumentParser:
    """The trainer's argument parser, one flag per :class:`TrainConfig` field (plus ``--config``)."""
    parser = argparse.ArgumentParser(prog=prog, description="Train GAIR on WebDataset shards.")
    parser.add_argument("--config", help="JSON or YAML file of settings (flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    for name, f in TrainConfig.model_fields.items():
        ann = str(f.annotation)
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": f.description}
        optional = "None" in ann
        if "list[int]" in ann:
            kw.update(nargs="+", type=_optional(int) if optional else int)
        elif "list[float]" in ann:
            kw.update(nargs="+", type=_optional(float) if optional else float)
        elif "list[str]" in ann:
            kw.update(nargs="+", type=str)
        elif f.annotation is bool:
            kw.update(type=_str2bool, metavar="BOOL")
        elif "int" in ann:
            kw.update(type=_optional(int) if optional else int)
        elif "float" in ann:
            kw.update(type=_optional(float) if optional else float)
        else:
            kw.update(type=_optional(str) if optional else str)
        parser.add_argument("--" + name.replace("_", "-"), **kw)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """``(configuration, print_only)`` from command-line arguments."""
    args = vars(build_parser().parse_args(argv))
    for key, value in args.items():  # `--loc-hidden none` parses as [None]: the list is unset
        if isinstance(value, list) and value == [None]:
            args[key] = None
    config_file = args.pop("config", None)
    print_only = bool(args.pop("print_config", False))
    return resolve_config(args, config_file=config_file, require_shards=not print_only), print_only


def to_flags(values: Mapping[str, Any]) -> list[str]:
    """Command-line flags that set ``values`` (field name -> value); the inverse of the parser."""
    flags: list[str] = []
    for name, value in values.items():
        if name not in TrainConfig.model_fields:
            raise ValueError(f"unknown config key {name!r}")
        flag = "--" + name.replace("_", "-")
        if value is None:
            flags += [flag, "none"]
        elif isinstance(value, bool):
            flags += [flag, str(value).lower()]
        elif isinstance(value, list | tuple):
            if not value:
                raise ValueError(f"{name}: an empty list cannot be given as a flag")
            flags += [flag, *(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def describe(cfg: TrainConfig) -> str:
    """The resolved configuration as indented JSON (what ``--print-config`` prints)."""
    return json.dumps(cfg.model_dump(), indent=2)
