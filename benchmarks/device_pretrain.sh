#!/usr/bin/env bash
# One device call: pretraining throughput on 1 GPU and on all NGPU GPUs (pmap and sharding),
# plus a loss curve from the 1-GPU run (CURVE_STEPS steps). NGPU defaults to every GPU.
# Run from the repo root on the GPU machine with .whl/ (grain, omegaconf, tensorboardX, ...)
# and .carry/ (GPT-NeoX tokenizer.json, the PubMed sample XML) carried along.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}; CURVE_STEPS=${CURVE_STEPS:-200}
D=benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
python3 $D prepare --out /tmp/data --tokenizer .carry/tokenizer.json --xml .carry/pubmed-29768149.xml --files 8 --docs 2500 --workers 12 || exit 1
COMMON="data.dir=/tmp/data model.init=random run.export_hf=false run.eval_batches=4"
CUDA_VISIBLE_DEVICES=0 timeout 220 python3 $D run --name 1gpu-mb8-curve --json $J $COMMON run.out_dir=/tmp/r1 \
  batch.global_batch_tokens=16384 batch.micro_batch_per_device=8 run.steps=$CURVE_STEPS run.log_every=10 \
  run.eval_every=50 run.checkpoint_every=100 optim.warmup_steps=20 2>&1 | grep -vE "^\s*[0-9]+%" | tail -25
cp /tmp/r1/metrics.jsonl $OUT/curve-metrics.jsonl 2>/dev/null
for P in pmap sharding; do
  timeout 150 python3 $D run --name ${NGPU}gpu-$P-mb8 --json $J $COMMON run.out_dir=/tmp/r-$P \
    batch.global_batch_tokens=$((NGPU * 16384)) batch.micro_batch_per_device=8 run.steps=24 run.log_every=4 \
    run.eval_every=1000 run.checkpoint_every=1000 parallel.mode=$P 2>&1 | grep -E "RESULT|rror|plan|devices|batch " | tail -8
done
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 $D run --name 1gpu-mb16 --json $J $COMMON run.out_dir=/tmp/r2 \
  batch.global_batch_tokens=65536 batch.micro_batch_per_device=16 run.steps=12 run.log_every=2 \
  run.eval_every=1000 run.checkpoint_every=1000 2>&1 | grep -E "RESULT|rror" | tail -4
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"{r['name']:22s} {r['device']} x{r['devices']} tok/s {r['tokens_per_s']:>10,.0f} per-dev {r['tokens_per_s_per_device']:>10,.0f} mfu {r['mfu']:.3f} peak {r['peak_gib_per_device']:.1f} GiB\")
"
