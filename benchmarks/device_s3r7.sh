#!/usr/bin/env bash
# Session 3, call 7, one GPU: what the backward kernel prefetches. Nsight Compute (call 3)
# put it at 255 registers per thread (8 one-warp programs per SM, 1.45 waves), and the
# estimate is that the prefetched next chunk holds ~90 of them. GPU checks of the new
# variants; one layer's scan fwd+bwd for prefetch all / channels (B and C rows loaded in
# place) / none, with tiling neighbours; the training step at the same tokens for L=2048
# and L=16384 (B=1: segments) for the three prefetch modes.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="timeout 300 python3 scripts/benchmark.py --warmup 2 --repeats 5"
V=pallas,pallas:bwd_prefetch=channels,pallas:bwd_prefetch=none
PYTHONPATH=. $B --workloads check,scan --check-impls pallas:bwd_prefetch=channels,pallas:bwd_prefetch=none \
  --impls $V,pallas:bwd_prefetch=none:bwd_num_warps=2,pallas:bwd_prefetch=none:bwd_block_e=16:bwd_num_warps=2,pallas:bwd_block_e=4,pallas:bwd_prefetch=channels:bwd_block_e=4 \
  --scan-modes fwd+bwd --scan-repeats 10 --out "$OUT/scan-prefetch.json" 2>&1 | grep -E "CHECK|^scan|rror"
$Q
PYTHONPATH=. $B --workloads train --train-impls $V --tokens-per-step 16384 --length 2048,16384 \
  --out "$OUT/train-prefetch.json" 2>&1 | grep -E "^train|rror"
$Q
