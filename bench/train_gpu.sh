#!/usr/bin/env bash
# GPU training throughput + MFU of the `paper` preset (the authors' training: two ViT-B, RS 96 px patch 8 /
# 10 bands, SV 224 px patch 16, embed 768, NILI, GeoCLIP location encoder with a 4096 queue, queue-only location
# negatives), batch 256, bf16 autocast, fused AdamW, torch.compile, on ONE GPU. It times the trainer's own step
# (gair_model.training.step.train_step) on random tensors already on the GPU (no data loading; the loader's rate
# per worker is in bench/results/train_cpu.json). One optimiser step per micro-batch (--accum-steps 1: the
# preset's 96 accumulation steps only change how often AdamW runs).
# Writes bench/results/train_gpu.json (GPU name, samples/s median over timed windows, step time, counted FLOPs,
# achieved TFLOP/s, MFU = achieved / peak dense bf16 FLOP/s, peak memory). Target: >= 1,500 pairs/s.
#
#   bash bench/train_gpu.sh                 # defaults
#   PEAK_TFLOPS=989.4 bash bench/train_gpu.sh   # if the GPU name is not in the built-in peak table
#   BATCH=128 WINDOWS=3 COMPILE=false bash bench/train_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT="${OUT:-bench/results/train_gpu.json}"
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("train_gpu.sh: no CUDA device visible (torch.cuda.is_available() is False)")
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda, flush=True)
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
ARGS=(--preset paper --bench-device cuda --device cuda --precision bf16 --compile "${COMPILE:-true}"
      --batch-size "${BATCH:-256}" --accum-steps 1 --queue-size "${QUEUE:-4096}"
      --bench-warmup-steps "${WARMUP:-5}" --window-steps "${WINDOW_STEPS:-5}" --windows "${WINDOWS:-5}"
      --out "$OUT")
if [[ -n "${PEAK_TFLOPS:-}" ]]; then ARGS+=(--peak-tflops "$PEAK_TFLOPS"); fi
timeout "${TIMEOUT_S:-290}" "$PY" -m gair_model.benchmark "${ARGS[@]}" > /dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("samples_per_s", "step_time_s", "compiled", "warmup_seconds", "achieved_tflops", "peak_bf16_tflops", "mfu", "mfu_analytic_6ND", "max_memory_allocated_gib")
print(json.dumps({"gpu": r["machine"].get("gpu_name"), **{k: r.get(k) for k in keys}, "out": sys.argv[1]}))
PYEOF
