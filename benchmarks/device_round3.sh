#!/usr/bin/env bash
# One device call, one GPU, Mamba-130m bf16 remat full, the tree's defaults (unfused
# kernels with next-chunk prefetch): the same-tokens length sweep (16,384 tokens per step,
# L=1k..16k); segment and tiling variants at L=16k B=1 and L=2k B=8; prefill variants;
# then scripts/pretrain.py (real loader, AdamW, B=8 L=2048) for the tree and for the
# baseline copy at .carry/baseline (the commit before this work), in the same call.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
B="timeout 150 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads train --train-impls pallas --tokens-per-step 16384 \
  --length 1024,2048,4096,8192,16384 --out "$OUT/lsweep.json" 2>&1 | tail -6
PYTHONPATH=. $B --workloads train --train-impls pallas:min_programs=1024,pallas:min_programs=128,pallas:bwd_block_e=8 \
  --tokens-per-step 16384 --length 16384 --out "$OUT/l16k-variants.json" 2>&1 | tail -4
PYTHONPATH=. $B --workloads train --train-impls pallas:min_programs=1024 --batch 8 --length 2048 \
  --out "$OUT/l2k-segments.json" 2>&1 | tail -2
PYTHONPATH=. $B --workloads prefill --train-impls pallas,pallas:min_programs=1536:min_segment_length=256 \
  --prefill-length 8192,65536 --out "$OUT/prefill-variants.json" 2>&1 | tail -5
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
PYTHONPATH=/tmp/site:. python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=2 run.steps=16 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
for VARIANT in baseline:.carry/baseline prefetch-segments:.; do
  NAME=${VARIANT%%:*}; PKG=${VARIANT#*:}
  PYTHONPATH=/tmp/site:$PKG timeout 100 python3 $D run --name 1gpu-$NAME --json $J $COMMON run.out_dir=/tmp/r-$NAME 2>&1 | grep -E "rror|RESULT" | cut -c1-200
done
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"{r['name']:28s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB\")
"
