#!/usr/bin/env bash
# Session 3, call 2, one GPU, Mamba-130m bf16. The session-start code is carried as
# .carry/baseline (commit 7f428a2) and re-measured here. GPU checks; training step B=8
# L=2048: remat full under the layer scan (as before) against remat full / scan with the
# layers written out (scan_layers=false: no stacking copies), profiled, HLO kept; the
# length sweep for the written-out layers; prefill and decode (cache updated in place,
# tied head cast once) against the baseline; scripts/pretrain.py baseline against the tree.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
B="timeout 240 python3 scripts/benchmark.py --warmup 2 --repeats 5"
PYTHONPATH=. $B --workloads check --check-impls pallas --out "$OUT/check.json" 2>&1 | grep -E "CHECK"
PYTHONPATH=. $B --workloads train --train-impls pallas --remat full --out "$OUT/train-full-scanlayers.json" 2>&1 | grep -E "^train|rror"
for REMAT in full scan; do
  PYTHONPATH=. $B --workloads train --train-impls pallas --remat $REMAT --scan-layers false --profile 30 \
    --dump-hlo /tmp/hlo --out "$OUT/train-$REMAT-unrolled.json" 2>&1 | grep -E "^train|PROFILE|rror" | head -24
done
gzip -c /tmp/hlo/*remat_scan*false* > "$OUT/train-remat-scan-unrolled.hlo.txt.gz"
PYTHONPATH=. $B --workloads train --train-impls pallas --remat scan --scan-layers false --tokens-per-step 16384 \
  --length 1024,4096,16384 --out "$OUT/lsweep-unrolled.json" 2>&1 | grep -E "^train|rror"
PYTHONPATH=.carry/baseline $B --workloads prefill,decode --train-impls pallas --prefill-length 8192 \
  --decode-batch 1,32 --out "$OUT/baseline-prefill-decode.json" 2>&1 | grep -E "^prefill|^decode|rror"
PYTHONPATH=. $B --workloads prefill,decode --train-impls pallas --prefill-length 8192 --scan-layers false \
  --decode-batch 1,32 --profile 12 --out "$OUT/prefill-decode.json" 2>&1 | grep -E "^prefill|^decode|PROFILE|rror"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
PYTHONPATH=/tmp/site:. python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=2 run.steps=16 run.log_every=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384"
PYTHONPATH=/tmp/site:.carry/baseline timeout 120 python3 $D run --name 1gpu-baseline --json $J $COMMON run.out_dir=/tmp/r-base 2>&1 | grep -E "rror" | cut -c1-200
PYTHONPATH=/tmp/site:. timeout 240 python3 $D run --name 1gpu-scan-unrolled --json $J $COMMON model.remat=scan model.scan_layers=false run.out_dir=/tmp/r-new 2>&1 | grep -E "rror" | cut -c1-200
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:18s} {r['device']} tok/s {r['tokens_per_s']:>9,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB wall {r['wall_s']:.0f} s\")
"
