#!/usr/bin/env bash
# Session 7, call 2 (one GPU). .carry/baseline = a4c3c67 (session start) run with
# `pallas:fwd_bc=float32`, i.e. call 1's winner, against the tree, whose default is now
# fwd_bc=float32 and whose pass-1 kernels also write each segment's delta total (XLA no
# longer sums the fp32 (B, L, E) delta again for the segment decays). Also the
# time-parallel forward experiment, now on ex2.approx too. GPU checks first; prefill B=1
# at 8k and 64k; the length sweep at 16,384 tokens per step (baseline at 2k and 16k); a
# per-op profile of the 64k prefill with every op listed. Predictions: NOTES section 12.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
TP=pallas_tp:tile=64:tp_num_warps=4
PYTHONPATH=. timeout 150 $B --plugin benchmarks/time_parallel_forward.py --workloads check --check-impls pallas,$TP \
  --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
(cd .carry/baseline && PYTHONPATH=. timeout 60 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads prefill \
  --prefill-length 8192,65536 --train-impls pallas:fwd_bc=float32 --out "$OUT/prefill-base.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130)
PYTHONPATH=. timeout 90 $B --plugin benchmarks/time_parallel_forward.py --workloads prefill --prefill-length 8192,65536 \
  --train-impls pallas,$TP --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
(cd .carry/baseline && PYTHONPATH=. timeout 100 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train \
  --train-impls pallas:fwd_bc=float32 --tokens-per-step 16384 --length 2048,16384 --out "$OUT/train-base.json" 2>&1 \
  | grep -E '^train|rror' | cut -c1-130)
PYTHONPATH=. timeout 170 $B --workloads train --train-impls pallas --tokens-per-step 16384 --length 2048,4096,8192,16384 \
  --out "$OUT/train.json" 2>&1 | grep -E '^train|rror' | cut -c1-130
$Q
PYTHONPATH=. timeout 80 $B --workloads prefill --prefill-length 65536 --train-impls pallas --profile 400 \
  --out "$OUT/prefill-profile.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-130
$Q
