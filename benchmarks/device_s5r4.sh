#!/usr/bin/env bash
# Session 5, call 4, one GPU: where the time goes where issue 6's goals are not met.
# Per-op profiles (JAX profiler, top 30 ops) of prefill at B=1 L=8k and 64k and of the
# training step at B=1 L=16384, current code; the GPU check first.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --warmup 2 --repeats 5 --train-impls pallas --profile 30"
PYTHONPATH=. timeout 120 python3 scripts/benchmark.py --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
PYTHONPATH=. timeout 120 $B --workloads prefill --prefill-length 8192,65536 --out "$OUT/prefill-profile.json" 2>&1 \
  | grep -E "^prefill|^PROFILE|rror" | cut -c1-150
$Q
PYTHONPATH=. timeout 120 $B --workloads train --batch 1 --length 16384 --out "$OUT/train16k-profile.json" 2>&1 \
  | grep -E "^train|^PROFILE|rror" | cut -c1-150
$Q
