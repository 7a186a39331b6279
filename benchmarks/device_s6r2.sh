#!/usr/bin/env bash
# Session 6, call 2 (one GPU): the kernels' exp as PTX ex2.approx (approx_math, new
# default) against libdevice's __nv_expf (approx_math=false: the code before, same tree),
# and fuse=delta again now that its softplus is ex2/lg2.approx. GPU check first. Prefill
# B=1 at 8k and 64k, with three tilings re-tried under the cheaper exp; training at 16,384
# tokens per step, L = 2k and 16k. Predictions in NOTES section 11.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 230 $B --workloads check --check-impls pallas,pallas:fuse=delta --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 180 $B --workloads prefill --prefill-length 8192,65536 \
  --train-impls pallas:approx_math=false,pallas,pallas:fuse=delta,pallas:block_e=32,pallas:sum_tile=16,pallas:sum_num_warps=8 \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 150 $B --workloads train --train-impls pallas:approx_math=false,pallas --tokens-per-step 16384 \
  --length 2048,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
