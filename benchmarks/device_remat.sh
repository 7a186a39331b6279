#!/usr/bin/env bash
# One device call, one GPU: scripts/pretrain.py throughput of Mamba-130m at L=2048 for each
# remat policy and micro-batch size (20 steps each; the first log lines hold compilation).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --xml .carry/pubmed-29768149.xml --files 4 --docs 2500 --workers 12 | tail -2 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=2 run.steps=20 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000"
for RUN in "full 8" "dots 8" "none 8" "full 16"; do
  set -- $RUN
  timeout 110 python3 $D run --name 1gpu-remat-$1-mb$2 --json $J $COMMON run.out_dir=/tmp/r-$1-$2 \
    model.remat=$1 batch.micro_batch_per_device=$2 batch.global_batch_tokens=$(($2 * 2048)) 2>&1 | grep -E "rror|RESULT" | cut -c1-300
done
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"{r['name']:22s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB\")
"
