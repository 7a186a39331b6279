#!/usr/bin/env bash
# Session 3, call 8, one GPU: call 7 timed one layer's scan fwd+bwd at 2.00 ms with 4
# channels per backward program against 2.40 ms for 8, and its bwd_prefetch=none variants
# never ran ("none" parsed as None; the value is now "off"). GPU checks of both; the
# training step (B=8 L=2048 and B=1 L=16384, same tokens) for the default, bwd_block_e=4
# and bwd_prefetch=off.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="timeout 300 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check --check-impls pallas:bwd_block_e=4,pallas:bwd_prefetch=off --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
PYTHONPATH=. $B --workloads train --train-impls pallas,pallas:bwd_block_e=4,pallas:bwd_prefetch=off --tokens-per-step 16384 \
  --length 2048,16384 --out "$OUT/train.json" 2>&1 | grep -E "^train|rror"
$Q
