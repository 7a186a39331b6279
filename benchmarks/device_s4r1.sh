#!/usr/bin/env bash
# Session 4, call 1, one GPU. The forward and the backward now pick their segment counts
# independently (`segments`, `bwd_segments`). GPU checks of mixed counts; one layer's
# scan (selective_scan as the model calls it, bf16) at B=1 L=16384 and B=4 L=4096 for
# backward segment counts and channels per program, against B=8 L=2048 (the flat target);
# then per-op profiles of the default training step at B=1 L=16384 and of the 8k prefill.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="timeout 200 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check --check-impls pallas,pallas:bwd_segments=1,pallas:segments=2:bwd_segments=8 \
  --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
M="--workloads scan --scan-modes layer-fwd,layer-fwd+bwd --scan-repeats 10"
V16="pallas"
for v in bwd_segments=1:bwd_block_e=2 bwd_segments=1:bwd_block_e=4 bwd_segments=2:bwd_block_e=4 bwd_segments=4:bwd_block_e=4 \
  bwd_segments=4:bwd_block_e=8 bwd_segments=8:bwd_block_e=4 bwd_segments=8:bwd_block_e=8 bwd_segments=16:bwd_block_e=4 \
  segments=8 segments=4:block_e=8:num_warps=1 segments=8:block_e=8:num_warps=1; do V16="$V16,pallas:$v"; done
PYTHONPATH=. $B $M --impls $V16 --scan-shape 1,16384,1536,16 --out "$OUT/scan16k.json" 2>&1 | grep -E '^\{' | cut -c1-140
V4="pallas"
for v in bwd_segments=1 bwd_segments=1:bwd_block_e=2 bwd_segments=2:bwd_block_e=4 bwd_segments=2:bwd_block_e=8 \
  segments=2 segments=1 segments=1:bwd_segments=1; do V4="$V4,pallas:$v"; done
PYTHONPATH=. $B $M --impls $V4 --scan-shape 4,4096,1536,16 --out "$OUT/scan4k.json" 2>&1 | grep -E '^\{' | cut -c1-140
PYTHONPATH=. $B $M --impls pallas --scan-shape 8,2048,1536,16 --out "$OUT/scan2k.json" 2>&1 | grep -E '^\{' | cut -c1-140
$Q
PYTHONPATH=. timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train,prefill --train-impls pallas \
  --batch 1 --length 16384 --prefill-length 8192 --profile 30 --out "$OUT/profile.json" 2>&1 | grep -E "^PROFILE|rror|tokens_per_s" | cut -c1-180
$Q
