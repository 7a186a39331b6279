#!/usr/bin/env bash
# Session 3, call 4, one GPU, Mamba-130m bf16. .carry/baseline = session start (7f428a2),
# .carry/prev = call 3's tree (c1d28a2). GPU checks; training step B=8 L=2048 (remat scan,
# layers written out) prev against the tree (u, B, C reach the kernels in bf16; one
# micro-batch without a loop); scripts/pretrain.py session start against the tree (each with
# its preset's defaults); decode B=1/32 session start against the tree (per-layer cache
# carried); prefill with segment variants; the same-tokens length sweep.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
B="timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK"
T="--workloads train --train-impls pallas --remat scan --scan-layers false"
PYTHONPATH=.carry/prev $B $T --out "$OUT/train-prev.json" 2>&1 | grep -E "^train|rror"
PYTHONPATH=. $B $T --profile 12 --out "$OUT/train-tree.json" 2>&1 | grep -E "^train|PROFILE|rror"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
PYTHONPATH=/tmp/site:. python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=2 run.steps=16 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
PYTHONPATH=/tmp/site:.carry/baseline timeout 120 python3 $D run --name 1gpu-session-start --json $J $COMMON run.out_dir=/tmp/r-base 2>&1 | grep -E "rror" | cut -c1-200
PYTHONPATH=/tmp/site:. timeout 150 python3 $D run --name 1gpu-tree --json $J $COMMON run.out_dir=/tmp/r-new 2>&1 | grep -E "rror" | cut -c1-200
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:18s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB wall {r['wall_s']:.0f} s\")
"
(cd .carry/baseline && PYTHONPATH=. timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5 --workloads decode \
  --train-impls pallas --decode-batch 1,32 --out "$OUT/decode-baseline.json" 2>&1 | grep -E "^decode|rror")
PYTHONPATH=. $B --workloads decode --train-impls pallas --decode-batch 1,32 --out "$OUT/decode-tree.json" 2>&1 | grep -E "^decode|rror"
PYTHONPATH=. $B --workloads prefill --train-impls pallas,pallas:min_programs=1536:max_segment_length=512,pallas:block_e=8:num_warps=1 \
  --prefill-length 8192 --out "$OUT/prefill-variants.json" 2>&1 | grep -E "^prefill|rror"
PYTHONPATH=. $B --workloads prefill --train-impls pallas --prefill-length 65536 --out "$OUT/prefill-64k.json" 2>&1 | grep -E "^prefill|rror"
PYTHONPATH=. $B $T --tokens-per-step 16384 --length 1024,4096,8192,16384 --out "$OUT/lsweep.json" 2>&1 | grep -E "^train|rror"
