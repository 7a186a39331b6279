#!/usr/bin/env bash
# Session 4, call 4, one GPU: scripts/pretrain.py (biomamba-130m preset, B=8 L=2048) for
# the session start (b1027fb, .carry/baseline) and the tree, where a log step's metrics are
# read after the next step is queued. Logging every 2 steps (the harness until now) and
# every 10 (the preset). Then GPU checks with the 2045-step shape (2 segments, 32-step
# segment-sum tiles). Fresh output dirs; clocks logged.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
DATA=$(mktemp -d)/data
PYTHONPATH=/tmp/site:. python3 $D prepare --out $DATA --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=$DATA model.init=random run.export_hf=false run.eval_batches=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
for every in 2 10; do
  steps=$((every == 2 ? 16 : 42))
  C="$COMMON run.steps=$steps run.log_every=$every"
  PYTHONPATH=/tmp/site:. timeout 150 python3 $D run --name tree-log$every --json $J $C run.out_dir=$(mktemp -d)/r 2>&1 | grep -E "rror" | cut -c1-200
  PYTHONPATH=/tmp/site:.carry/baseline timeout 150 python3 $D run --name start-log$every --json $J $C run.out_dir=$(mktemp -d)/r 2>&1 | grep -E "rror" | cut -c1-200
done
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:14s} {r['device']} steps {r['steps']} tok/s {r['tokens_per_s']:>9,.0f} peak {r['peak_gib_per_device']:.1f} GiB wall {r['wall_s']:.0f} s\")
"
$Q
PYTHONPATH=. timeout 150 python3 scripts/benchmark.py --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK|FAIL|2045"
$Q
