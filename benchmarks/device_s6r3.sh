#!/usr/bin/env bash
# Session 6, call 3 (one GPU): with the ex2.approx exp, wider forward tiles won prefill in
# call 2 (block_e=32: 8k 584,836 vs 545,853; 64k 703,901 vs 690,758). GPU check of the
# block_e=32 tilings, then prefill variants around it and the training step at
# block_e=32 against the default; the default at L = 4k and 8k completes the length sweep.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 150 $B --workloads check --check-impls pallas:block_e=32,pallas:block_e=64:num_warps=4 \
  --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 170 $B --workloads prefill --prefill-length 8192,65536 \
  --train-impls pallas,pallas:block_e=32,pallas:block_e=32:num_warps=4,pallas:block_e=64:num_warps=4,pallas:block_e=32:sum_tile=16,pallas:block_e=32:target_programs=1536 \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 230 $B --workloads train --train-impls pallas,pallas:block_e=32 --tokens-per-step 16384 \
  --length 2048,4096,8192,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
