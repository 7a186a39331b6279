#!/usr/bin/env bash
# Session 5, call 5, one GPU. Segment composition as an associative scan (scan_pallas.
# _segment_recurrence) instead of a lax.scan over segments, against the code before it
# (.carry/baseline) in the same call: GPU check first; prefill B=1 at 8k and 64k; the
# training step at 16,384 tokens per step for L = 2k (no segments: a control), 4k, 8k, 16k.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
PYTHONPATH=. timeout 150 python3 scripts/benchmark.py --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
P="python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads prefill --train-impls pallas --prefill-length 8192,65536"
T="python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train --train-impls pallas --tokens-per-step 16384 --length 2048,4096,8192,16384"
for who in tree base; do
  dir=$PWD; [ $who = base ] && dir=$PWD/.carry/baseline
  (cd $dir && PYTHONPATH=. timeout 90 $P --out "$OUT/prefill-$who.json" 2>&1 | grep -E '^prefill|rror' | sed "s/^/$who /" | cut -c1-130)
done
$Q
for who in tree base; do
  dir=$PWD; [ $who = base ] && dir=$PWD/.carry/baseline
  (cd $dir && PYTHONPATH=. timeout 150 $T --out "$OUT/lsweep-$who.json" 2>&1 | grep -E '^train|rror' | sed "s/^/$who /" | cut -c1-130)
done
$Q
