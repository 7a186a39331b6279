#!/usr/bin/env bash
# One device call, one GPU: prefill (B=1, L=8k and 64k) and greedy decode (prompt 128,
# 128 new tokens, B=1 and 32) of Mamba-130m bf16 for the tree (layer loop unrolled or
# not) and for the baseline copy at .carry/baseline, in the same call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
PYTHONPATH=. timeout 330 python3 scripts/benchmark.py --workloads prefill,decode --impls pallas \
  --prefill-length 8192,65536 --decode-batch 1,32 --decode-unroll 1,0 --warmup 2 --repeats 5 \
  --out "$OUT/new-infer.json" 2>&1 | tail -9
(cd .carry/baseline && PYTHONPATH=. timeout 200 python3 scripts/benchmark.py --workloads prefill,decode \
  --impls pallas --prefill-length 8192 --decode-batch 1,32 --warmup 2 --repeats 5 \
  --out "$OUT/baseline-infer.json" 2>&1 | tail -5)
