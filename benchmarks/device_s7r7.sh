#!/usr/bin/env bash
# Session 7, call 7 (one H100): the final numbers under fuse=auto (fuse=delta where the
# forward runs in segments, fuse=false elsewhere), against `pallas:fuse=false` in the same
# call. GPU check; the length sweep at 16,384 tokens per step; prefill B=1 at 8k and 64k.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 90 $B --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 200 $B --workloads train --train-impls pallas,pallas:fuse=false --tokens-per-step 16384 \
  --length 2048,4096,8192,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 80 $B --workloads prefill --prefill-length 8192,65536 --train-impls pallas,pallas:fuse=false \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
