#!/usr/bin/env bash
# Session 6, call 8 (one GPU, the last ~2 minutes of device time): the forward's kernels
# read B and C in fp32 (converted by XLA) instead of unpacking bf16 rows per thread; SASS
# per forward loop trip 823 -> 723 instructions, segment sums 472 -> 453 (kernel_sass.py).
# GPU check (short), then prefill B=1 at 64k for the tree and for HEAD before the change
# (.carry/baseline) in the same call. Prediction: about -3.5 ms per 64k prefill.
set -u
export PYTHONUNBUFFERED=1
B="python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. timeout 45 $B --workloads check --check-impls pallas --out "${OUT:-/tmp}/check.json" 2>&1 | grep -E "CHECK|FAIL|rror"
PYTHONPATH=. timeout 28 $B --workloads prefill --prefill-length 65536 --train-impls pallas 2>&1 | grep -E '^prefill|rror' | cut -c1-110
(cd .carry/baseline && PYTHONPATH=. timeout 28 $B --workloads prefill --prefill-length 65536 --train-impls pallas 2>&1 \
  | grep -E '^prefill|rror' | cut -c1-110)
nvidia-smi --query-gpu=clocks.sm,clocks_throttle_reasons.active --format=csv,noheader
