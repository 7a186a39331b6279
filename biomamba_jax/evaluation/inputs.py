"""What an evaluation scores: the models (`NAME=PATH` specs resolved to a backend and a
tokenizer), the sets (BioASQ, PubMed validation text, text files) and the settings.
Every input is checked here, before any compute."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from biomamba_jax.data.tokenizer import EOS_ID


REPORT_NOTE = ("Padding is masked: only answer tokens + EOS (BioASQ) or document tokens (text) are scored. "
               "Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text; it compares models "
               "with different tokenizers, cross-entropy and perplexity (per token) do not. "
               "Factoid answers match gold synonyms as the official BioASQ evaluator does: lowercased, exact, "
               "whitespace not stripped (a generated answer is cut at its first newline and stripped; gold "
               "synonyms are read stripped), up to 5 distinct candidates. Questions whose question + answer "
               "exceed max_tokens with no context at all are skipped (counted per set) unless --strict-length.")


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
    skipped: list = dataclasses.field(default_factory=list)  # ids of questions too long to score (fit_sets)


def _naming(what: str, path, err: Exception) -> str:
    """`what: err`, naming `path` unless the error's own message already does."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return f"{what}: {text}" if str(path) in text else f"{what} {path}: {text}"


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
    from biomamba_jax.checkpoints.load import HUB_ID_PATTERN, resolve_source

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
    from biomamba_jax.checkpoints.load import NATIVE_CONFIG
    from biomamba_jax.checkpoints.runs import run_dir_of

    if not path.exists():
        raise EvalInputError(f"model path {path} does not exist")
    if run_dir_of(path) is not None and path.name != "hf" or (path / NATIVE_CONFIG).is_file():
        return "mamba"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EvalInputError(f"{path}: unknown model format (no config.json, biomamba_config.json or run files)")
    from biomamba_jax.model.config import HF_FORMAT, ConfigError, config_format

    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalInputError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(values, dict):
        raise EvalInputError(f"{config_path} holds a JSON {type(values).__name__}, not an object of settings")
    model_type = values.get("model_type")
    if model_type not in (None, "mamba"):
        if values.get("architectures") or values.get("vocab_size"):
            return "causal-lm"
        raise EvalInputError(f"{path}: unknown model format (model_type {model_type!r} names no architecture)")
    try:
        return "mamba-hf" if config_format(values, config_path, native=False) == HF_FORMAT else "mamba"
    except ConfigError as err:
        raise EvalInputError(f"{path}: unknown model format (config.json names no model_type; {err})") from err


def _tokenizer_for(path: Path, backend: str, default: Optional[str]):
    from biomamba_jax.checkpoints.runs import find_tokenizer
    from biomamba_jax.data.tokenizer import load_tokenizer

    if backend == "jax":
        source = find_tokenizer(path) or default
        if source is None:
            raise EvalInputError(f"{path} carries no tokenizer.json: pass --tokenizer")
        try:
            return load_tokenizer(source), str(source)
        except (OSError, ValueError, TypeError) as err:
            named = f"tokenizer for {path}" if str(source) in str(err) else f"tokenizer {source} for {path}"
            raise EvalInputError(f"{named}: {err}") from err
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
    from biomamba_jax.checkpoints.runs import load_model

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
                raise EvalInputError(_naming(f"model {name}: cannot read", path, err)) from err
            if len(tokenizer) > vocab:
                raise EvalInputError(f"model {name}: tokenizer {source} has {len(tokenizer)} ids but the model "
                                     f"has {vocab} embedding rows (tokenizer/vocab mismatch)")
            entries.append(ModelEntry(label, path, backend, source, vocab,
                                      f"{backend}:{_files_fingerprint(path)}", tokenizer))
    if not entries:
        raise EvalInputError("no models: pass --model NAME=PATH")
    return entries


def _pubmed_documents(data_dir: Path, max_docs: int) -> list[str]:
    from biomamba_jax.data.loader import TokenStream, read_manifest
    from biomamba_jax.data.tokenizer import load_tokenizer

    try:
        manifest = read_manifest(data_dir)
        stream = TokenStream(data_dir, "validation", manifest)
        tokenizer = load_tokenizer(manifest["tokenizer"]["name"])
    except (OSError, ValueError, KeyError) as err:
        raise EvalInputError(_naming("--pubmed-dir", data_dir, err)) from err
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
    from biomamba_jax.files import TextFileError, read_text

    if not path.is_file():
        raise EvalInputError(f"--text {path} does not exist")
    try:
        lines = read_text(path).splitlines()
    except TextFileError as err:
        raise EvalInputError(f"--text: {err}") from None
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
    from biomamba_jax.data.bioasq import BioASQFormatError, load_bioasq

    sets = []
    for file in bioasq:
        try:
            loaded = load_bioasq(file, ("factoid",))
        except (FileNotFoundError, BioASQFormatError) as err:
            raise EvalInputError(_naming("--bioasq", file, err)) from err
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




def fit_sets(models: Sequence[ModelEntry], sets: Sequence[EvalSet], settings: EvalSettings, *,
             strict: bool = False, log=print) -> list[EvalSet]:
    """The sets with every BioASQ question that cannot be scored within `max_tokens` left
    out, checked with each model's tokenizer before any compute.

    The context is cut first (as `encode_example` does); what is left out is a question
    whose question + answer alone exceed `max_tokens` (or, with beam search, whose prompt
    leaves no room for `max_answer_tokens`). Every model scores the same questions, so a
    question too long for any tokenizer is left out for all. `strict` makes it an error.
    """
    from biomamba_jax.data.bioasq import ExampleTooLong, encode_example

    if settings.factoid and settings.max_answer_tokens >= settings.max_tokens:
        raise EvalInputError(f"--max-answer-tokens {settings.max_answer_tokens} leaves no room for the prompt in "
                             f"--max-tokens {settings.max_tokens}: raise --max-tokens")
    fitted = []
    for eval_set in sets:
        if eval_set.kind != "bioasq":
            fitted.append(eval_set)
            continue
        too_long: dict[int, ExampleTooLong] = {}
        for index, question in enumerate(eval_set.items):
            try:
                for entry in models:
                    encode_example(question, entry.tokenizer, settings.max_tokens)
                    if settings.factoid:
                        encode_example(question, entry.tokenizer, settings.max_tokens - settings.max_answer_tokens,
                                       with_answer=False)
            except ExampleTooLong as err:
                too_long[index] = err
        if not too_long:
            fitted.append(eval_set)
            continue
        example = max(too_long.values(), key=lambda err: err.needed)
        what = (f"{eval_set.name}: {len(too_long)} of {len(eval_set.items)} question(s) do not fit --max-tokens "
                f"{settings.max_tokens} even with no context (e.g. {example.question_id}: {example.needed} tokens"
                + (f" with --max-answer-tokens {settings.max_answer_tokens})" if settings.factoid else ")"))
        if strict:
            raise EvalInputError(f"{what}: raise --max-tokens, or leave out --strict-length to skip them")
        if len(too_long) == len(eval_set.items):
            raise EvalInputError(f"{what}: nothing left to score; raise --max-tokens")
        log(f"{what}: skipped")
        skipped = [eval_set.items[index].id for index in sorted(too_long)]
        kept = [q for index, q in enumerate(eval_set.items) if index not in too_long]
        # Which questions are scored is part of what a cached result means.
        fingerprint = hashlib.sha256(f"{eval_set.fingerprint}:{skipped}".encode()).hexdigest()[:16]
        fitted.append(dataclasses.replace(eval_set, items=kept, skipped=skipped, fingerprint=fingerprint))
    return fitted
