#!/usr/bin/env bash
# Session 5, call 2, one GPU. (1) The time-parallel forward, per-state variant
# (tp_per_state=true: (T, E_blk) blocks scanned one state column at a time, as mamba_ssm
# does), checked on the GPU, then one layer's forward at B=1 L=16k and B=8 L=2k and prefill
# at 8k/64k against "pallas" in the same call. (2) scripts/pretrain.py (biomamba-130m
# preset) with run.profile_steps=6: where the real loop's step time goes, against the
# benchmark step's profile (session 4, call 6).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
B="python3 scripts/benchmark.py --plugin benchmarks/time_parallel_forward.py --warmup 2 --repeats 5"
PS="pallas_tp:tp_per_state=true:tp_num_warps=4"
PYTHONPATH=. timeout 100 $B --workloads check --check-impls "$PS:tile=64" --out "$OUT/check.json" 2>&1 \
  | tee -a "$OUT/log.txt" | grep -E "CHECK|FAIL|rror" | cut -c1-300
TP="$PS:tile=64,$PS:tile=128,$PS:tile=256,$PS:tile=128:tp_block_e=4,$PS:tile=256:tp_block_e=4,$PS:tile=128:tp_block_e=16"
TP="$TP,pallas_tp:tp_per_state=true:tp_num_warps=2:tile=64:tp_block_e=4,pallas_tp:tile=64:tp_num_warps=4:tp_block_e=4"
M="--workloads scan --scan-modes layer-fwd --scan-repeats 10 --impls pallas,$TP"
PYTHONPATH=. timeout 120 $B $M --scan-shape 1,16384,1536,16 --out "$OUT/scan16k.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E '^\{' | cut -c1-150
PYTHONPATH=. timeout 90 $B $M --scan-shape 8,2048,1536,16 --out "$OUT/scan2k.json" 2>&1 | tee -a "$OUT/log.txt" | grep -E '^\{' | cut -c1-150
$Q
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
DATA=$(mktemp -d)/data; RUN=$(mktemp -d)/r
PYTHONPATH=/tmp/site:. python3 $D prepare --out $DATA --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
C="data.dir=$DATA model.init=random run.export_hf=false run.eval_batches=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384 run.steps=42 run.log_every=10"
PYTHONPATH=/tmp/site:. timeout 170 python3 $D run --name tree-profile6 --json $J $C run.profile_steps=6 run.out_dir=$RUN 2>&1 \
  | tee -a "$OUT/log.txt" | grep -E "rror|profile|  [0-9.]+ ms" | cut -c1-220
cp $RUN/profile.json "$OUT/pretrain-profile.json" 2>/dev/null
$Q
PYTHONPATH=. timeout 80 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train --train-impls pallas --batch 8 --length 2048 \
  --profile 20 --out "$OUT/bench-profile2k.json" 2>&1 | grep -E "^PROFILE" | cut -c1-150
