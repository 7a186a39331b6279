#!/usr/bin/env bash
# One device call, one GPU: the Pallas tiling sweep after the next-chunk prefetch (one
# layer's normalised scan, B=8 L=2048 E=1536 N=16, forward and forward+backward), then the
# Mamba-130m training step (bf16, B=8 L=2048) for the default and the sweep's fastest.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
V=pallas,pallas:chunk=4,pallas:chunk=16,pallas:num_warps=4,pallas:bwd_num_warps=4,pallas:num_warps=1:bwd_num_warps=1
V=$V,pallas:block_e=32:num_warps=4,pallas:bwd_block_e=8,pallas:bwd_block_e=8:bwd_num_warps=1,pallas:chunk=4:bwd_block_e=32:bwd_num_warps=4
PYTHONPATH=. timeout 330 python3 scripts/benchmark.py --workloads scan --impls $V --scan-modes fwd,fwd+bwd \
  --scan-repeats 10 --warmup 2 --out "$OUT/sweep.json" 2>&1 | grep -E "^scan"
BEST=$(python3 -c "
import json
rows = [r for r in json.load(open('$OUT/sweep.json'))['results'] if r.get('mode') == 'fwd+bwd' and 'ms' in r]
print(min(rows, key=lambda r: r['ms'])['impl'])")
echo "fastest fwd+bwd: $BEST"
PYTHONPATH=. timeout 200 python3 scripts/benchmark.py --workloads train --train-impls "pallas,$BEST" \
  --batch 8 --length 2048 --warmup 2 --repeats 5 --out "$OUT/train.json" 2>&1 | grep -E "^train"
