#!/usr/bin/env bash
# GPU training throughput + MFU of the paper config (two ViT-B: RS 96 px patch 8 / 10 bands, SV 224 px
# patch 16; NILI; GeoCLIP location encoder with a 4096 queue), batch 256, bf16 autocast, on ONE GPU.
# Writes bench/results/train_gpu.json (GPU name, samples/s median over timed windows, counted FLOPs,
# achieved TFLOP/s, MFU = achieved / peak dense bf16 FLOP/s, peak memory). Runs in well under 5 minutes.
#
#   bash bench/train_gpu.sh                 # defaults
#   PEAK_TFLOPS=989.4 bash bench/train_gpu.sh   # if the GPU name is not in the built-in peak table
#   BATCH=128 WINDOWS=3 bash bench/train_gpu.sh
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
ARGS=(--preset base --device cuda --precision bf16
      --batch-size "${BATCH:-256}" --queue-size "${QUEUE:-4096}"
      --warmup-steps "${WARMUP:-5}" --window-steps "${WINDOW_STEPS:-5}" --windows "${WINDOWS:-5}"
      --out "$OUT")
if [[ -n "${PEAK_TFLOPS:-}" ]]; then ARGS+=(--peak-tflops "$PEAK_TFLOPS"); fi
if [[ "${COMPILE:-0}" == "1" ]]; then ARGS+=(--compile); fi
timeout "${TIMEOUT_S:-290}" "$PY" -m gair_model.benchmark "${ARGS[@]}" > /dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("samples_per_s", "achieved_tflops", "peak_bf16_tflops", "mfu", "mfu_analytic_6ND", "max_memory_allocated_gib")
print(json.dumps({"gpu": r["machine"].get("gpu_name"), **{k: r.get(k) for k in keys}, "out": sys.argv[1]}))
PYEOF
