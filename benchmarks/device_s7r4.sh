#!/usr/bin/env bash
# Session 7, call 4 (one H100). Call 3 (one H200, by accident of the lease) profiled the
# 64k prefill under fuse=delta: 775,181 tok/s, other XLA 15.2 ms against 23.7 under the
# default on the H100 in call 2. Since the pass-1 kernels write the segment totals,
# fuse=delta no longer has XLA recompute the softplus over the whole (B, L, E) delta for
# the segment decays. So: the default against fuse=delta and fuse=true on the H100, same
# call. GPU check of both first; prefill B=1 at 8k and 64k; training at 16,384 tokens per
# step, L = 2k and 16k.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 150 $B --workloads check --check-impls pallas:fuse=delta,pallas:fuse=true --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 100 $B --workloads prefill --prefill-length 8192,65536 --train-impls pallas,pallas:fuse=delta,pallas:fuse=true \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 200 $B --workloads train --train-impls pallas,pallas:fuse=delta,pallas:fuse=true --tokens-per-step 16384 \
  --length 2048,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
