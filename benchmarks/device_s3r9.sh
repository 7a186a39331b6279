#!/usr/bin/env bash
# Session 3, call 9, one GPU: scripts/pretrain.py (biomamba-130m preset, B=8 L=2048) for
# the session start (7f428a2, .carry/baseline) and the tree with the new backward default
# (4 channels per program on an unsegmented grid). Fresh output dirs; clocks logged.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
DATA=$(mktemp -d)/data
PYTHONPATH=/tmp/site:. python3 $D prepare --out $DATA --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=$DATA model.init=random run.export_hf=false run.eval_batches=2 run.steps=16 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
PYTHONPATH=/tmp/site:. timeout 150 python3 $D run --name 1gpu-tree --json $J $COMMON run.out_dir=$(mktemp -d)/r-new 2>&1 | grep -E "rror" | cut -c1-200
PYTHONPATH=/tmp/site:.carry/baseline timeout 120 python3 $D run --name 1gpu-session-start --json $J $COMMON run.out_dir=$(mktemp -d)/r-base 2>&1 | grep -E "rror" | cut -c1-200
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:18s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB wall {r['wall_s']:.0f} s\")
"
$Q
