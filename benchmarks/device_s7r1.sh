#!/usr/bin/env bash
# Session 7, call 1 (one GPU; written at the end of session 6, whose device time ran out).
# `pallas:fwd_bc=float32` (the forward's kernels read B and C in fp32, converted by
# XLA, instead of unpacking bf16 rows in every thread) against the default in the same
# call. SASS per loop trip for sm_90 (benchmarks/kernel_sass.py, pip Triton 3.5.1):
# forward 823 -> 723 instructions, segment sums 472 -> 453; registers 128 -> 167.
# Prediction (NOTES section 11): prefill 64k about -3.5 ms (~760k tok/s), unless the
# registers cost occupancy: in the proxy's record, variants that raised registers past
# ~128 measured slower than their counts said. So also chunk=4 (fewer prefetched rows:
# 96 registers with fwd_bc=float32, 362 instructions per 4-step trip, the same 12% fewer
# per element) and chunk=4 alone as its control. GPU check first; prefill B=1 at 8k and
# 64k; training at 16,384 tokens per step, L = 2k and 16k.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 180 $B --workloads check --check-impls pallas:fwd_bc=float32,pallas:fwd_bc=float32:chunk=4 --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 120 $B --workloads prefill --prefill-length 8192,65536 --train-impls pallas,pallas:fwd_bc=float32,pallas:fwd_bc=float32:chunk=4,pallas:chunk=4 \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 150 $B --workloads train --train-impls pallas,pallas:fwd_bc=float32 --tokens-per-step 16384 \
  --length 2048,16384 --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
