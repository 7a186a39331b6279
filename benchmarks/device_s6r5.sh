#!/usr/bin/env bash
# Session 6, call 5 (one GPU): the fused variants again, now that their softplus and
# sigmoid run on ex2/lg2.approx too. The 64k prefill profile of call 4 shows XLA's fp32
# delta (24 x 0.258 ms) and an output multiply (0.234 ms per layer) that fuse=true takes
# into the kernels. GPU check of both, then prefill 8k/64k and training 2k/16k against the
# default in the same call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 150 $B --workloads check --check-impls pallas:fuse=true,pallas:fuse=delta --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 90 $B --workloads prefill --prefill-length 8192,65536 --train-impls pallas,pallas:fuse=true,pallas:fuse=delta \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 150 $B --workloads train --train-impls pallas,pallas:fuse=true,pallas:fuse=delta --tokens-per-step 16384 \
  --length 2048,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
