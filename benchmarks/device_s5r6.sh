#!/usr/bin/env bash
# Session 5, call 6, one GPU: with segment composition now cheap, do other segment counts
# or tilings make prefill faster? Prefill B=1 at 8k and 64k for the default and variants
# (more or fewer segments, 16-step sum tiles, 8 channels per forward program, 4 warps, the
# fused kernels), all in one call. The GPU check first for the variants it can cover.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
PYTHONPATH=. timeout 120 python3 scripts/benchmark.py --workloads check \
  --check-impls pallas:max_segment_length=4096,pallas:block_e=8,pallas:fuse=true --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
V="pallas,pallas:max_segment_length=4096,pallas:max_segment_length=2048,pallas:target_programs=1536,pallas:sum_tile=16"
V="$V,pallas:block_e=8,pallas:num_warps=4,pallas:fuse=true"
PYTHONPATH=. timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads prefill --train-impls $V \
  --prefill-length 8192,65536 --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
