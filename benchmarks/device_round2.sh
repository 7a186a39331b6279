#!/usr/bin/env bash
# One device call, one GPU (Mamba-130m bf16, remat full): which parts of the backward to
# fuse (scan layer and training step, B=8 L=2048), prefill (B=1, 8k and 64k), greedy
# decode (prompt 128 + 128, B=1 and 32, layer loop unrolled or not), the same-tokens length
# sweep (16,384 tokens per step at L=1k..16k), and the baseline copy at .carry/baseline
# (the commit before the fused kernels) on train, prefill and decode in the same call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
B="timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check,scan,train,prefill,decode --check-impls pallas:bwd_fuse=off \
  --impls pallas,pallas:bwd_fuse=off,pallas:fuse=false --scan-modes fwd,layer-fwd,layer-fwd+bwd \
  --train-impls pallas,pallas:bwd_fuse=off,pallas:fuse=false --batch 8 --length 2048 \
  --decode-impl pallas --prefill-length 8192,65536 --decode-batch 1,32 --decode-unroll 1,0 \
  --out "$OUT/new.json" 2>&1 | grep -v '"workload"' | grep -v "^check" | cut -c1-300
(cd .carry/baseline && PYTHONPATH=. $B --workloads train,prefill,decode --impls pallas --train-impls pallas \
  --batch 8 --length 2048 --prefill-length 8192 --decode-batch 1,32 \
  --out "$OUT/baseline.json" 2>&1 | tail -6)
PYTHONPATH=. $B --workloads train --train-impls pallas --tokens-per-step 16384 --length 1024,4096,8192,16384 \
  --out "$OUT/new-lsweep.json" 2>&1 | tail -6
