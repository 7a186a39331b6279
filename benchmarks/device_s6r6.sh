#!/usr/bin/env bash
# Session 6, call 6 (one GPU, the session's last device time): the 64k prefill sits at
# 0.99-1.00x mamba_ssm under the new defaults. Tilings around them, prefill B=1 at 8k and
# 64k, the default in the same call. No GPU check: same kernels as call 4's checked
# default, other tile sizes; none is adopted without one.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
PYTHONPATH=. timeout 200 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads prefill --prefill-length 8192,65536 \
  --train-impls pallas,pallas:max_segment_length=2048,pallas:sum_num_warps=2,pallas:chunk=16,pallas:num_warps=1,pallas:min_segment_length=256 \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
