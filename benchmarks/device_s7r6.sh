#!/usr/bin/env bash
# Session 7, call 6 (one H100): call 5 measured the B=4 L=4k step under fuse=delta at
# 137,131 tok/s, 7% under B=8 L=2k and under call 2's fuse=false at that shape. Same call:
# fuse=false against fuse=delta at B=4 L=4k (and B=2 L=8k as control), then a profile of the
# B=4 L=4k step under each.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 200 $B --workloads train --train-impls pallas:fuse=false,pallas --tokens-per-step 16384 --length 4096,8192 \
  --profile 12 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror|PROFILE' | cut -c1-130
$Q
