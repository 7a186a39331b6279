"""Score models on BioASQ and text sets in one run, and write a report (Markdown, JSON, PNG).

Models (`NAME=PATH`): anything `runs.load_model` reads (run dirs, run checkpoints, native
JAX, transformers or mamba_ssm Mamba dirs) is scored by the JAX model; any other
transformers causal LM dir (GPT-2, BioGPT, ...) by transformers/torch. A transformers
Mamba dir is scored both ways, as a consistency check: rows `NAME (jax)` and `NAME (torch)`.

Sets: a BioASQ Task B file (factoid questions), the validation split of a prepared PubMed
dir (decoded to text with its own tokenizer, so every model re-tokenises the same text),
or a text file (.txt: one document per non-empty line; .jsonl: a "text" field per line).

Metrics (see `metrics`): cross-entropy, perplexity and bits-per-byte over the answer
tokens + EOS of BioASQ examples (bytes: the UTF-8 of " " + answer) or over every token of
a text document (scored after an EOS token as context, so the first token counts too);
padding is never scored. On BioASQ also strict / lenient accuracy and MRR over up to 5
candidates from beam search (answer = generated text up to EOS or a newline, stripped;
candidates that differ only in case count once, as the metric compares them lowercased).

Every (model, set) result is cached as JSON in OUT/cache, written atomically and keyed by
a fingerprint of the model files, the set file and the settings: an interrupted run,
re-run, recomputes only what is missing. All inputs are checked before any compute
(`resolve_models`, `load_sets`, then `fit_sets` for the BioASQ questions' lengths).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

from biomamba_jax.files import write_text_atomic
from biomamba_jax.evaluation.inputs import (EvalInputError, EvalSet, EvalSettings, ModelEntry, fit_sets, load_sets,
                                           resolve_models)
from biomamba_jax.evaluation.report import write_report
from biomamba_jax.evaluation.scorers import JaxScorer, TorchScorer, score

__all__ = ["EvalInputError", "ModelEntry", "EvalSet", "EvalSettings", "resolve_models", "load_sets",
           "fit_sets", "evaluate", "write_report"]



def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def evaluate(models: list[ModelEntry], sets: list[EvalSet], out_dir: str | Path,
             settings: EvalSettings = EvalSettings(), log: Callable = print) -> list[dict]:
    """Every (model, set) result, from the cache when its fingerprint matches."""
    out_dir = Path(out_dir)
    results = []
    for entry in models:
        scorer = None
        for eval_set in sets:
            cache = out_dir / "cache" / f"{_slug(entry.name)}__{_slug(eval_set.name)}.json"
            fingerprint = {"model": entry.fingerprint, "set": eval_set.fingerprint,
                           "settings": dataclasses.asdict(settings), "tokenizer": entry.tokenizer_source}
            if cache.is_file():
                cached = json.loads(cache.read_text())
                if cached.get("fingerprint") == fingerprint:
                    log(f"{entry.name} on {eval_set.name}: cached ({cache.name})")
                    results.append(cached["result"])
                    continue
            if scorer is None:
                scorer = (JaxScorer if entry.backend == "jax" else TorchScorer)(entry, settings)
                log(f"{entry.name}: {scorer.description}")
            result = score(scorer, entry, eval_set, settings)
            log(f"{entry.name} on {eval_set.name}: ce {result['cross_entropy']:.4f}, "
                f"bpb {result['bits_per_byte']:.4f}"
                + (f", strict {result['strict_accuracy']:.3f}, mrr {result['mrr']:.3f}" if "mrr" in result else ""))
            write_text_atomic(cache, json.dumps({"fingerprint": fingerprint, "result": result}, indent=1))
            results.append(result)
    return results


