"""The trainer's main loop: wiring (model, optimiser, data, resume), the step loop, checkpoints, the summary.

Run it as ``python -m gair_model.train`` or ``torchrun --nproc_per_node=N -m gair_model.train``. DDP uses gloo on
CPU and nccl on GPU; bf16 autocast, fused AdamW and ``torch.compile`` (``--compile auto``) on GPU only.

Outputs in ``--out-dir``: ``config.json``, ``metrics.csv`` (one row per optimiser step), ``val_metrics.csv``
(one row per validation), ``checkpoints/`` (``step_XXXXXXXX.safetensors`` + ``step_XXXXXXXX.state.pt`` +
``latest.json``), ``summary.json`` and, if the ``tensorboard`` package is installed, ``tb/``. Rank 0 prints
``GAIR_METRICS {json}`` every ``--log-every`` steps, ``GAIR_VAL {json}`` after each validation and
``GAIR_SUMMARY {json}`` at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gair_dataset import object_store
from gair_model import checkpoint as ckpt
from gair_model import distributed as gdist
from gair_model.loader import resolve_shards
from gair_model.losses import CoordinateQueue
from gair_model.models.encoders import build_teachers
from gair_model.models.gair import GAIRModel
from gair_model.optim import build_optimizer, build_scheduler, scaled_lr
from gair_model.training.config import TrainConfig
from gair_model.training.data import BatchStream, DataPlan, prefill_queue, start_stream
from gair_model.training.logs import SUMMARY_PREFIX, MetricsLog, fetch_published_state, resolve_resume, write_run_config
from gair_model.training.step import StepState, train_step
from gair_model.validation import build_validator

log = logging.getLogger("gair_model.train")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig) -> GAIRModel:
    """The model of a run, with its frozen distillation teachers when teacher weights are given."""
    if cfg.distill_weight > 0 and not (cfg.rs_teacher_weights or cfg.sv_teacher_weights):
        log.warning("distill_weight %.3g but no --rs-teacher-weights/--sv-teacher-weights: distillation is off",
                    cfg.distill_weight)
    mcfg = cfg.gair_config()
    rs_teacher = sv_teacher = None
    if cfg.distill_weight > 0:
        rs_teacher, sv_teacher = build_teachers(mcfg, cfg.rs_teacher_weights, cfg.sv_teacher_weights)
    return GAIRModel(mcfg, rs_teacher=rs_teacher, sv_teacher=sv_teacher)


def distillation_active(cfg: TrainConfig) -> bool:
    """Whether the run adds the distillation term (a weight and at least one teacher)."""
    return cfg.distill_weight > 0 and bool(cfg.rs_teacher_weights or cfg.sv_teacher_weights)


def param_checksum(model: nn.Module) -> str:
    """SHA-256 over all parameters and buffers (to check that ranks agree)."""
    h = hashlib.sha256()
    for name, t in ckpt.unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (``--precision auto|bf16``), a no-op otherwise."""
    if cfg.precision == "bf16" and device.type != "cuda":
        log.warning("bf16 autocast is only used on GPU; running fp32 on %s", device)
    if device.type == "cuda" and cfg.precision in ("auto", "bf16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether to ``torch.compile`` the forward module (``auto``: on CUDA)."""
    return cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run training with ``cfg``; returns the summary (also written to ``<out_dir>/summary.json``)."""
    t_start = time.time()
    info = gdist.init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if info.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            ckpt.remove_checkpoints(ckpt_dir)
            if cfg.publish_to:  # a later --resume auto must not find the replaced run's states
                ckpt.remove_published_states(cfg.publish_to)
    gdist.barrier()
    try:
        return _Run(cfg, info, out_dir, ckpt_dir, t_start).loop()
    finally:
        gdist.cleanup(info)


class _Run:
    """One training run: the objects the loop needs, built from the configuration."""

    def __init__(self, cfg: TrainConfig, info: gdist.DistInfo, out_dir: Path, ckpt_dir: Path,
                 t_start: float) -> None:
        self.cfg, self.info, self.out_dir, self.ckpt_dir, self.t_start = cfg, info, out_dir, ckpt_dir, t_start
        device = self.device = info.device
        self.shard_paths = resolve_shards(cfg.shards)
        self.plan = DataPlan(cfg, info.world_size, self.shard_paths)
        self.mcfg = cfg.gair_config()

        seed_everything(cfg.seed)  # same model init on every rank (DDP also broadcasts rank 0's weights)
        self.model = build_model(cfg).to(device)
        self.model.teachers_to(device)
        self.queue = CoordinateQueue(cfg.queue_size).to(device)
        self.lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, self.plan.effective_batch)
        self.warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * self.plan.total_steps)
        fetch_published_state(cfg, ckpt_dir, out_dir, info)  # --resume auto on a fresh disk
        self.resume = resolve_resume(cfg, ckpt_dir)
        steps = gdist.all_gather_object(self.resume["step"] if self.resume is not None else None)
        if len(set(steps)) > 1:
            raise RuntimeError(f"the ranks would resume from different steps {steps}: their checkpoint folders "
                               f"differ ({ckpt_dir} must be shared, or fetched from --publish-to on every node)")
        if self.resume is None and not cfg.resume and ckpt.list_checkpoints(ckpt_dir):
            raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pass --resume auto to continue, "
                                  "--overwrite true to start over, or use a fresh --out-dir")
        if self.resume is None and not cfg.resume and cfg.publish_to and ckpt.published_state_steps(cfg.publish_to):
            raise FileExistsError(f"{object_store.public_url(cfg.publish_to)} already holds the training states of a "
                                  "run: pass --resume auto to continue it, --overwrite true to start over, or use "
                                  "a fresh --publish-to")
        self.start_step = 0
        state: dict[str, Any] | None = None
        if self.resume is not None:
            ckpt.load_model(self.model, self.resume["model"])
            state = ckpt.load_train_state(self.resume["state"])
            self.start_step = int(state["step"])
            self.queue.load_state(state["queue"])

        self.ddp = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None) \
            if info.distributed else None
        forward: Callable[..., dict[str, Any]] = self.ddp if self.ddp is not None else self.model
        if use_compile(cfg, device):
            forward = torch.compile(forward)
        self.optimizer = build_optimizer(self.model, self.lr, weight_decay=cfg.weight_decay, wd_rule=cfg.wd_rule,
                                         fused=True if device.type == "cuda" else None)
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=self.warmup,
                                         total_steps=self.plan.total_steps, min_ratio=cfg.min_lr_ratio)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        # Per-rank RNG for anything stochastic in the step (drop-path); restored exactly on resume.
        seed_everything(cfg.seed * 1000 + info.rank + 1)
        if state is not None and state.get("rng") and len(state["rng"]) == info.world_size:
            ckpt.set_rng_state(state["rng"][info.rank])
        self.state = state

        self.rs_stats = json.loads(Path(cfg.rs_stats).read_text()) if cfg.rs_stats else None
        self.stream = BatchStream(cfg, self.mcfg, self.plan, self.rs_stats, self.shard_paths)
        if state is None and cfg.queue_size > 0 and cfg.queue_init != "none":
            prefill_queue(self.queue, cfg, self.stream, info, device)
        start_stream(self.stream, self.plan, cfg, self.start_step)

        self.step_state = StepState(
            forward=forward, model=self.model, optimizer=self.optimizer, queue=self.queue, device=device,
            accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip,
            distill_weight=cfg.distill_weight if distillation_active(cfg) else 0.0,
            gather_with_grad=cfg.gather_with_grad, scheduler=self.scheduler,
            autocast=lambda: autocast_for(cfg, device), no_sync=self.ddp.no_sync if self.ddp is not None else None)
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_run_config(out_dir, cfg, world_size=info.world_size, effective_batch=self.plan.effective_batch,
                             lr=self.lr, total_steps=self.plan.total_steps, steps_per_epoch=self.plan.steps_per_epoch,
                             epoch_samples=self.plan.epoch_samples, n_shards=len(self.shard_paths),
                             distillation_active=distillation_active(cfg))
        self.metrics = MetricsLog(out_dir, is_main=info.is_main, start_step=self.start_step,
                                  log_every=cfg.log_every, total_steps=self.plan.total_steps,
                                  samples_per_step=self.plan.samples_per_step, t_start=t_start)
        if state is not None:
            self.metrics.last_losses = {k: float(v) for k, v in state.get("losses", {}).items()}
        self.validator = build_validator(cfg, self.model, self.queue, self.shard_paths, rs_stats=self.rs_stats,
                                         device=device, out_dir=out_dir, is_main=info.is_main,
                                         world_size=info.world_size, start_step=self.start_step,
                                         autocast=lambda: autocast_for(cfg, device), tb=self.metrics.tb)
        self.last_record: dict[str, str] | None = None
        self.last_saved = -1
        if self.resume is not None:
            self.last_record = {k: str(Path(self.resume[k]).resolve()) for k in ("model", "state")}
            self.last_saved = self.start_step

    def save(self, step: int) -> None:
        """Checkpoint at ``step`` (a collective: every rank gathers its RNG state)."""
        cfg = self.cfg
        rngs = gdist.all_gather_object(ckpt.rng_state())
        st = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
              "queue": self.queue.state(), "rng": rngs, "epoch": self.plan.epoch_of(step)[0],
              "world_size": self.info.world_size, "train_config": json.dumps(cfg.model_dump()),
              "model_config": json.dumps(self.mcfg.to_dict()), "losses": dict(self.metrics.last_losses)}
        if self.info.is_main:
            self.last_record = ckpt.save_checkpoint(
                self.ckpt_dir, step, self.model, st, keep=cfg.keep_checkpoints,
                metadata={"step": str(step), "model_config": json.dumps(self.mcfg.to_dict()),
                          # the RS normalisation travels with the weights (evaluation needs the same)
                          "rs_stats": json.dumps(self.rs_stats) if self.rs_stats is not None else "null",
                          "preprocessing": json.dumps({"rs_resize": cfg.rs_resize, "sv_resize": cfg.sv_resize})})
            if cfg.publish_to:  # a pod's disk may not outlive it: the state goes to object storage too
                self.publish_state(self.last_record)
        self.last_saved = step
        gdist.barrier()

    def publish_state(self, record: dict[str, Any]) -> None:
        """Publish a checkpoint's training state under ``--publish-to``; a failed upload is a warning, not the end."""
        try:  # the metrics are flushed before every save: metrics.csv goes along up to this step
            ckpt.publish_train_state(record, str(self.cfg.publish_to), run_dir=self.out_dir,
                                     keep=self.cfg.keep_checkpoints)
        except OSError as exc:  # ObjectStoreError included; the local checkpoint is written either way
            log.warning("step %s: training state not published or older states not removed (%s); training goes "
                        "on", record["step"], exc)

    def loop(self) -> dict[str, Any]:
        """Train to the last step (or the time budget); returns the summary."""
        cfg, plan = self.cfg, self.plan
        step = self.start_step
        samples_seen = step * plan.samples_per_step
        status = "completed"
        budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes else None
        self.model.train()
        while step < plan.total_steps:
            epoch = plan.epoch_of(step)[0]
            if epoch != self.stream.epoch:
                self.stream.start_epoch(epoch)
            out = train_step(self.step_state, self.stream.next)
            step += 1
            samples_seen += plan.samples_per_step
            self.metrics.record(step, epoch, out, self.queue.filled)
            logged = self.metrics.due(step)
            if logged:
                self.metrics.flush(samples_seen)
            if self.validator.due(step):
                t_val = time.time()
                self.validator.run(step)
                self.metrics.pause(time.time() - t_val)
            # The budget is checked where the loop synchronises anyway (logging, checkpoints).
            checkpoint_due = cfg.save_every > 0 and step % cfg.save_every == 0 and step < plan.total_steps
            if (logged or checkpoint_due) and budget_s is not None and step < plan.total_steps:
                if gdist.any_rank(time.time() - self.t_start > budget_s, self.device):
                    status = "time_budget"
                    self.metrics.flush(samples_seen)
                    self.save(step)
                    break
            if checkpoint_due:
                self.metrics.flush(samples_seen)
                self.save(step)
        self.metrics.flush(samples_seen)
        if self.last_saved != step:
            self.save(step)
        self.validator.finish(step)
        self.stream.close()
        return self.summary(step, samples_seen, status)

    def summary(self, step: int, samples_seen: int, status: str) -> dict[str, Any]:
        """Write ``summary.json`` and print the ``GAIR_SUMMARY`` line (rank 0); every rank returns it."""
        cfg, plan, info = self.cfg, self.plan, self.info
        checksums = gdist.all_gather_object(param_checksum(self.model))
        losses = self.metrics.last_losses
        summary = {
            "status": status, "steps": step, "total_steps": plan.total_steps,
            "resumed_from_step": self.start_step if self.resume is not None else None,
            "final_loss": losses.get("loss"), "final_losses": losses,
            "checkpoint": self.last_record["model"] if self.last_record else None,
            "train_state": self.last_record["state"] if self.last_record else None,
            "out_dir": str(self.out_dir.resolve()), "metrics_csv": str((self.out_dir / "metrics.csv").resolve()),
            "world_size": info.world_size, "device": str(self.device), "preset": cfg.preset,
            "batch_size": cfg.batch_size, "accum_steps": cfg.accum_steps, "effective_batch": plan.effective_batch,
            "lr": self.lr, "steps_per_epoch": plan.steps_per_epoch,
            "epochs": step / plan.steps_per_epoch if plan.steps_per_epoch else None,
            "samples_seen": samples_seen, "wall_seconds": round(time.time() - self.t_start, 3),
            "distillation_active": distillation_active(cfg), "compiled": use_compile(cfg, self.device),
            "param_checksums": checksums, "ranks_in_sync": len(set(checksums)) == 1,
            **self.validator.summary(),
        }
        self.metrics.close()
        if info.is_main:
            ckpt.atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
            if cfg.publish_to and self.last_record:  # object storage: weights + run files, marker last
                ckpt.publish_checkpoint(self.last_record["model"], cfg.publish_to, run_dir=self.out_dir)
            print(SUMMARY_PREFIX + json.dumps(summary), flush=True)
        return summary
