#!/usr/bin/env bash
# One device call, one GPU: GPU correctness checks of the fused/segmented Pallas scan, then
# one layer's scan and the Mamba-130m training step (bf16, B=8, L=2048, remat full) for the
# tree's kernels and for the baseline copy of the package at .carry/baseline (the commit
# before them), re-measured in the same call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
PYTHONPATH=. timeout 360 python3 scripts/benchmark.py --workloads check,scan,train \
  --check-impls pallas,pallas:min_programs=100000:min_segment_length=64 \
  --impls pallas,pallas:fuse=false,pallas:bwd_block_e=32:bwd_num_warps=4 \
  --scan-modes fwd+bwd,layer-fwd,layer-fwd+bwd --scan-repeats 10 \
  --train-impls pallas,pallas:fuse=false --batch 8 --length 2048 --warmup 2 --repeats 5 \
  --out "$OUT/new-train.json" 2>&1 | grep -v '"workload": "check"' | cut -c1-400
(cd .carry/baseline && PYTHONPATH=. timeout 170 python3 scripts/benchmark.py --workloads scan,train \
  --impls pallas --train-impls pallas --batch 8 --length 2048 --warmup 2 --repeats 5 \
  --out "$OUT/baseline-train.json" 2>&1 | tail -6)
