#!/usr/bin/env bash
# Session 4, call 3, one GPU. Training step at 16,384 tokens per step, L = 2k, 4k, 8k, 16k
# for the new defaults (segment sums in 32-step tiles, forward segments only below 384
# programs), and the previous defaults (`segment_pass=scan:min_programs=768`) at 4k, 8k
# and 16k in the same call. Then one layer's scan at B=1 L=16k with 8 forward segments
# and 16 backward ones, and GPU checks of the variants call 2's check timeout cut off.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
T="timeout 250 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train --tokens-per-step 16384"
PYTHONPATH=. $T --train-impls pallas --length 2048,4096,8192,16384 --out "$OUT/lsweep.json" 2>&1 | grep -E '^train|rror' | cut -c1-160
$Q
PYTHONPATH=. $T --train-impls pallas:segment_pass=scan:min_programs=768 --length 4096,8192,16384 --out "$OUT/lsweep-prev.json" 2>&1 | grep -E '^train|rror' | cut -c1-160
$Q
PYTHONPATH=. timeout 60 python3 scripts/benchmark.py --warmup 2 --workloads scan --scan-modes layer-fwd,layer-fwd+bwd --scan-repeats 10 \
  --impls pallas,pallas:segments=8:bwd_segments=16 --scan-shape 1,16384,1536,16 --out "$OUT/scan16k.json" 2>&1 | grep -E '^\{' | cut -c1-140
PYTHONPATH=. timeout 100 python3 scripts/benchmark.py --workloads check --check-impls pallas:fuse=true:bwd_fuse=all,pallas:sum_tile=8 \
  --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
$Q
