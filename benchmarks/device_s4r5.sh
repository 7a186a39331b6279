#!/usr/bin/env bash
# Session 4, call 5, one GPU. The backward's dB/dC partial sums in B's and C's dtype (bf16
# in training; `bwd_partials=input`, new default) against fp32 partials (the previous
# default), and 8 channels on 2 warps per backward program. GPU check first; training step
# at B=8 L=2048 and B=1 L=16384; then scripts/pretrain.py (biomamba-130m preset, logging
# every 10 steps) for the tree and the session start (b1027fb) in the same call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
PYTHONPATH=. timeout 120 python3 scripts/benchmark.py --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL"
T="timeout 200 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads train"
PYTHONPATH=. $T --train-impls pallas,pallas:bwd_partials=float32,pallas:bwd_block_e=8:bwd_num_warps=2 --batch 8 --length 2048 \
  --out "$OUT/train2k.json" 2>&1 | grep -E '^train|rror' | cut -c1-160
PYTHONPATH=. $T --train-impls pallas,pallas:bwd_partials=float32 --batch 1 --length 16384 \
  --out "$OUT/train16k.json" 2>&1 | grep -E '^train|rror' | cut -c1-160
python3 -c "
import json
for f in ('train2k', 'train16k'):
    for r in json.load(open('$OUT/' + f + '.json'))['results']:
        print(f, r['impl'], 'loss', r.get('loss'), 'tok/s', r.get('tokens_per_s'))
"
$Q
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
DATA=$(mktemp -d)/data
PYTHONPATH=/tmp/site:. python3 $D prepare --out $DATA --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
C="data.dir=$DATA model.init=random run.export_hf=false run.eval_batches=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384 run.steps=42 run.log_every=10"
PYTHONPATH=/tmp/site:. timeout 150 python3 $D run --name tree-log10 --json $J $C run.out_dir=$(mktemp -d)/r 2>&1 | grep -E "rror" | cut -c1-200
PYTHONPATH=/tmp/site:.carry/baseline timeout 150 python3 $D run --name start-log10 --json $J $C run.out_dir=$(mktemp -d)/r 2>&1 | grep -E "rror" | cut -c1-200
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:14s} {r['device']} steps {r['steps']} tok/s {r['tokens_per_s']:>9,.0f} peak {r['peak_gib_per_device']:.1f} GiB loss {r['first_loss']:.3f}->{r['last_loss']:.3f}\")
"
$Q
