#!/usr/bin/env bash
# One device call, one GPU: scripts/pretrain.py on Mamba-130m bf16, B=8 L=2048, with the
# session-2 kernels, under remat full (the preset's default), dots and none, in one call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
PYTHONPATH=/tmp/site:. python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=2 run.steps=16 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
for REMAT in full dots none; do
  PYTHONPATH=/tmp/site:. timeout 100 python3 $D run --name 1gpu-remat-$REMAT --json $J $COMMON model.remat=$REMAT run.out_dir=/tmp/r-$REMAT 2>&1 | grep -E "rror" | cut -c1-200
done
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:18s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB\")
"
