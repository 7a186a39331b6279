#!/usr/bin/env bash
# Next session, one GPU (not run yet): does the time-parallel forward
# (benchmarks/time_parallel_forward.py) compile for the GPU, match the reference, and how
# fast is one layer's forward at B=1 against the library's segmented Pallas forward?
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,clocks_throttle_reasons.active --format=csv,noheader
PYTHONPATH=. timeout 400 python3 benchmarks/time_parallel_bench.py --out "$OUT/tp.json" 2>&1 | cut -c1-300
