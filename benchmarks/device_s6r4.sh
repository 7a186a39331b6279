#!/usr/bin/env bash
# Session 6, call 4 (one GPU): the new defaults (ex2.approx exp; 32 channels per forward
# program and 16-step sum tiles when segmented, 16 and 32 otherwise) against the session
# start's kernels and tiling (approx_math=false:block_e=16:sum_tile=32) in the same call:
# GPU check, prefill B=1 at 8k and 64k, the length sweep at 16,384 tokens per step, and a
# per-op profile of the 64k prefill under the new defaults.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
START=pallas:approx_math=false:block_e=16:sum_tile=32
PYTHONPATH=. timeout 120 $B --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 110 $B --workloads prefill --prefill-length 8192,65536 --train-impls $START,pallas \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 260 $B --workloads train --train-impls $START,pallas --tokens-per-step 16384 \
  --length 2048,4096,8192,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 90 $B --workloads prefill --prefill-length 65536 --train-impls pallas --profile 40 \
  --out "$OUT/prefill-profile.json" 2>&1 | grep -E "^prefill|^PROFILE|rror" | cut -c1-150
