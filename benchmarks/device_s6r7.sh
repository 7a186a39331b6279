#!/usr/bin/env bash
# Session 6, call 7 (one GPU, the session's last ~4 minutes of device time): one
# scripts/pretrain.py run (biomamba-130m preset, 16,384 tokens per step, logging every 10)
# on the new kernels, as in device_s5r3.sh but without the alternated baseline, which did
# not fit: compare with mamba_ssm's anchor only.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=$PWD/benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
DATA=$(mktemp -d)/data
PYTHONPATH=/tmp/site:. timeout 60 python3 $D prepare --out $DATA --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
C="data.dir=$DATA model.init=random run.export_hf=false run.eval_batches=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384 run.steps=42 run.log_every=10"
PYTHONPATH=/tmp/site:. timeout 100 python3 $D run --name tree --json $J $C run.out_dir=$(mktemp -d)/r 2>&1 | grep -E "rror" | cut -c1-300
$Q
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:6s} {r['device']} steps {r['steps']} tok/s {r['tokens_per_s']:>9,.0f} peak {r['peak_gib_per_device']:.1f} GiB loss {r['first_loss']:.4f}->{r['last_loss']:.4f}\")
"
