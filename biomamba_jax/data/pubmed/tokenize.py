"""Stage 1: each source file tokenized into a cache keyed by its sha256 and the tokenizer, in worker processes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from biomamba_jax.data.tokenizer import EOS_ID
from biomamba_jax.data.pubmed.parse import DeletedCitation, MalformedRecord, PubmedFileError, iter_pubmed_file
from biomamba_jax.data.pubmed.shards import STATUS_ABSTRACT, STATUS_NO_ABSTRACT, file_digests
from biomamba_jax.files import atomic_output

# Bump when parsing or tokenization output changes, so stale caches are not reused.
CACHE_VERSION = 1
# Tokenizers loaded in this process, by source: a worker loads each once.
worker_tokenizers = {}


def _tokenizer_for(source: str):
    if source not in worker_tokenizers:
        from biomamba_jax.data.tokenizer import load_tokenizer

        worker_tokenizers[source] = load_tokenizer(source)
    return worker_tokenizers[source]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation: identifies it whatever its path."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class FileJob:
    path: str
    cache_dir: str
    tokenizer_source: str
    tokenizer_fingerprint: str
    batch_docs: int = 512


def _cache_paths(job: FileJob, sha256: str) -> tuple[Path, Path]:
    stem = f"{Path(job.path).name}.{sha256[:16]}.{job.tokenizer_fingerprint[:12]}.v{CACHE_VERSION}"
    return Path(job.cache_dir) / f"{stem}.tokens.npy", Path(job.cache_dir) / f"{stem}.index.npz"


def _process_file(job: FileJob) -> dict:
    """Worker entry: tokenize one file into its cache (or reuse it). Returns a summary.

    File-level failures come back as {"error": ...} so one bad file never stops the rest.
    """
    started = time.perf_counter()
    try:
        digests = file_digests(job.path)
        tokens_path, index_path = _cache_paths(job, digests["sha256"])
        reused = index_path.exists() and tokens_path.exists()
        if not reused:
            _tokenize_file_to_cache(job, tokens_path, index_path)
        with np.load(index_path) as index:
            stats = json.loads(str(index["stats"]))
    except PubmedFileError as error:
        return {"path": job.path, "error": str(error)}
    except OSError as error:
        # Unreadable input, or the cache could not be written (disk full, permissions).
        return {"path": job.path, "error": f"{job.path}: {error}"}
    return {
        "path": job.path,
        "source": {"name": Path(job.path).name, **digests},
        "stats": stats,
        "tokens_path": str(tokens_path),
        "index_path": str(index_path),
        "reused": reused,
        "seconds": time.perf_counter() - started,
    }


def _tokenize_file_to_cache(job: FileJob, tokens_path: Path, index_path: Path) -> None:
    tokenizer = _tokenizer_for(job.tokenizer_source).backend_tokenizer
    pmids, statuses, languages, n_chars, token_counts = [], [], [], [], []
    token_chunks, deleted, malformed = [], [], []
    pending: list[str] = []

    def flush() -> None:
        for encoding in tokenizer.encode_batch(pending, add_special_tokens=False):
            ids = np.asarray(encoding.ids + [EOS_ID], dtype=np.uint16)
            token_chunks.append(ids)
            token_counts.append(len(ids))
        pending.clear()

    for item in iter_pubmed_file(job.path):
        if isinstance(item, DeletedCitation):
            deleted.append(item.pmid)
        elif isinstance(item, MalformedRecord):
            malformed.append(dataclasses.asdict(item))
        else:
            has_abstract = bool(item.abstract)
            pmids.append(item.pmid)
            statuses.append(STATUS_ABSTRACT if has_abstract else STATUS_NO_ABSTRACT)
            languages.append(",".join(item.languages))
            text = item.text if has_abstract else ""
            n_chars.append(len(text))
            if has_abstract:
                pending.append(text)
                if len(pending) >= job.batch_docs:
                    flush()
    flush()
    statuses_array = np.asarray(statuses, np.int8)
    # token_counts holds documents only; records without an abstract have no tokens.
    record_token_counts = np.zeros(len(statuses), np.int64)
    record_token_counts[statuses_array == STATUS_ABSTRACT] = token_counts
    tokens = np.concatenate(token_chunks) if token_chunks else np.zeros(0, np.uint16)
    stats = {
        "records": len(pmids),
        "abstracts": len(token_counts),
        "deletions": len(deleted),
        "tokens": int(tokens.size),
        "malformed": malformed,
    }
    with atomic_output(tokens_path) as partial:
        with open(partial, "wb") as stream:
            np.save(stream, tokens)
    # The index is written last: its presence marks the cache entry complete.
    with atomic_output(index_path) as partial:
        with open(partial, "wb") as stream:
            np.savez(
                stream,
                pmids=np.asarray(pmids, np.int64),
                statuses=statuses_array,
                languages=np.asarray(languages, dtype=str) if languages else np.zeros(0, "U1"),
                n_chars=np.asarray(n_chars, np.int64),
                token_counts=record_token_counts,
                deleted=np.asarray(deleted, np.int64),
                stats=np.asarray(json.dumps(stats)),
            )



def _init_worker() -> None:
    # One tokenizer thread per worker process: the pool already fills the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def run_file_jobs(jobs: list[FileJob], workers: int, progress: bool) -> list[dict]:
    """Process every file (in a spawn pool when workers > 1); results in job order."""
    from tqdm import tqdm

    results: dict[str, dict] = {}
    documents = tokens = 0
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="file", desc="tokenize", disable=not progress, file=sys.stderr)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # spawn, not fork: the caller (e.g. the trainer) may already run JAX threads.
            pool = stack.enter_context(
                multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker)
            )
            outcomes = pool.imap_unordered(_process_file, jobs)
        else:
            outcomes = map(_process_file, jobs)
        for outcome in outcomes:
            results[outcome["path"]] = outcome
            if "error" in outcome:
                bar.write(f"error: {outcome['error']}", file=sys.stderr)
            else:
                documents += outcome["stats"]["abstracts"]
                tokens += outcome["stats"]["tokens"]
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(docs_per_s=f"{documents / elapsed:,.0f}", tokens_per_s=f"{tokens / elapsed:,.0f}")
            bar.update(1)
    bar.close()
    return [results[job.path] for job in jobs]

