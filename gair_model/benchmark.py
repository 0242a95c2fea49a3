"""Training-throughput benchmark of the GAIR model (samples/s, FLOPs, MFU) on random tensors.

It times the trainer's own optimiser step (:func:`gair_model.training.step.train_step`: forward of both ViTs +
NILI + location encoder over batch and queue, the four losses, backward, gradient norm, AdamW) without data
loading, so it measures the model, not the disk or JPEG decoding. The configuration is resolved as the trainer
resolves it (preset + trainer flags). Used by ``bench/train_cpu.py`` and ``bench/train_gpu.sh``::

    python -m gair_model.benchmark --preset paper --accum-steps 1 --out bench/results/train_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gair_dataset.atomic import atomic_write_text
from gair_model.losses import CoordinateQueue
from gair_model.models.gair import GAIRModel
from gair_model.optim import build_optimizer
from gair_model.training.config import TrainConfig, build_parser, resolve_config
from gair_model.training.step import StepState, train_step

#: Dense bf16 peak (FLOP/s) by GPU name fragment (first match wins); override with ``--peak-tflops``.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / NVL per-GPU dense
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
)


def peak_bf16_tflops(name: str) -> float | None:
    """Dense bf16 tensor-core peak (TFLOP/s) of a GPU from its name, or ``None`` if unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU / GPU / library description for the results file."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError, AttributeError):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def analytic_flops_per_sample(model: GAIRModel) -> float:
    """``6 * params * tokens`` for both ViTs (forward + backward), a cross-check of the counted FLOPs."""
    rs, sv = model.rs_encoder, model.sv_encoder
    rs_params = sum(p.numel() for p in rs.vit.blocks.parameters())
    sv_params = sum(p.numel() for p in sv.vit.blocks.parameters())
    rs_tokens = rs.grid_size[0] * rs.grid_size[1]
    sv_tokens = sv.vit.patch_embed.num_patches + 1
    return 6.0 * (rs_params * rs_tokens + sv_params * sv_tokens)


def run_benchmark(
    cfg: TrainConfig,
    *,
    device: str = "cpu",
    warmup_steps: int = 3,
    window_steps: int = 5,
    windows: int = 5,
    count_flops: bool = True,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Time :func:`gair_model.training.step.train_step` (the trainer's step) and return a results dict.

    The batch is random and already on the device (no data loading), the coordinate queue is full and
    re-encoded every step as in training; model, optimiser, autocast and ``torch.compile`` are built from
    ``cfg`` exactly as the trainer builds them (single process).

    Args:
        cfg: The resolved training configuration (:func:`gair_model.training.config.resolve_config`).
        device: ``cpu`` or ``cuda``.
        warmup_steps: Untimed steps first (``torch.compile`` compiles here).
        window_steps: Optimiser steps per timed window.
        windows: Number of timed windows (the median is reported).
        count_flops: Count the FLOPs of one step with ``torch.utils.flop_counter`` (uncompiled; MFU on GPU).
        peak_tflops: Peak bf16 TFLOP/s for MFU (default: looked up from the GPU name).

    Returns:
        Results with ``samples_per_s`` (median), per-window values, step time, FLOPs, MFU, peak memory, machine.
    """
    from gair_model.training.main import autocast_for, build_model, distillation_active, use_compile

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    mcfg = cfg.gair_config()
    model = build_model(cfg).to(dev).train()
    model.teachers_to(dev)
    opt = build_optimizer(model, 1e-4, weight_decay=cfg.weight_decay, wd_rule=cfg.wd_rule,
                          fused=True if dev.type == "cuda" else None)
    compiled = use_compile(cfg, dev)
    b = cfg.batch_size
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    span = torch.tensor([360.0, 180.0], dtype=torch.float64)
    batch = {"rs": torch.rand(b, mcfg.rs_bands, mcfg.rs_img_size, mcfg.rs_img_size, generator=g).to(dev),
             "sv": torch.randn(b, 3, mcfg.sv_img_size, mcfg.sv_img_size, generator=g).to(dev),
             "lonlat": (torch.rand(b, 2, generator=g, dtype=torch.float64) * span - span / 2).to(dev),
             "rel_xy": torch.rand(b, 2, generator=g).to(dev)}
    queue = CoordinateQueue(cfg.queue_size).to(dev)
    queue.enqueue((torch.rand(cfg.queue_size, 2, generator=g, dtype=torch.float64) * span - span / 2).to(dev),
                  gather=False)
    state = StepState(forward=torch.compile(model) if compiled else model, model=model, optimizer=opt, queue=queue,
                      device=dev, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip,
                      distill_weight=cfg.distill_weight if distillation_active(cfg) else 0.0,
                      autocast=lambda: autocast_for(cfg, dev), gather_queue=False)

    def step() -> dict[str, Any]:
        return train_step(state, lambda: batch)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    samples_per_step = b * cfg.accum_steps
    flops_per_step = None
    if count_flops:  # on the uncompiled module (the counter does not see inside compiled graphs)
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        eager, state.forward = state.forward, model
        with counter:
            step()
        sync()
        state.forward = eager
        flops_per_step = float(counter.get_total_flops())
    t_compile = time.perf_counter()
    for _ in range(warmup_steps):
        step()
    sync()
    warmup_s = time.perf_counter() - t_compile

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rates = []
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(window_steps):
            last = step()
        float(last["losses"][0])  # waits for the window's last step
        sync()
        rates.append(window_steps * samples_per_step / (time.perf_counter() - t0))

    median = statistics.median(rates)
    result: dict[str, Any] = {
        "benchmark": "gair_train_step",
        "what": "gair_model.training.step.train_step (the trainer's step: forward, 4 losses with a full queue, "
                "backward, clip, AdamW) on a random batch already on the device; no data loading",
        "preset": cfg.preset,
        "train_config": cfg.model_dump(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(dev),
        "precision": "bf16-autocast" if dev.type == "cuda" and cfg.precision in ("auto", "bf16") else "fp32",
        "compiled": compiled,
        "batch_size": b,
        "accum_steps": cfg.accum_steps,
        "queue_size": cfg.queue_size,
        "warmup_steps": warmup_steps,
        "warmup_seconds": round(warmup_s, 2),
        "window_steps": window_steps,
        "windows": windows,
        "samples_per_s": round(median, 3),
        "samples_per_s_windows": [round(r, 3) for r in rates],
        "step_time_s": round(samples_per_step / median, 5),
        "flops_per_sample_counted": flops_per_step / samples_per_step if flops_per_step else None,
        "flops_per_sample_analytic_6ND": analytic_flops_per_sample(model),
        "machine": machine_info(dev),
    }
    if flops_per_step:
        result["achieved_tflops"] = round(flops_per_step / samples_per_step * median / 1e12, 3)
    if dev.type == "cuda":
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        peak = peak_tflops or peak_bf16_tflops(result["machine"]["gpu_name"])
        result["peak_bf16_tflops"] = peak
        if peak and flops_per_step:
            result["mfu"] = round(result["achieved_tflops"] / peak, 4)
            result["mfu_analytic_6ND"] = round(result["flops_per_sample_analytic_6ND"] * median / (peak * 1e12), 4)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: run the benchmark and write the results JSON (``--out``).

    Benchmark flags are listed below; every other flag is a trainer flag (``python -m gair_model.train --help``)
    resolved the trainer's way, e.g. ``--preset paper --batch-size 256 --accum-steps 1 --compile true``.
    """
    p = argparse.ArgumentParser(prog="python -m gair_model.benchmark", description=__doc__.split("\n\n")[0],
                                epilog="Other flags: the trainer's (python -m gair_model.train --help).")
    p.add_argument("--bench-device", dest="device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bench-warmup-steps", dest="warmup_steps", type=int, default=3)
    p.add_argument("--window-steps", type=int, default=5)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    p.add_argument("--out", default=None, help="results JSON path")
    a, rest = p.parse_known_args(argv)
    trainer = vars(build_parser().parse_args(rest))
    trainer.pop("print_config", None)
    cfg = resolve_config(trainer, config_file=trainer.pop("config", None))
    result = run_benchmark(cfg, device=a.device, warmup_steps=a.warmup_steps, window_steps=a.window_steps,
                           windows=a.windows, count_flops=not a.no_flops, peak_tflops=a.peak_tflops)
    result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = json.dumps(result, indent=2)
    if a.out:
        atomic_write_text(Path(a.out), text)
    print(text)
    return result


if __name__ == "__main__":
    main()
