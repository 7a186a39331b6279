#!/usr/bin/env bash
# Session 5, call 1 (one GPU): does the time-parallel forward
# (benchmarks/time_parallel_forward.py, impl "pallas_tp") compile for the GPU and pass the
# checks, and how does it compare with "pallas" in the same call? One layer's scan at B=1
# L=16k and B=8 L=2k for five tilings; prefill B=1 at 8k and 64k; the training step at
# 16,384 tokens per step, L = 2k and 16k. Clocks logged.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --plugin benchmarks/time_parallel_forward.py --warmup 2 --repeats 5"
TP="pallas_tp,pallas_tp:tile=64,pallas_tp:tile=64:tp_num_warps=4,pallas_tp:tile=16:tp_block_e=16,pallas_tp:tp_num_warps=4"
PYTHONPATH=. timeout 150 $B --workloads check --check-impls pallas_tp,pallas_tp:tile=64 --out "$OUT/check.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E "CHECK|FAIL|rror" | cut -c1-300
M="--workloads scan --scan-modes layer-fwd,layer-fwd+bwd --scan-repeats 10 --impls pallas,$TP"
PYTHONPATH=. timeout 120 $B $M --scan-shape 1,16384,1536,16 --out "$OUT/scan16k.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E '^\{' | cut -c1-160
PYTHONPATH=. timeout 80 $B $M --scan-shape 8,2048,1536,16 --out "$OUT/scan2k.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E '^\{' | cut -c1-160
$Q
PYTHONPATH=. timeout 90 $B --workloads prefill --train-impls pallas,$TP --prefill-length 8192,65536 \
  --out "$OUT/prefill.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E '^prefill|rror' | cut -c1-140
PYTHONPATH=. timeout 180 $B --workloads train --train-impls pallas,pallas_tp --tokens-per-step 16384 --length 2048,16384 \
  --out "$OUT/train.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E '^train|rror' | cut -c1-140
$Q
