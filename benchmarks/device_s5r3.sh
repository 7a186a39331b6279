#!/usr/bin/env bash
# Session 5, call 3, one GPU. scripts/pretrain.py (biomamba-130m preset, 16,384 tokens per
# step, logging every 10) with the gradient norm in two stages and computed once
# (training.global_norm, the clip taking it from the step) against the session start's
# code (.carry/baseline) in the same call, alternated twice. The first pair also writes a
# per-op profile (run.profile_steps=6) and the optimised HLO, and prints the fused
# computations behind the heaviest single-launch XLA ops (benchmarks/hlo_fusions.py).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
Q="nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv,noheader"
$Q
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=$PWD/benchmarks/pretrain_device.py; J=$OUT/pretrain.jsonl
DATA=$(mktemp -d)/data
PYTHONPATH=/tmp/site:. python3 $D prepare --out $DATA --tokenizer .carry/tokenizer.json --files 1 --docs 3000 --workers 12 | tail -1 || exit 1
C="data.dir=$DATA model.init=random run.export_hf=false run.eval_batches=2 run.eval_every=1000 run.checkpoint_every=1000 batch.global_batch_tokens=16384 run.steps=42 run.log_every=10"
run() {  # name, code dir, extra overrides
  local name=$1 code=$2; shift 2
  local dir; dir=$(mktemp -d)
  PYTHONPATH=/tmp/site:$code timeout 150 python3 $D run --name $name --json $J $C run.out_dir=$dir/r "$@" 2>&1 \
    | tee -a "$OUT/log.txt" | grep -E "rror|profile of" | cut -c1-300
  [ -f $dir/r/profile.json ] && cp $dir/r/profile.json "$OUT/$name-profile.json"
}
for who in tree base; do
  code=$PWD; [ $who = base ] && code=$PWD/.carry/baseline
  rm -rf /tmp/dump-$who
  XLA_FLAGS="--xla_dump_to=/tmp/dump-$who --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" \
    run $who-profile $code run.profile_steps=6
  hlo=$(ls -S /tmp/dump-$who/*train_step*after_optimizations.txt 2>/dev/null | head -1)
  if [ -n "$hlo" ]; then
    gzip -c "$hlo" > "$OUT/$who-train-step-hlo.txt.gz"
    python3 benchmarks/hlo_fusions.py "$OUT/$who-profile-profile.json" "$hlo" 4 > "$OUT/$who-fusions.txt" 2>&1
    grep -c "opt-barrier" "$hlo"
  fi
done
$Q
for i in 1 2; do run tree-$i $PWD; run base-$i $PWD/.carry/baseline; done
python3 -c "
import json
for l in open('$J'):
    r = json.loads(l); print(f\"pretrain.py {r['name']:14s} {r['device']} steps {r['steps']} tok/s {r['tokens_per_s']:>9,.0f} peak {r['peak_gib_per_device']:.1f} GiB loss {r['first_loss']:.4f}->{r['last_loss']:.4f}\")
"
$Q
