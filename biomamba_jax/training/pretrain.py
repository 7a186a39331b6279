"""Pretraining: next-token prediction on a prepared PubMed directory (`data.*` of the run
config), on the shared run loop (`loop.Trainer`). `pretrain(config)` is what
`scripts/pretrain.py` calls; `finetune` is the same loop on BioASQ questions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from biomamba_jax.data.tokenizer import OFFLINE_TOKENIZER
from biomamba_jax.model.config import MambaConfig
from biomamba_jax.training.config import RunConfig
from biomamba_jax.training.loop import RunError, Trainer
from biomamba_jax.training.parallel import BatchPlan

__all__ = ["pretrain", "PubmedTask"]


def _packed_rows_to_step_batch(batch: dict, with_attention_mask: bool) -> dict:
    """Loader rows {"tokens", "segment_ids"} -> a train/eval batch; segment id 0 is padding.
    The inputs' segment ids go with it: with `model.reset_at_documents` the model runs each
    packed document on its own."""
    step_batch = {"tokens": batch["tokens"],
                  "loss_mask": (batch["segment_ids"][:, 1:] != 0).astype(np.float32),
                  "segment_ids": batch["segment_ids"][:, :-1]}
    if with_attention_mask:
        step_batch["attention_mask"] = (batch["segment_ids"][:, :-1] != 0).astype(np.int32)
    return step_batch


class _LossMaskedBatches:
    """Pretraining rows {"tokens", "segment_ids"} -> train-step batches; passes the state through."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        # Training rows are packed without padding, so no attention mask is needed.
        return _packed_rows_to_step_batch(next(self.loader), with_attention_mask=False)

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state) -> None:
        self.loader.set_state(state)


class PubmedTask:
    """Next-token pretraining on a prepared PubMed directory (`data.*` of the run config)."""

    summary_name = "pretrain"
    patience = None

    def __init__(self, config: RunConfig):
        self.config = config
        self.seq_len = config.data.seq_len
        self.manifest: dict = {}

    def prepare(self, model_config: MambaConfig, is_main: bool, log: Callable) -> None:
        if self.config.data.synthetic_files and is_main:
            _prepare_synthetic_data(self.config, log)
        self.manifest = _check_data(self.config, model_config.vocab_size)

    def total_steps(self, plan: BatchPlan) -> int:
        return self.config.run.steps

    def eval_every(self, plan: BatchPlan) -> int:
        return self.config.run.eval_every

    def train_batches(self, plan: BatchPlan):
        from biomamba_jax.data import make_lm_loader

        return _LossMaskedBatches(make_lm_loader(self.config.data.dir, "train", self.seq_len,
                                                 plan.rows_per_process, seed=self.config.data.seed))

    def _validation(self, rows: int):
        from biomamba_jax.data import make_lm_loader

        loader = make_lm_loader(self.config.data.dir, "validation", self.seq_len, rows,
                                shuffle=False, num_epochs=1, drop_remainder=False, pad_final=True)
        for index, batch in enumerate(loader):
            if index >= self.config.run.eval_batches:
                break
            yield _packed_rows_to_step_batch(batch, with_attention_mask=True)

    def eval_sets(self, rows: int) -> dict:
        return {"val": lambda: self._validation(rows)}

    def export_files(self) -> dict[str, Path]:
        name = self.manifest.get("tokenizer", {}).get("name")
        path = Path(name) if name else None
        if path is not None and path.is_file() and path.name == "tokenizer.json":
            return {"tokenizer.json": path}
        return {}

    def describe(self) -> dict:
        splits = self.manifest.get("splits", {})
        return {
            "task": "pretrain",
            "data_dir": str(self.config.data.dir),
            "train_tokens": splits.get("train", {}).get("tokens"),
            "documents": self.manifest.get("counts", {}).get("documents"),
            "tokenizer": self.manifest.get("tokenizer", {}).get("name"),
            "synthetic": bool(self.config.data.synthetic_files),
        }


# Written first into a folder the smoke preset generates its corpus in: a folder with it
# is ours to (re)fill, finished or not; any other non-empty folder is the user's.
SYNTHETIC_MARKER = ".biomamba-synthetic.json"


def _prepare_synthetic_data(config: RunConfig, log: Callable) -> None:
    """Generate a synthetic PubMed corpus and prepare it through the real pipeline.

    Only into a folder that is missing, empty, or a synthetic corpus made here before
    (finished: used as is; interrupted: completed). A finished dataset of any origin is
    read, never rewritten.
    """
    from biomamba_jax.data import prepare_pubmed, write_synthetic_pubmed
    from biomamba_jax.data.tokenizer import write_byte_level_tokenizer
    from biomamba_jax.files import write_text_atomic

    data_dir = Path(config.data.dir)
    if (data_dir / "manifest.json").exists():
        if not (data_dir / SYNTHETIC_MARKER).exists():
            log(f"data.dir {data_dir} holds a prepared dataset: training on it (data.synthetic_files ignored)")
        return
    ours = (data_dir / SYNTHETIC_MARKER).is_file()
    if data_dir.exists() and not ours and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise RunError(
            f"data.dir {data_dir} is not empty and holds no dataset: data.synthetic_files="
            f"{config.data.synthetic_files} generates a synthetic corpus only in a new or empty folder. "
            "Point data.dir at one, or set data.synthetic_files=0 and prepare real data there with "
            "scripts/prepare_pubmed.py"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(data_dir / SYNTHETIC_MARKER, json.dumps({
        "files": config.data.synthetic_files, "docs_per_file": config.data.synthetic_docs_per_file,
        "seed": config.data.seed}) + "\n")
    tokenizer = config.data.tokenizer
    if tokenizer == OFFLINE_TOKENIZER:
        tokenizer = str(write_byte_level_tokenizer(data_dir / "tokenizer" / "tokenizer.json"))
    log(f"generating {config.data.synthetic_files} synthetic PubMed files in {data_dir / 'xml'}")
    files = write_synthetic_pubmed(data_dir / "xml", n_files=config.data.synthetic_files,
                                   docs_per_file=config.data.synthetic_docs_per_file, seed=config.data.seed)
    prepare_pubmed(files, data_dir, tokenizer=tokenizer, workers=1, val_fraction=config.data.val_fraction,
                   progress=False, command="biomamba_jax.training.loop (synthetic corpus)")


def _check_data(config: RunConfig, vocab_size: int) -> dict:
    from biomamba_jax.data import read_manifest

    data_dir = Path(config.data.dir)
    if not data_dir.exists():
        raise RunError(
            f"data dir {data_dir} does not exist: run scripts/prepare_pubmed.py to build it, "
            "or set data.dir=... (with data.synthetic_files > 0, as in the smoke preset, a run generates its "
            "own corpus at data.dir; --data-dir names prepared data and turns that off)"
        )
    try:
        manifest = read_manifest(data_dir, verify=config.data.verify)
    except (OSError, ValueError) as err:
        raise RunError(str(err)) from err
    data_vocab = int(manifest.get("tokenizer", {}).get("vocab_size", 0) or 0)
    if data_vocab > vocab_size:
        raise RunError(
            f"the data in {data_dir} was tokenised with a {data_vocab}-token vocabulary but the "
            f"model has {vocab_size} embedding rows: use a model and data with the same tokenizer"
        )
    return manifest


def pretrain(config: RunConfig, resume: bool = False, log: Callable = print, start_if_missing: bool = False) -> dict:
    """Run (or resume) pretraining as configured; returns the run summary."""
    return Trainer.build(config, PubmedTask(config), log).run(resume=resume, start_if_missing=start_if_missing)
