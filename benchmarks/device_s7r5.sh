#!/usr/bin/env bash
# Session 7, call 5 (one H100): the final numbers under the new default (fuse=delta), with
# the previous default (`pallas:fuse=false`) in the same call as the baseline. GPU check;
# prefill B=1 at 8k and 64k; the length sweep at 16,384 tokens per step (baseline at 2k
# and 16k); greedy decode at B=1 and B=32 (prompt 128, 128 new tokens).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 100 $B --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 80 $B --workloads prefill --prefill-length 8192,65536 --train-impls pallas:fuse=false,pallas \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 70 $B --workloads train --train-impls pallas:fuse=false --tokens-per-step 16384 --length 2048,16384 \
  --out "$OUT/train-base.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
PYTHONPATH=. timeout 130 $B --workloads train --train-impls pallas --tokens-per-step 16384 --length 2048,4096,8192,16384 \
  --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 90 $B --workloads decode --train-impls pallas --decode-batch 1,32 --out "$OUT/decode.json" 2>&1 \
  | grep -E '^decode|rror' | cut -c1-130
$Q
