#!/usr/bin/env bash
# Session 4, call 2, one GPU. Segment pass 1 (forward end states, backward start adjoints)
# as sums over tiles of steps (`segment_pass=sum`, new default) against the step-by-step
# kernels (`segment_pass=scan`); forward segments only below 384 programs (B < 4 for
# Mamba-130m). GPU checks, one layer's scan (bf16, as the model calls it) at B=1 L=16k,
# B=2 L=8k, B=4 L=4k, and prefill at 8k and 64k (B=1).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="timeout 200 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check --check-impls pallas,pallas:segment_pass=scan,pallas:fuse=true:bwd_fuse=all,pallas:sum_tile=32:sum_num_warps=8 \
  --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
M="--workloads scan --scan-modes layer-fwd,layer-fwd+bwd --scan-repeats 10"
S="pallas,pallas:segment_pass=scan"
PYTHONPATH=. $B $M --impls $S,pallas:sum_tile=32,pallas:sum_tile=8,pallas:sum_num_warps=8,pallas:sum_num_warps=2 \
  --scan-shape 1,16384,1536,16 --out "$OUT/scan16k.json" 2>&1 | grep -E '^\{' | cut -c1-140
PYTHONPATH=. $B $M --impls $S,pallas:segments=4,pallas:segments=2:bwd_segments=2,pallas:segments=1:bwd_segments=1 \
  --scan-shape 2,8192,1536,16 --out "$OUT/scan8k.json" 2>&1 | grep -E '^\{' | cut -c1-140
PYTHONPATH=. $B $M --impls pallas,pallas:segments=4,pallas:segments=4:segment_pass=scan \
  --scan-shape 4,4096,1536,16 --out "$OUT/scan4k.json" 2>&1 | grep -E '^\{' | cut -c1-140
$Q
PYTHONPATH=. $B --workloads prefill --train-impls $S,pallas:sum_tile=32 --prefill-length 8192,65536 \
  --out "$OUT/prefill.json" 2>&1 | grep -E '^\{' | cut -c1-160
$Q
