#!/usr/bin/env bash
# For the next session's first call (one GPU; not run yet): `pallas:fuse=delta` (the dt
# bias and softplus inside the kernels, which then read the raw bf16 delta; D and the gate
# left to XLA) against the default in the same call. GPU check first; prefill B=1 at 8k
# and 64k; training at 16,384 tokens per step, L = 2k and 16k. Prediction (NOTES section
# 10): at 64k prefill about -9 ms per call (no fp32 (L, E) delta written and read three
# times per layer); in training, smaller.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 200 $B --workloads check --check-impls pallas:fuse=delta --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
PYTHONPATH=. timeout 120 $B --workloads prefill --train-impls pallas,pallas:fuse=delta --prefill-length 8192,65536 \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 200 $B --workloads train --train-impls pallas,pallas:fuse=delta --tokens-per-step 16384 \
  --length 2048,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
