#!/usr/bin/env bash
# Session 3, call 1, one GPU, Mamba-130m bf16: GPU checks; the training step (B=8 L=2048)
# under remat full and the new remat "scan" (keeps the scan kernel's output and chunk
# states), each profiled per kernel; the same-tokens length sweep under remat scan; prefill
# (B=1, 8k) and decode (B=32) profiled; scripts/pretrain.py under remat full and scan.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
B="timeout 200 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK"
for REMAT in full scan; do
  PYTHONPATH=. $B --workloads train --train-impls pallas --remat $REMAT --profile 40 \
    --out "$OUT/train-$REMAT.json" 2>&1 | grep -E "^train|PROFILE|rror"
done
PYTHONPATH=. $B --workloads train --train-impls pallas --remat scan --tokens-per-step 16384 \
  --length 1024,4096,16384 --out "$OUT/lsweep-scan.json" 2>&1 | grep -E "^train|rror"
PYTHONPATH=. $B --workloads prefill,decode --train-impls pallas --prefill-length 8192 --decode-batch 32 \
  --profile 30 --out "$OUT/prefill-decode.json" 2>&1 | grep -E "^prefill|^decode|PROFILE|rror"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
PYTHONPATH=/tmp/site:. python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=2 run.steps=16 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
for REMAT in full scan; do
  PYTHONPATH=/tmp/site:. timeout 100 python3 $D run --name 1gpu-remat-$REMAT --json $J $COMMON model.remat=$REMAT run.out_dir=/tmp/r-$REMAT 2>&1 | grep -E "rror" | cut -c1-200
done
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:18s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB\")
"
