#!/usr/bin/env bash
# The whole pipeline, offline on a CPU in a few minutes: pretrain (synthetic PubMed) ->
# fine-tune (synthetic BioASQ-format questions) -> export -> evaluate base / pretrained /
# fine-tuned (+ the export through transformers) -> model card with the table.
# Outputs: runs/e2e/*, the report in runs/e2e/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
rm -rf runs/e2e
python scripts/pretrain.py --preset smoke run.out_dir=runs/e2e/pretrain data.dir=runs/e2e/data
# "base": the pretraining run's own starting point (tiny preset, random init, run.seed 0).
python - <<'PY'
from flax import nnx
from biomamba_jax import MambaConfig, MambaLM, save_pretrained
from pathlib import Path
config = MambaConfig.preset("tiny", vocab_size=264, dtype="float32", scan_impl="reference", remat="none")
save_pretrained(MambaLM(config, rngs=nnx.Rngs(0)), config, "runs/e2e/base",
                extra_files={"tokenizer.json": Path("runs/e2e/data/tokenizer/tokenizer.json")})
PY
python scripts/finetune.py --preset finetune-smoke --init runs/e2e/pretrain --out-dir runs/e2e/finetune
python conversions/jax_to_torch.py runs/e2e/finetune runs/e2e/export-hf --format hf
python scripts/evaluate.py --model base=runs/e2e/base --model pretrained=runs/e2e/pretrain \
    --model finetuned=runs/e2e/finetune --model finetuned-export=runs/e2e/export-hf \
    --bioasq tests/fixtures/bioasq/synthetic_test.json --pubmed-dir runs/e2e/data --max-docs 50 \
    --max-tokens 256 --run-dir runs/e2e/pretrain --run-dir runs/e2e/finetune --out runs/e2e/report
python conversions/jax_to_torch.py runs/e2e/finetune runs/e2e/export-hf --format hf --overwrite \
    --eval-report runs/e2e/report/report.json
