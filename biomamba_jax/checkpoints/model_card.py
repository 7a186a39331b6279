"""The README.md model card written next to exported weights.

It records what the weights are (architecture, source), how they were trained (the run's
task, data files or corpus, steps, best validation loss, from `config.yaml` and
`summary.json`), and, when given, the evaluation table of `scripts/evaluate.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from biomamba_jax.model.config import MambaConfig

__all__ = ["model_card"]

FORMAT_USAGE = {
    "hf": ("from transformers import AutoTokenizer, MambaForCausalLM\n"
           "model = MambaForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)"),
    "mamba_ssm": ("from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel\n"
                  "model = MambaLMHeadModel.from_pretrained(PATH)"),
}


def _training_lines(run_dir: Path) -> list[str]:
    lines = []
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    data = summary.get("data") or {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.load(config_path)
        lines.append(f"- run `{config.get('name')}` in `{run_dir}`, started from `{config.model.init}`")
        lines.append(f"- optimizer: AdamW, peak lr {config.optim.peak_lr}, warmup {config.optim.warmup_steps} steps, "
                     f"weight decay {config.optim.weight_decay}, {config.batch.global_batch_tokens:,} tokens per step")
        if not data and "finetune" in config and config.finetune.train_files:
            data = {"task": "finetune", "train_files": list(config.finetune.train_files)}
        elif not data:
            data = {"task": "pretrain", "data_dir": config.data.dir}
    if data.get("task") == "finetune":
        lines.append(f"- task: supervised fine-tuning on BioASQ factoid questions (loss on answer tokens + EOS): "
                     f"{', '.join(f'`{f}`' for f in data.get('train_files', []))}; "
                     f"{data.get('train_questions', '?')} train / {data.get('val_questions', '?')} validation "
                     f"questions (held out by question-id hash)")
    elif data:
        synthetic = " (synthetic PubMed-format corpus)" if data.get("synthetic") else ""
        lines.append(f"- task: next-token pretraining on the PubMed corpus in `{data.get('data_dir')}`{synthetic}, "
                     f"{data.get('train_tokens') or '?'} training tokens")
    if summary:
        lines.append(f"- steps: {summary.get('final_step')} of {summary.get('total_steps', summary.get('final_step'))}"
                     + (f", stopped by {summary['stopped_by']}" if summary.get("stopped_by") else ""))
        if summary.get("best_val_loss") is not None:
            lines.append(f"- best validation loss {summary['best_val_loss']:.4f} at step {summary.get('best_step')}; "
                         f"exported step {summary.get('exported_step', summary.get('final_step'))}")
    return lines


def _evaluation_lines(report: Path) -> list[str]:
    if report.suffix == ".json":
        from biomamba_jax.evaluation.evaluate import REPORT_NOTE, markdown_table

        values = json.loads(report.read_text())
        return [values.get("note", REPORT_NOTE), "", markdown_table(values["results"])]
    text = report.read_text()
    return [line for line in text.splitlines() if not line.startswith("![")]  # plots stay behind


def model_card(source: str, config: MambaConfig, fmt: str, run_dir: Optional[Path] = None,
               eval_report: Optional[Path] = None) -> str:
    lines = ["---", "library_name: transformers" if fmt == "hf" else "library_name: mamba_ssm",
             "tags: [mamba, biomedical, biomamba]", "---", "", "# BioMamba (biomamba-jax export)", "",
             f"Mamba-1 causal LM: d_model {config.d_model}, {config.n_layer} layers, d_state {config.d_state}, "
             f"vocabulary {config.vocab_size}. Weights from {source}, exported to the {fmt} format "
             "by `conversions/jax_to_torch.py`.", "", "## Usage", "", "```python",
             FORMAT_USAGE[fmt], "```", ""]
    if run_dir is not None:
        lines += ["## Training", "", *_training_lines(Path(run_dir)), ""]
    if eval_report is not None:
        lines += ["## Evaluation", "", *_evaluation_lines(Path(eval_report)), ""]
    return "\n".join(lines)
