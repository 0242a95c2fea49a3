"""Training-throughput benchmark of the GAIR model (samples/s, FLOPs, MFU) on random tensors.

It times the full optimiser step (forward of both ViTs + NILI + location encoder over batch and queue, the four
losses, backward, gradient-norm, AdamW) without data loading, so it measures the model, not the disk or JPEG
decoding. Used by ``bench/train_cpu.py`` and ``bench/train_gpu.sh``::

    python -m gair_model.benchmark --preset base --device cuda --batch-size 256 --out bench/results/train_gpu.json
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

from gair_model.losses import CoordinateQueue
from gair_model.models.gair import GAIRModel, preset
from gair_model.optim import build_optimizer

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
    *,
    preset_name: str = "tiny",
    device: str = "cpu",
    batch_size: int = 32,
    queue_size: int = 4096,
    precision: str = "auto",
    warmup_steps: int = 3,
    window_steps: int = 5,
    windows: int = 5,
    count_flops: bool = True,
    peak_tflops: float | None = None,
    threads: int | None = None,
    compile_model: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Time training steps and return a results dict.

    Args:
        preset_name: Model preset (``tiny`` = CPU config, ``base`` = paper: two ViT-B).
        device: ``cpu`` or ``cuda``.
        batch_size: Samples per step.
        queue_size: Coordinate-queue size (filled), re-encoded every step as in training.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` or ``fp32``.
        warmup_steps: Untimed steps first.
        window_steps: Steps per timed window.
        windows: Number of timed windows (the median is reported).
        count_flops: Count FLOPs of one step with ``torch.utils.flop_counter`` (MFU on GPU).
        peak_tflops: Peak bf16 TFLOP/s for MFU (default: looked up from the GPU name).
        threads: ``torch.set_num_threads`` (CPU).
        compile_model: ``torch.compile`` the model.
        seed: Seed.
        **overrides: :class:`gair_model.models.gair.GAIRConfig` field overrides.

    Returns:
        Results with ``samples_per_s`` (median), per-window values, FLOPs, MFU and machine info.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(seed)
    cfg = preset(preset_name, **overrides)
    model = GAIRModel(cfg).to(dev).train()
    opt = build_optimizer(model, 1e-4, fused=True if dev.type == "cuda" else None)
    use_bf16 = dev.type == "cuda" and precision in ("auto", "bf16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    step_model = torch.compile(model) if compile_model else model

    g = torch.Generator(device="cpu").manual_seed(seed)
    rs = torch.rand(batch_size, cfg.rs_bands, cfg.rs_img_size, cfg.rs_img_size, generator=g).to(dev)
    sv = torch.randn(batch_size, 3, cfg.sv_img_size, cfg.sv_img_size, generator=g).to(dev)
    span = torch.tensor([360.0, 180.0], dtype=torch.float64)
    lonlat = (torch.rand(batch_size, 2, generator=g, dtype=torch.float64) * span - span / 2).to(dev)
    rel_xy = torch.rand(batch_size, 2, generator=g).to(dev)
    queue = CoordinateQueue(queue_size).to(dev)
    queue.enqueue((torch.rand(queue_size, 2, generator=g, dtype=torch.float64) * span - span / 2).to(dev))
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with autocast():
            out = step_model(rs, sv, lonlat, rel_xy, queue_lonlat=queue.coords())
        loss = out["losses"]["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        queue.enqueue(lonlat, gather=False)
        return loss

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup_steps):
        step()
    sync()

    flops_per_step = None
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step()
        sync()
        flops_per_step = float(counter.get_total_flops())

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rates = []
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(window_steps):
            last = step()
        float(last.detach())  # also synchronises
        sync()
        rates.append(window_steps * batch_size / (time.perf_counter() - t0))

    median = statistics.median(rates)
    result: dict[str, Any] = {
        "benchmark": "gair_train_step",
        "what": "optimizer steps on random tensors (forward, 4 losses with queue, backward, AdamW); no data loading",
        "preset": preset_name,
        "model_config": cfg.to_dict(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(dev),
        "precision": "bf16-autocast" if use_bf16 else "fp32",
        "batch_size": batch_size,
        "queue_size": queue_size,
        "warmup_steps": warmup_steps,
        "window_steps": window_steps,
        "windows": windows,
        "samples_per_s": round(median, 3),
        "samples_per_s_windows": [round(r, 3) for r in rates],
        "step_time_s": round(batch_size / median, 5),
        "flops_per_sample_counted": flops_per_step / batch_size if flops_per_step else None,
        "flops_per_sample_analytic_6ND": analytic_flops_per_sample(model),
        "machine": machine_info(dev),
    }
    if flops_per_step:
        achieved = flops_per_step / batch_size * median
        result["achieved_tflops"] = round(achieved / 1e12, 3)
    if dev.type == "cuda":
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        peak = peak_tflops or peak_bf16_tflops(result["machine"]["gpu_name"])
        result["peak_bf16_tflops"] = peak
        if peak and flops_per_step:
            result["mfu"] = round(result["achieved_tflops"] / peak, 4)
            result["mfu_analytic_6ND"] = round(result["flops_per_sample_analytic_6ND"] * median / (peak * 1e12), 4)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: run the benchmark and write the results JSON (``--out``)."""
    p = argparse.ArgumentParser(prog="python -m gair_model.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--queue-size", type=int, default=4096)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--window-steps", type=int, default=5)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rs-size", type=int, default=None)
    p.add_argument("--sv-size", type=int, default=None)
    p.add_argument("--out", default=None, help="results JSON path")
    a = p.parse_args(argv)
    overrides = {}
    if a.rs_size:
        overrides["rs_img_size"] = a.rs_size
    if a.sv_size:
        overrides["sv_img_size"] = a.sv_size
    result = run_benchmark(
        preset_name=a.preset,
        device=a.device,
        batch_size=a.batch_size,
        queue_size=a.queue_size,
        precision=a.precision,
        warmup_steps=a.warmup_steps,
        window_steps=a.window_steps,
        windows=a.windows,
        count_flops=not a.no_flops,
        peak_tflops=a.peak_tflops,
        threads=a.threads,
        compile_model=a.compile,
        **overrides,
    )
    result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = json.dumps(result, indent=2)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    print(text)
    return result


if __name__ == "__main__":
    main()
