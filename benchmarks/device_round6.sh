#!/usr/bin/env bash
# One device call, one GPU, Mamba-130m bf16 remat full, with the backward tiling from the
# sweep (8 channels, 1 warp) as the default: GPU checks; the backward tiling neighbours on
# one layer's scan; the training step at B=8 L=2048; the same-tokens length sweep; then
# scripts/pretrain.py (B=8 L=2048) for the baseline copy at .carry/baseline and the tree.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
B="timeout 200 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check,scan --check-impls pallas --scan-modes fwd+bwd --scan-repeats 10 \
  --impls pallas,pallas:bwd_block_e=4,pallas:bwd_block_e=16,pallas:chunk=4 --out "$OUT/bwd-sweep.json" 2>&1 \
  | grep -E "CHECKS|^scan"
PYTHONPATH=. $B --workloads train --train-impls pallas --tokens-per-step 16384 \
  --length 1024,2048,4096,8192,16384 --out "$OUT/lsweep.json" 2>&1 | grep -E "^train"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
PYTHONPATH=/tmp/site:. python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=2 run.steps=16 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
for VARIANT in baseline:.carry/baseline tree:.; do
  NAME=${VARIANT%%:*}; PKG=${VARIANT#*:}
  PYTHONPATH=/tmp/site:$PKG timeout 100 python3 $D run --name 1gpu-$NAME --json $J $COMMON run.out_dir=/tmp/r-$NAME 2>&1 | grep -E "rror" | cut -c1-200
done
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:16s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB\")
"
