"""Supervised fine-tuning on BioASQ factoid questions, through the shared run loop.

`BioASQTask` is the fine-tuning task the `trainer.Trainer` runs: examples are
`data.bioasq.encode_example` (prompt, then " answer" + EOS), right-padded to a fixed
`finetune.max_tokens + 1` tokens so the train step compiles once; the loss covers the
answer tokens and the EOS only (`loss_mask`), and padding is masked out of the model
(`attention_mask`). A held-out slice of the training questions, chosen by a hash of the
question id, gives the validation loss evaluated after every epoch; the best checkpoint
is kept and exported, and training stops when `finetune.patience` evaluations bring no
improvement. `finetune.eval_files` are scored too (as `test_loss`) but never steer training.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from biomamba_jax.model.config import MambaConfig
from biomamba_jax.data.bioasq import BioASQFormatError, ExampleTooLong, encode_example, load_bioasq, pad_batch
from biomamba_jax.training.parallel import BatchPlan
from biomamba_jax.training.config import RunConfig
from biomamba_jax.checkpoints.runs import TOKENIZER_DIR, find_tokenizer
from biomamba_jax.data.tokenizer import OFFLINE_TOKENIZER
from biomamba_jax.training.loop import RunError, Trainer

__all__ = ["BioASQTask", "ExampleBatches", "finetune", "split_by_id", "held_out"]


def held_out(question_id: str, fraction: float) -> bool:
    """Whether a question belongs to the validation slice: a hash of its id, not its position."""
    digest = hashlib.sha256(question_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_by_id(questions: list, fraction: float) -> tuple[list, list]:
    """(train, validation) by `held_out`; with fraction > 0 the validation slice is never empty."""
    val = [q for q in questions if held_out(q.id, fraction)]
    if fraction > 0 and not val and len(questions) > 1:
        val = [min(questions, key=lambda q: hashlib.sha256(q.id.encode()).digest())]
    val_ids = {q.id for q in val}
    return [q for q in questions if q.id not in val_ids], val


class ExampleBatches:
    """Endless shuffled batches of fixed-length examples, one permutation per epoch.

    The state is (epoch, position): saved with every checkpoint, so a resumed run reads
    the same batches as an uninterrupted one. An epoch's last batch is filled up with
    empty rows (loss_mask 0), which add nothing to the loss or the gradient.
    """

    def __init__(self, examples: dict[str, np.ndarray], global_rows: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        self.examples = examples
        self.count = len(examples["tokens"])
        self.global_rows = global_rows
        self.seed = seed
        self.rows = slice(process_index * global_rows // process_count,
                          (process_index + 1) * global_rows // process_count)
        self.epoch, self.position = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.count / self.global_rows)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        chosen = order[self.position:self.position + self.global_rows]
        self.position += self.global_rows
        if self.position >= self.count:
            self.epoch, self.position = self.epoch + 1, 0
        batch = {}
        for key, values in self.examples.items():
            block = np.zeros((self.global_rows, *values.shape[1:]), values.dtype)
            block[:len(chosen)] = values[chosen]
            batch[key] = block[self.rows]
        return batch

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "count": self.count}

    def set_state(self, state: dict) -> None:
        if state.get("count") != self.count:
            raise RunError(f"the checkpoint's data state is for {state.get('count')} training examples, "
                           f"these files give {self.count}: resume with the same finetune.train_files")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def as_train_batch(padded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pad_batch output (rows, L + 1) -> train/eval-step batch: targets' loss mask, inputs' attention mask."""
    return {
        "tokens": padded["input_ids"],
        "loss_mask": padded["loss_mask"][:, 1:].astype(np.float32),
        "attention_mask": padded["attention_mask"][:, :-1],
    }


def resolve_tokenizer(config: RunConfig) -> str:
    """finetune.tokenizer, else the tokenizer that comes with model.init, else data.tokenizer."""
    if config.finetune.tokenizer:
        return config.finetune.tokenizer
    if config.model.init != "random":
        found = find_tokenizer(config.model.init)
        if found is not None:
            return str(found)
    return config.data.tokenizer


class BioASQTask:
    """Fine-tuning on BioASQ factoid questions (`finetune.*` of the run config)."""

    summary_name = "finetune"

    def __init__(self, config: RunConfig):
        self.config = config
        self.seq_len = config.finetune.max_tokens
        self.patience: Optional[int] = config.finetune.patience if config.finetune.val_fraction > 0 else None
        self.tokenizer = None
        self.sets: dict[str, dict] = {}
        self.facts: dict = {}
        self.skipped_too_long: dict[str, int] = {}  # per set, questions too long for max_tokens

    # ------------------------------------------------------------- set-up
    def _load_tokenizer(self, log: Callable):
        from biomamba_jax.data.tokenizer import load_tokenizer, write_byte_level_tokenizer

        source = resolve_tokenizer(self.config)
        if source == OFFLINE_TOKENIZER:
            source = str(write_byte_level_tokenizer(Path(self.config.run.out_dir) / TOKENIZER_DIR / "tokenizer.json"))
        log(f"tokenizer    {source}")
        try:
            return load_tokenizer(source), source
        except (OSError, ValueError, TypeError) as err:
            raise RunError(f"cannot load tokenizer {source}: {err}; set finetune.tokenizer=...") from err

    def _questions(self, files, log: Callable) -> list:
        questions, seen = [], set()
        for path in files:
            try:
                loaded = load_bioasq(path, ("factoid",))
            except (FileNotFoundError, BioASQFormatError) as err:
                raise RunError(str(err)) from err
            log(f"data         {loaded.summary()}")
            fresh = [q for q in loaded.questions if q.id not in seen]
            seen.update(q.id for q in fresh)
            questions += fresh  # later years repeat earlier questions: keep each id once
        return questions

    def _encode(self, questions, name: str, log: Callable) -> Optional[dict[str, np.ndarray]]:
        """The set's examples as one padded batch (None when none fits), skipping the
        questions too long for finetune.max_tokens unless finetune.skip_too_long is off."""
        examples, too_long = [], []
        for question in questions:
            try:
                examples.append(encode_example(question, self.tokenizer, self.seq_len + 1))
            except ExampleTooLong as err:
                if not self.config.finetune.skip_too_long:
                    raise RunError(f"{err} (finetune.max_tokens); or set finetune.skip_too_long=true to skip "
                                   "such questions") from err
                too_long.append(err)
        self.skipped_too_long[name] = len(too_long)
        if too_long:
            longest = max(too_long, key=lambda err: err.needed)
            log(f"skipped      {len(too_long)} {name} question(s) whose question + answer alone exceed "
                f"finetune.max_tokens={self.seq_len}, e.g. {longest.question_id} ({longest.needed} tokens)")
        return as_train_batch(pad_batch(examples, pad_to=self.seq_len + 1)) if examples else None

    def prepare(self, model_config: MambaConfig, is_main: bool, log: Callable) -> None:
        f = self.config.finetune
        if not f.train_files:
            raise RunError("finetune.train_files is empty: name one or more BioASQ training JSON files")
        self.tokenizer, source = self._load_tokenizer(log)
        if len(self.tokenizer) > model_config.vocab_size:
            raise RunError(f"tokenizer {source} has {len(self.tokenizer)} ids but the model has "
                           f"{model_config.vocab_size} embedding rows: use the model's own tokenizer")
        train, val = split_by_id(self._questions(f.train_files, log), f.val_fraction)
        if not train:
            raise RunError("no training questions left after the validation split; lower finetune.val_fraction")
        # Every file is read and every example encoded (and checked for length) before
        # anything compiles.
        self.skipped_too_long = {}
        encoded = {"train": self._encode(train, "train", log), "val": self._encode(val, "val", log)}
        if encoded["train"] is None:
            raise RunError(f"none of the {len(train)} training questions fits finetune.max_tokens={f.max_tokens}, "
                           "even with no context: raise it")
        if f.eval_files:
            test_ids = {q.id for q in self._questions(f.eval_files, log)}
            overlap = test_ids & {q.id for q in train}
            if overlap:
                log(f"warning: {len(overlap)} eval_files question(s) are also in train_files, e.g. {sorted(overlap)[0]}")
            encoded["test"] = self._encode(self._questions(f.eval_files, lambda *_: None), "test", log)
        self.sets = {name: batch for name, batch in encoded.items() if batch is not None}
        counts = {name: len(self.sets[name]["tokens"]) if name in self.sets else 0 for name in ("train", "val", "test")}
        self.facts = {
            "task": "finetune", "train_files": list(f.train_files), "eval_files": list(f.eval_files),
            "train_questions": counts["train"], "val_questions": counts["val"], "val_fraction": f.val_fraction,
            "test_questions": counts["test"], "skipped_too_long": dict(self.skipped_too_long),
            "tokenizer": source, "max_tokens": f.max_tokens, "epochs": f.epochs, "patience": self.patience,
        }
        self._tokenizer_dir = Path(self.config.run.out_dir) / TOKENIZER_DIR
        if is_main:
            self.tokenizer.save_pretrained(str(self._tokenizer_dir))
        log(f"split        {counts['train']} train / {counts['val']} validation questions (val_fraction {f.val_fraction}, "
            f"by question-id hash)" + (f"; {self.facts['test_questions']} test questions" if f.eval_files else ""))

    # ------------------------------------------------------------ the task
    def _batches(self, plan: BatchPlan) -> ExampleBatches:
        import jax

        return ExampleBatches(self.sets["train"], plan.global_rows, self.config.run.seed,
                              jax.process_index(), jax.process_count())

    def total_steps(self, plan: BatchPlan) -> int:
        return self.config.finetune.epochs * self._batches(plan).steps_per_epoch

    def eval_every(self, plan: BatchPlan) -> int:
        return self._batches(plan).steps_per_epoch  # once per epoch

    def train_batches(self, plan: BatchPlan) -> ExampleBatches:
        return self._batches(plan)

    def eval_sets(self, rows: int) -> dict:
        def batches(examples):
            count = len(examples["tokens"])
            for start in range(0, count, rows):
                block = {}
                for key, values in examples.items():
                    block[key] = np.zeros((rows, *values.shape[1:]), values.dtype)
                    block[key][:min(rows, count - start)] = values[start:start + rows]
                yield block

        return {name: (lambda e=examples: batches(e)) for name, examples in self.sets.items() if name != "train"}

    def export_files(self) -> dict[str, Path]:
        return {p.name: p for p in sorted(self._tokenizer_dir.iterdir()) if p.is_file()}

    def describe(self) -> dict:
        return dict(self.facts)


def finetune(config: RunConfig, resume: bool = False, log: Callable = print, start_if_missing: bool = False) -> dict:
    """Run (or resume) BioASQ fine-tuning as configured; returns the run summary."""
    return Trainer.build(config, BioASQTask(config), log).run(resume=resume, start_if_missing=start_if_missing)
