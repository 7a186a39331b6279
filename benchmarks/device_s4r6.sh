#!/usr/bin/env bash
# Session 4, call 6, one GPU: final numbers for this session's defaults (segment sums, no
# segments from 384 programs up, bf16 dB/dC partials, step-by-step segment pass removed).
# GPU check; training step at 16,384 tokens per step for L = 2k..16k, the tree and the
# session start (b1027fb, .carry/baseline) in the same call; prefill B=1 at 8k and 64k for
# both; then a per-op profile and the optimised HLO of the B=8 L=2048 step.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
PYTHONPATH=. timeout 100 python3 scripts/benchmark.py --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
T="python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train --train-impls pallas --tokens-per-step 16384 --length 2048,4096,8192,16384"
PYTHONPATH=. timeout 170 $T --out "$OUT/lsweep.json" 2>&1 | grep -E '^train|rror' | cut -c1-120
$Q
(cd .carry/baseline && PYTHONPATH=. timeout 170 $T --out "$OUT/lsweep-start.json" 2>&1 | grep -E '^train|rror' | cut -c1-120)
P="python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads prefill --train-impls pallas --prefill-length 8192,65536"
PYTHONPATH=. timeout 60 $P --out "$OUT/prefill.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-120
(cd .carry/baseline && PYTHONPATH=. timeout 60 $P --out "$OUT/prefill-start.json" 2>&1 | grep -E '^prefill|rror' | cut -c1-120)
$Q
PYTHONPATH=. timeout 90 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train --train-impls pallas --batch 8 --length 2048 \
  --profile 40 --dump-hlo /tmp/hlo --out "$OUT/profile2k.json" 2>&1 | grep -E "^PROFILE" | cut -c1-150
ls -S /tmp/hlo | head -3; f=$(ls -S /tmp/hlo/* | head -1); gzip -c "$f" > "$OUT/train2k-hlo.txt.gz"
$Q
