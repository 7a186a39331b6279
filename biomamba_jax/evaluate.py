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
candidates from beam search (answer = generated text up to EOS or a newline, stripped).

Every (model, set) result is cached as JSON in OUT/cache, written atomically and keyed by
a fingerprint of the model files, the set file and the settings: an interrupted run,
re-run, recomputes only what is missing. All inputs are checked before any compute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import metrics
from .tokenizer import EOS_ID

__all__ = ["EvalInputError", "ModelEntry", "EvalSet", "EvalSettings", "resolve_models", "load_sets",
           "evaluate", "write_report"]

REPORT_NOTE = ("Padding is masked: only answer tokens + EOS (BioASQ) or document tokens (text) are scored. "
               "Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text; it compares models "
               "with different tokenizers, cross-entropy and perplexity (per token) do not.")


class EvalInputError(ValueError):
    """A model, set or setting that cannot be evaluated, found before any compute."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_tokens: int = 512  # BioASQ example length (context cut to fit), text window length
    batch_size: int = 8
    num_beams: int = 5
    max_answer_tokens: int = 24
    max_docs: int = 200  # documents taken from a PubMed validation split
    factoid: bool = True  # beam-search answers and BioASQ factoid metrics
    dtype: str = "float32"


@dataclasses.dataclass
class ModelEntry:
    name: str  # row label
    path: Path
    backend: str  # "jax" or "torch"
    tokenizer_source: str
    vocab_size: int
    fingerprint: str
    tokenizer: object = None


@dataclasses.dataclass
class EvalSet:
    name: str
    kind: str  # "bioasq" or "text"
    path: Path
    items: list  # BioASQQuestion or str documents
    fingerprint: str


# ------------------------------------------------------------------ inputs
def _files_fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                  and "tensorboard" not in p.parts)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _parse_spec(spec: str) -> tuple[str, Path]:
    """NAME=PATH, where PATH may also be a Hugging Face Hub id (downloaded when online)."""
    from .pretrained import HUB_ID_PATTERN, resolve_source

    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise EvalInputError(f"--model {spec!r}: expected NAME=PATH")
    path = path.strip()
    if not Path(path).expanduser().exists() and HUB_ID_PATTERN.match(path):
        try:
            return name.strip(), resolve_source(path)
        except Exception as err:  # noqa: BLE001 - offline, unknown id: bad input either way
            raise EvalInputError(f"--model {name.strip()}: {err}") from err
    return name.strip(), Path(path).expanduser()


def _model_kind(path: Path) -> str:
    """"mamba" (JAX only), "mamba-hf" (JAX and torch) or "causal-lm" (torch only)."""
    from .pretrained import NATIVE_CONFIG
    from .runs import run_dir_of

    if not path.exists():
        raise EvalInputError(f"model path {path} does not exist")
    if run_dir_of(path) is not None and path.name != "hf" or (path / NATIVE_CONFIG).is_file():
        return "mamba"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EvalInputError(f"{path}: unknown model format (no config.json, biomamba_config.json or run files)")
    try:
        values = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise EvalInputError(f"{config_path} is not valid JSON: {err}") from err
    if values.get("model_type") == "mamba" or "hidden_size" in values and "state_size" in values:
        return "mamba-hf"
    if "d_model" in values and "n_layer" in values and "ssm_cfg" in values:
        return "mamba"
    if values.get("model_type") and (values.get("architectures") or values.get("vocab_size")):
        return "causal-lm"
    raise EvalInputError(f"{path}: unknown model format (config.json names no model_type)")


def _tokenizer_for(path: Path, backend: str, default: Optional[str]):
    from .runs import find_tokenizer
    from .tokenizer import load_tokenizer

    if backend == "jax":
        source = find_tokenizer(path) or default
        if source is None:
            raise EvalInputError(f"{path} carries no tokenizer.json: pass --tokenizer")
        try:
            return load_tokenizer(source), str(source)
        except (OSError, ValueError, TypeError) as err:
            raise EvalInputError(f"tokenizer {source} for {path}: {err}") from err
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path)), str(path)
    except (OSError, ValueError) as err:
        if default is None:
            raise EvalInputError(f"{path}: no tokenizer files ({err}); pass --tokenizer") from err
        return load_tokenizer(default), str(default)


def _vocab_size(path: Path, backend: str) -> int:
    if backend == "torch":
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    from .runs import load_model

    config, _, _ = load_model(path)
    return config.vocab_size


def resolve_models(specs: Sequence[str], default_tokenizer: Optional[str] = None) -> list[ModelEntry]:
    """One entry per (model, backend), with its tokenizer loaded and checked against its vocab."""
    entries, names = [], set()
    for spec in specs:
        name, path = _parse_spec(spec)
        if name in names:
            raise EvalInputError(f"model name {name!r} given twice")
        names.add(name)
        kind = _model_kind(path)
        backends = {"mamba": ["jax"], "mamba-hf": ["jax", "torch"], "causal-lm": ["torch"]}[kind]
        for backend in backends:
            label = f"{name} ({backend})" if len(backends) > 1 else name
            tokenizer, source = _tokenizer_for(path, backend, default_tokenizer)
            try:
                vocab = _vocab_size(path, backend)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is bad input here
                raise EvalInputError(f"model {name}: cannot read {path}: {err}") from err
            if len(tokenizer) > vocab:
                raise EvalInputError(f"model {name}: tokenizer {source} has {len(tokenizer)} ids but the model "
                                     f"has {vocab} embedding rows (tokenizer/vocab mismatch)")
            entries.append(ModelEntry(label, path, backend, source, vocab,
                                      f"{backend}:{_files_fingerprint(path)}", tokenizer))
    if not entries:
        raise EvalInputError("no models: pass --model NAME=PATH")
    return entries


def _pubmed_documents(data_dir: Path, max_docs: int) -> list[str]:
    from .data.loader import TokenStream, read_manifest
    from .tokenizer import load_tokenizer

    try:
        manifest = read_manifest(data_dir)
        stream = TokenStream(data_dir, "validation", manifest)
        tokenizer = load_tokenizer(manifest["tokenizer"]["name"])
    except (OSError, ValueError, KeyError) as err:
        raise EvalInputError(f"--pubmed-dir {data_dir}: {err}") from err
    total = int(stream.starts[-1])
    tokens = stream.read(0, total) if total else np.zeros((0,), np.uint16)
    ends = np.flatnonzero(tokens == EOS_ID)
    documents, start = [], 0
    for end in ends[:max_docs]:
        text = tokenizer.decode(tokens[start:end].tolist())
        if text.strip():
            documents.append(text)
        start = end + 1
    return documents


def _text_documents(path: Path) -> list[str]:
    if not path.is_file():
        raise EvalInputError(f"--text {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        documents = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    documents.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise EvalInputError(f"{path}:{number}: expected a JSON object with a 'text' field") from err
        return [d for d in documents if isinstance(d, str) and d.strip()]
    return [line for line in lines if line.strip()]


def load_sets(bioasq: Sequence[str] = (), pubmed_dirs: Sequence[str] = (), texts: Sequence[str] = (),
              max_docs: int = 200) -> list[EvalSet]:
    from .data.bioasq import BioASQFormatError, load_bioasq

    sets = []
    for file in bioasq:
        try:
            loaded = load_bioasq(file, ("factoid",))
        except (FileNotFoundError, BioASQFormatError) as err:
            raise EvalInputError(f"--bioasq {file}: {err}") from err
        sets.append(EvalSet(f"bioasq:{Path(file).stem}", "bioasq", Path(file), loaded.questions,
                            _files_fingerprint(Path(file))))
    for directory in pubmed_dirs:
        documents = _pubmed_documents(Path(directory), max_docs)
        sets.append(EvalSet(f"pubmed:{Path(directory).name}", "text", Path(directory), documents,
                            hashlib.sha256("\x00".join(documents).encode()).hexdigest()[:16]))
    for file in texts:
        sets.append(EvalSet(f"text:{Path(file).stem}", "text", Path(file), _text_documents(Path(file)),
                            _files_fingerprint(Path(file))))
    for eval_set in sets:
        if not eval_set.items:
            raise EvalInputError(f"{eval_set.name} ({eval_set.path}) has nothing to score")
    if not sets:
        raise EvalInputError("no evaluation sets: pass --bioasq, --pubmed-dir or --text")
    return sets


# ------------------------------------------------------------- scored rows
def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return EOS_ID if eos is None else int(eos)


def scored_rows(eval_set: EvalSet, tokenizer, max_tokens: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """([(token ids, loss mask over the ids)], scored UTF-8 bytes) for one tokenizer.

    mask[i] = 1 where ids[i] is scored (predicted from ids[:i]); mask[0] is always 0.
    """
    from .data.bioasq import ANSWER_TEMPLATE, encode_example

    eos, rows, n_bytes = _eos_id(tokenizer), [], 0
    if eval_set.kind == "bioasq":
        for question in eval_set.items:
            example = encode_example(question, tokenizer, max_tokens)
            ids = example["input_ids"].copy()
            ids[-1] = eos  # encode_example ends with Mamba's EOS id; other tokenizers have their own
            rows.append((ids, example["loss_mask"]))
            n_bytes += len(ANSWER_TEMPLATE.format(answer=question.target).encode("utf-8"))
        return rows, n_bytes
    for document in eval_set.items:
        ids = np.asarray([eos] + tokenizer(document, add_special_tokens=False)["input_ids"], np.int32)
        # Windows of max_tokens targets, each with the previous token as its first input.
        for start in range(0, len(ids) - 1, max_tokens):
            window = ids[start:start + max_tokens + 1]
            mask = np.ones(len(window), np.int32)
            mask[0] = 0
            rows.append((window, mask))
        n_bytes += len(document.encode("utf-8"))
    return rows, n_bytes


def _batches(rows, batch_size: int, length: int):
    """Fixed (batch_size, length) right-padded arrays: ids, loss mask, attention mask."""
    for start in range(0, len(rows), batch_size):
        ids = np.zeros((batch_size, length), np.int32)
        loss = np.zeros((batch_size, length), np.float32)
        attention = np.zeros((batch_size, length), np.int32)
        for row, (token_ids, mask) in enumerate(rows[start:start + batch_size]):
            ids[row, :len(token_ids)], loss[row, :len(mask)], attention[row, :len(token_ids)] = token_ids, mask, 1
        yield ids, loss, attention


# ----------------------------------------------------------------- scorers
class JaxScorer:
    def __init__(self, entry: ModelEntry, settings: EvalSettings):
        import jax
        from flax import nnx

        from .pretrained import model_from_params
        from .runs import load_model

        config, params, self.description = load_model(entry.path, dtype=settings.dtype, remat="none")
        self.model = model_from_params(config, params)
        self.graphdef, self.state = nnx.split(self.model)
        self.settings, self.tokenizer = settings, entry.tokenizer

        def nll(state, ids, loss_mask, attention):
            import jax.numpy as jnp

            logits = nnx.merge(self.graphdef, state)(ids[:, :-1], attention[:, :-1])
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(picked * loss_mask[:, 1:]), jnp.sum(loss_mask[:, 1:])

        self._nll = jax.jit(nll)

    def nll(self, ids, loss_mask, attention) -> tuple[float, float]:
        total, count = self._nll(self.state, ids, loss_mask, attention)
        return float(total), float(count)

    def answers(self, questions) -> list[list[str]]:
        from .beam import beam_search, newline_token_mask
        from .data.bioasq import encode_example
        from .generate import left_pad

        s = self.settings
        stops = newline_token_mask(self.tokenizer, self.model.config.vocab_size)
        prompts = [encode_example(q, self.tokenizer, s.max_tokens - s.max_answer_tokens, with_answer=False)["input_ids"]
                   for q in questions]
        width = max(len(p) for p in prompts)
        results = []
        for start in range(0, len(prompts), s.batch_size):
            chunk = list(prompts[start:start + s.batch_size])
            real = len(chunk)
            chunk += [chunk[0]] * (s.batch_size - real)  # fixed batch shape: one compile per set
            ids, mask = left_pad(chunk)
            ids = np.pad(ids, ((0, 0), (width - ids.shape[1], 0)))
            mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
            out = beam_search(self.model, ids, mask, num_beams=s.num_beams, max_new_tokens=s.max_answer_tokens,
                              stop_mask=stops)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            for row in range(real):
                texts = [self.tokenizer.decode(tokens[row, beam, :lengths[row, beam]].tolist(), skip_special_tokens=True)
                         for beam in range(s.num_beams)]
                results.append(_candidates(texts))
        return results


class TorchScorer:
    def __init__(self, entry: ModelEntry, settings: EvalSettings):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(entry.path), dtype=torch.float32).eval()
        self.description = f"transformers {type(self.model).__name__} {entry.path}"
        self.settings, self.tokenizer = settings, entry.tokenizer

    def nll(self, ids, loss_mask, attention) -> tuple[float, float]:
        torch = self.torch
        with torch.no_grad():
            logits = self.model(input_ids=torch.from_numpy(ids[:, :-1]).long(),
                                attention_mask=torch.from_numpy(attention[:, :-1]).long()).logits.float()
            picked = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(ids[:, 1:]).long()[..., None])[..., 0]
            weights = torch.from_numpy(loss_mask[:, 1:])
            return float(-(picked * weights).sum()), float(weights.sum())

    def answers(self, questions) -> list[list[str]]:
        from .data.bioasq import encode_example

        s, torch, results = self.settings, self.torch, []
        eos = _eos_id(self.tokenizer)
        for question in questions:
            prompt = encode_example(question, self.tokenizer, s.max_tokens - s.max_answer_tokens, with_answer=False)
            ids = torch.from_numpy(prompt["input_ids"]).long()[None]
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=s.num_beams,
                                          num_return_sequences=s.num_beams, max_new_tokens=s.max_answer_tokens,
                                          do_sample=False, eos_token_id=eos, pad_token_id=eos)
            texts = [self.tokenizer.decode(seq[ids.shape[1]:].tolist(), skip_special_tokens=True) for seq in out]
            results.append(_candidates(texts))
        return results


def _candidates(texts: Sequence[str]) -> list[str]:
    """Generated texts -> up to 5 distinct answers: each cut at its first newline, stripped."""
    answers = [text.split("\n", 1)[0].strip() for text in texts]
    return list(dict.fromkeys(a for a in answers if a))[:metrics.MAX_CANDIDATES]


def score(scorer, entry: ModelEntry, eval_set: EvalSet, settings: EvalSettings) -> dict:
    rows, n_bytes = scored_rows(eval_set, entry.tokenizer, settings.max_tokens)
    length = settings.max_tokens + 1 if eval_set.kind == "text" else settings.max_tokens
    nats, tokens = 0.0, 0.0
    for ids, loss_mask, attention in _batches(rows, settings.batch_size, length):
        batch_nats, batch_tokens = scorer.nll(ids, loss_mask, attention)
        nats, tokens = nats + batch_nats, tokens + batch_tokens
    result = {"model": entry.name, "backend": entry.backend, "set": eval_set.name, "kind": eval_set.kind,
              "nats": nats, **metrics.lm_scores(nats, int(round(tokens)), n_bytes)}
    if eval_set.kind == "bioasq" and settings.factoid:
        candidates = scorer.answers(eval_set.items)
        result.update(metrics.factoid_scores(candidates, [q.answers for q in eval_set.items]))
        result["examples"] = [{"id": q.id, "gold": list(q.answers), "candidates": c}
                              for q, c in list(zip(eval_set.items, candidates))[:20]]
    return result


# ------------------------------------------------------------------ the run
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


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
            _write_atomic(cache, json.dumps({"fingerprint": fingerprint, "result": result}, indent=1))
            results.append(result)
    return results


# ------------------------------------------------------------------ report
COLUMNS = [("cross_entropy", "CE (nats/token)", "{:.4f}"), ("perplexity", "PPL", "{:.2f}"),
           ("bits_per_byte", "bits/byte", "{:.4f}"), ("strict_accuracy", "SAcc", "{:.1%}"),
           ("lenient_accuracy", "LAcc", "{:.1%}"), ("mrr", "MRR", "{:.3f}"), ("tokens", "tokens", "{:,}")]


def markdown_table(results: list[dict]) -> str:
    lines = []
    for set_name in dict.fromkeys(r["set"] for r in results):
        rows = [r for r in results if r["set"] == set_name]
        columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
        lines += [f"### {set_name}", "", "| model | " + " | ".join(c[1] for c in columns) + " |",
                  "| --- |" + " ---: |" * len(columns)]
        for r in rows:
            cells = [fmt.format(r[key]) if key in r else "-" for key, _, fmt in columns]
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot_bars(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    set_names = list(dict.fromkeys(r["set"] for r in results))
    model_names = list(dict.fromkeys(r["model"] for r in results))
    keys = [k for k in ("bits_per_byte", "cross_entropy", "mrr") if any(k in r for r in results)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    width = 0.8 / max(len(model_names), 1)
    for ax, key in zip(axes[0], keys):
        for index, model in enumerate(model_names):
            values = [next((r.get(key, np.nan) for r in results if r["model"] == model and r["set"] == s), np.nan)
                      for s in set_names]
            ax.bar(np.arange(len(set_names)) + index * width, values, width, label=model)
        ax.set_xticks(np.arange(len(set_names)) + width * (len(model_names) - 1) / 2, set_names, fontsize=8)
        ax.set_title(key)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curves(run_dirs: Sequence[str], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for run_dir in run_dirs:
        file = Path(run_dir) / "metrics.jsonl"
        if not file.is_file():
            raise EvalInputError(f"--run-dir {run_dir} has no metrics.jsonl")
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), style, label=f"{Path(run_dir).name} {key}")
                plotted = True
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if plotted:
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return plotted


def write_report(results: list[dict], out_dir: str | Path, models: list[ModelEntry], sets: list[EvalSet],
                 run_dirs: Sequence[str] = (), settings: EvalSettings = EvalSettings()) -> dict[str, Path]:
    """report.md, report.json and PNG plots in `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "bars": out_dir / "scores.png"}
    _plot_bars(results, written["bars"])
    if run_dirs and plot_loss_curves(run_dirs, out_dir / "loss_curves.png"):
        written["loss_curves"] = out_dir / "loss_curves.png"
    report = {
        "models": [{"name": m.name, "path": str(m.path), "backend": m.backend, "tokenizer": m.tokenizer_source,
                    "vocab_size": m.vocab_size} for m in models],
        "sets": [{"name": s.name, "kind": s.kind, "path": str(s.path), "items": len(s.items)} for s in sets],
        "settings": dataclasses.asdict(settings), "note": REPORT_NOTE, "results": results,
    }
    _write_atomic(written["json"], json.dumps(report, indent=1))
    sets_lines = [f"- `{s.name}`: {len(s.items)} {'factoid questions' if s.kind == 'bioasq' else 'documents'} "
                  f"from `{s.path}`" for s in sets]
    model_lines = [f"- `{m.name}`: `{m.path}` ({m.backend})" for m in models]
    plots = [f"![{key}]({path.name})" for key, path in written.items() if path.suffix == ".png"]
    _write_atomic(written["markdown"], "\n".join(["# Evaluation report", "", *model_lines, "", *sets_lines, "",
                                                  REPORT_NOTE, "", markdown_table(results), *plots, ""]))
    return written
