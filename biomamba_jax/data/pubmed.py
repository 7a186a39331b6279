"""PubMed baseline/update XML to tokenized, packed, sharded pretraining data.

Pipeline (`prepare_pubmed`):

1. Each source file (`.xml` or `.xml.gz`) is streamed with `iterparse` (constant memory),
   its records tokenized with the GPT-NeoX tokenizer (EOS after each document), and the
   result cached under `<out>/cache/` keyed by the file's sha256 and the tokenizer. Files
   run in parallel worker processes; a re-run reuses every finished cache file.
2. Records are merged across files in sorted file-name order: a later file's record for
   a PMID replaces the earlier one, and a later `DeleteCitation` removes it. Filters
   (`min_chars`, `language`) apply to the surviving version.
3. Surviving documents, sorted by PMID, are split train/validation by a hash of the PMID
   (so adding files never moves a document across the split) and written as uint16
   `.npy` shards of `shard_tokens` tokens, with `manifest.json` describing everything.

Output layout (`out_dir`):
    train-00000.npy ...        uint16 token stream, documents separated by EOS (id 0)
    validation-00000.npy ...
    train-documents.npy        int64 (n_documents, 2): PMID, token count incl. EOS
    validation-documents.npy
    manifest.json              sources, counts, shards with sha256, tokenizer, command
    cache/                     per-source-file tokenized records (safe to delete)
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from biomamba_jax.tokenizer import DEFAULT_TOKENIZER, EOS_ID

BASELINE_URL = "https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/"
BASELINE_PREFIX = "pubmed25n"
SPLITS = ("train", "validation")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "biomamba-pubmed-tokens/1"
# Bump when parsing or tokenization output changes, so stale caches are not reused.
CACHE_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_MAX_LISTED_MALFORMED = 100


class PubmedFileError(Exception):
    """A whole source file is unreadable: truncated gzip, not XML, not well-formed."""


class PrepareError(Exception):
    """prepare_pubmed could not produce a complete dataset; the message says why."""


class DownloadError(Exception):
    """A download failed or did not match its published md5."""


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    A crash mid-write leaves a `*.partial` file, never a truncated file under the final
    name, so "the file exists" always means "the file is complete".
    """
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def file_digests(path: str | Path, chunk_bytes: int = 1 << 22) -> dict:
    """sha256, md5 and size of a file, in one read."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            sha256.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest(), "bytes": size}


def resolve_pubmed_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand directories (their *.xml and *.xml.gz), globs and file paths; sort by name.

    Sorted file-name order is the order updates are applied in: NLM numbers baseline and
    update files consecutively (pubmed25n0001 ... pubmed25n1274, then updates).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            matches = sorted(path.glob("*.xml")) + sorted(path.glob("*.xml.gz"))
            if not matches:
                raise FileNotFoundError(f"Input directory {path} holds no *.xml or *.xml.gz files.")
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(match) for match in sorted(glob.glob(str(path))) if Path(match).is_file()]
            if not matches:
                raise FileNotFoundError(
                    f"Input {str(item)!r} is not a file, a directory or a glob that matches any file."
                )
        for match in matches:
            found[match.resolve()] = None
    if not found:
        raise FileNotFoundError("No PubMed input files given.")
    return sorted(found, key=lambda path: (path.name, str(path)))


# --------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class PubmedRecord:
    pmid: int
    title: str
    abstract: str  # "" when the record has no abstract
    languages: tuple[str, ...]

    @property
    def text(self) -> str:
        """The pretraining document: title, blank line, abstract."""
        return f"{self.title}\n\n{self.abstract}" if self.title else self.abstract


@dataclasses.dataclass(frozen=True)
class DeletedCitation:
    pmid: int


@dataclasses.dataclass(frozen=True)
class MalformedRecord:
    file: str
    pmid: str | None
    reason: str


def _inner_text(element: ElementTree.Element | None) -> str:
    """All text under `element` (inline <sub>, <i>, ... included), whitespace collapsed."""
    if element is None:
        return ""
    return " ".join("".join(element.itertext()).split())


def _abstract_text(abstract: ElementTree.Element | None) -> str:
    # Only AbstractText children: CopyrightInformation is a sibling inside Abstract.
    if abstract is None:
        return ""
    sections = []
    for section in abstract.findall("AbstractText"):
        text = _inner_text(section)
        if not text:
            continue
        label = (section.get("Label") or "").strip()
        sections.append(f"{label}: {text}" if label else text)
    return "\n".join(sections)


def parse_pubmed_article(article: ElementTree.Element, file_name: str) -> PubmedRecord | MalformedRecord:
    """One `PubmedArticle` element to a record, or a MalformedRecord saying what is wrong."""
    citation = article.find("MedlineCitation")
    if citation is None:
        return MalformedRecord(file_name, None, "PubmedArticle without MedlineCitation")
    # Direct child only: CommentsCorrections and others nest PMIDs of *other* articles.
    pmid_element = citation.find("PMID")
    pmid_text = (pmid_element.text or "").strip() if pmid_element is not None else ""
    if not pmid_text:
        return MalformedRecord(file_name, None, "MedlineCitation without PMID")
    if not pmid_text.isdigit():
        return MalformedRecord(file_name, pmid_text, f"PMID {pmid_text!r} is not a number")
    article_element = citation.find("Article")
    if article_element is None:
        return MalformedRecord(file_name, pmid_text, "MedlineCitation without Article")
    return PubmedRecord(
        pmid=int(pmid_text),
        title=_inner_text(article_element.find("ArticleTitle")),
        abstract=_abstract_text(article_element.find("Abstract")),
        languages=tuple(
            (language.text or "").strip().lower() for language in article_element.findall("Language")
        ),
    )


def open_pubmed_file(path: str | Path):
    """Binary stream of the XML, gunzipping by magic number (not trusting the suffix)."""
    path = Path(path)
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def iter_pubmed_file(path: str | Path) -> Iterator[PubmedRecord | DeletedCitation | MalformedRecord]:
    """Stream records, deletions and malformed records of one baseline/update file.

    Memory stays constant: each article is dropped from the tree once yielded. A file
    that is not (complete) XML raises PubmedFileError naming the file.
    """
    path = Path(path)
    try:
        with open_pubmed_file(path) as stream:
            root = None
            for event, element in ElementTree.iterparse(stream, events=("start", "end")):
                if root is None:
                    root = element
                    if root.tag != "PubmedArticleSet":
                        raise PubmedFileError(
                            f"{path}: root element is <{root.tag}>, expected <PubmedArticleSet>; "
                            "is this a PubMed baseline/update file?"
                        )
                    continue
                if event != "end":
                    continue
                if element.tag == "PubmedArticle":
                    yield parse_pubmed_article(element, path.name)
                elif element.tag == "DeleteCitation":
                    for pmid in element.findall("PMID"):
                        if (pmid.text or "").strip().isdigit():
                            yield DeletedCitation(int(pmid.text.strip()))
                        else:
                            yield MalformedRecord(path.name, pmid.text, "DeleteCitation PMID is not a number")
                else:
                    continue
                # Articles are direct children of the root; dropping them keeps memory flat.
                root.clear()
    except ElementTree.ParseError as error:
        raise PubmedFileError(f"{path}: not well-formed XML ({error}); the file is corrupt or not PubMed XML.") from error
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise PubmedFileError(f"{path}: truncated or corrupt gzip ({error}); download it again.") from error


def split_hash(pmid: int) -> float:
    """A PMID's position in [0, 1): documents with split_hash < val_fraction are validation.

    Depends only on the PMID, so adding or removing files never moves a document across
    the train/validation boundary.
    """
    digest = hashlib.sha256(str(pmid).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


# --------------------------------------------------------------------------- stage 1: per-file token cache

_STATUS_ABSTRACT, _STATUS_NO_ABSTRACT = 0, 1
_worker_tokenizer = {}


def _tokenizer_for(source: str):
    if source not in _worker_tokenizer:
        from biomamba_jax.tokenizer import load_tokenizer

        _worker_tokenizer[source] = load_tokenizer(source)
    return _worker_tokenizer[source]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation: identifies it whatever its path."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class _FileJob:
    path: str
    cache_dir: str
    tokenizer_source: str
    tokenizer_fingerprint: str
    batch_docs: int = 512


def _cache_paths(job: _FileJob, sha256: str) -> tuple[Path, Path]:
    stem = f"{Path(job.path).name}.{sha256[:16]}.{job.tokenizer_fingerprint[:12]}.v{CACHE_VERSION}"
    return Path(job.cache_dir) / f"{stem}.tokens.npy", Path(job.cache_dir) / f"{stem}.index.npz"


def _process_file(job: _FileJob) -> dict:
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


def _tokenize_file_to_cache(job: _FileJob, tokens_path: Path, index_path: Path) -> None:
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
            statuses.append(_STATUS_ABSTRACT if has_abstract else _STATUS_NO_ABSTRACT)
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
    record_token_counts[statuses_array == _STATUS_ABSTRACT] = token_counts
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


def _run_file_jobs(jobs: list[_FileJob], workers: int, progress: bool) -> list[dict]:
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


# --------------------------------------------------------------------------- stage 2: merge across files


@dataclasses.dataclass(frozen=True)
class _Documents:
    """Surviving documents sorted by PMID, pointing into the per-file token caches."""

    pmids: np.ndarray  # int64
    file_index: np.ndarray  # int64, index into the list of good files
    token_offset: np.ndarray  # int64, offset within that file's token cache
    token_count: np.ndarray  # int64, including the EOS

    def take(self, mask: np.ndarray) -> _Documents:
        return _Documents(self.pmids[mask], self.file_index[mask], self.token_offset[mask], self.token_count[mask])


def _merge_files(index_paths: list[str], *, min_chars: int, language: str | None) -> tuple[_Documents, dict]:
    """Apply later-version-wins and DeleteCitation across files (in the given order), then filters."""
    pmids, orders, record_refs = [], [], []
    languages, n_chars, statuses, file_index, token_offset, token_count = [], [], [], [], [], []
    n_records = 0
    for position, index_path in enumerate(index_paths):
        with np.load(index_path) as index:
            file_pmids, deleted = index["pmids"], index["deleted"]
            counts = index["token_counts"]
            languages.append(index["languages"])
            n_chars.append(index["n_chars"])
            statuses.append(index["statuses"])
        file_index.append(np.full(len(file_pmids), position, np.int64))
        token_offset.append(np.cumsum(counts) - counts)
        token_count.append(counts)
        # Order key: file position, then place in file; deletions come after the file's
        # records, which is where NLM puts DeleteCitation.
        local = np.arange(len(file_pmids) + len(deleted), dtype=np.int64)
        pmids.append(np.concatenate([file_pmids, deleted]))
        orders.append((position << 40) + local)
        record_refs.append(
            np.concatenate([n_records + np.arange(len(file_pmids)), np.full(len(deleted), -1)]).astype(np.int64)
        )
        n_records += len(file_pmids)

    pmids, orders, record_refs = (np.concatenate(parts) for parts in (pmids, orders, record_refs))
    by_pmid = np.lexsort((orders, pmids))
    pmids, record_refs = pmids[by_pmid], record_refs[by_pmid]
    is_last = np.append(pmids[1:] != pmids[:-1], True)
    group_start = np.flatnonzero(np.insert(pmids[1:] != pmids[:-1], 0, True))
    had_record = np.maximum.reduceat((record_refs >= 0).astype(np.int8), group_start).astype(bool)
    final_refs = record_refs[is_last]
    final_pmids = pmids[is_last]

    languages, n_chars, statuses = (np.concatenate(parts) for parts in (languages, n_chars, statuses))
    file_index, token_offset, token_count = (np.concatenate(p) for p in (file_index, token_offset, token_count))

    deleted = final_refs < 0
    surviving = final_refs[~deleted]
    no_abstract = statuses[surviving] != _STATUS_ABSTRACT
    wrong_language = np.zeros(len(surviving), bool)
    if language:
        wanted = language.strip().lower()
        wrong_language = np.array(
            [wanted not in str(codes).split(",") for codes in languages[surviving]], bool
        ) & ~no_abstract
    too_short = (n_chars[surviving] < min_chars) & ~no_abstract & ~wrong_language
    keep = ~(no_abstract | wrong_language | too_short)
    kept_refs = surviving[keep]
    documents = _Documents(final_pmids[~deleted][keep], file_index[kept_refs], token_offset[kept_refs], token_count[kept_refs])
    skipped = {
        "no_abstract": int(no_abstract.sum()),
        "language": int(wrong_language.sum()),
        "min_chars": int(too_short.sum()),
        "deleted": int((deleted & had_record).sum()),
        "deleted_unknown_pmid": int((deleted & ~had_record).sum()),
        "replaced_by_later_version": int(n_records - had_record.sum()),
    }
    return documents, skipped


def _validation_mask(pmids: np.ndarray, val_fraction: float) -> np.ndarray:
    return np.fromiter((split_hash(int(pmid)) < val_fraction for pmid in pmids), bool, count=len(pmids))


# --------------------------------------------------------------------------- stage 3: shards


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_if_changed(path: Path, payload: bytes) -> tuple[str, bool]:
    """Write `payload` atomically unless `path` already holds exactly it. (sha256, written)."""
    digest = hashlib.sha256(payload).hexdigest()
    if path.is_file() and path.stat().st_size == len(payload) and file_digests(path)["sha256"] == digest:
        return digest, False
    with atomic_output(path) as partial:
        partial.write_bytes(payload)
    return digest, True


def _document_token_pieces(documents: _Documents, token_files: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Token slices of the documents in order, merging neighbours that are contiguous on disk."""
    if len(documents.pmids) == 0:
        return
    ends = documents.token_offset + documents.token_count
    continues = (documents.file_index[1:] == documents.file_index[:-1]) & (documents.token_offset[1:] == ends[:-1])
    run_starts = np.flatnonzero(np.insert(~continues, 0, True))
    run_ends = np.append(run_starts[1:], len(documents.pmids)) - 1
    for first, last in zip(run_starts, run_ends):
        yield token_files[documents.file_index[first]][documents.token_offset[first] : ends[last]]


def _write_split(split: str, documents: _Documents, token_files: list[np.ndarray], out_dir: Path, shard_tokens: int) -> dict:
    shards, written = [], 0
    buffer = np.empty(shard_tokens, np.uint16)
    filled = 0

    def emit(tokens: np.ndarray) -> None:
        nonlocal written
        name = shard_name(split, len(shards))
        digest, was_written = _write_if_changed(out_dir / name, _npy_bytes(tokens))
        written += was_written
        shards.append({"file": name, "tokens": int(tokens.size), "sha256": digest})

    for piece in _document_token_pieces(documents, token_files):
        while piece.size:
            take = min(piece.size, shard_tokens - filled)
            buffer[filled : filled + take] = piece[:take]
            filled, piece = filled + take, piece[take:]
            if filled == shard_tokens:
                emit(buffer)
                filled = 0
    if filled:
        emit(buffer[:filled])

    current = {shard["file"] for shard in shards}
    for stale in out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].npy"):
        if stale.name not in current:
            stale.unlink()
    documents_file = f"{split}-documents.npy"
    _write_if_changed(
        out_dir / documents_file, _npy_bytes(np.stack([documents.pmids, documents.token_count], axis=1).astype(np.int64))
    )
    return {
        "documents": int(len(documents.pmids)),
        "tokens": int(documents.token_count.sum()),
        "shards": shards,
        "documents_file": documents_file,
        "shards_written": written,
    }


# --------------------------------------------------------------------------- the one entry point


@dataclasses.dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    failed_files: list[dict]
    files_parsed: int
    files_reused: int
    shards_written: int
    shards_reused: int
    seconds: float
    parse_seconds: float

    def summary(self) -> str:
        manifest = self.manifest
        tokens = sum(manifest["splits"][split]["tokens"] for split in SPLITS)
        documents = sum(manifest["splits"][split]["documents"] for split in SPLITS)
        lines = [
            f"PubMed dataset in {self.out_dir}",
            f"  files: {self.files_parsed} parsed, {self.files_reused} reused from cache, {len(self.failed_files)} failed",
        ]
        for split in SPLITS:
            info = manifest["splits"][split]
            lines.append(f"  {split}: {info['documents']:,} documents, {info['tokens']:,} tokens, {len(info['shards'])} shards")
        lines.append("  skipped: " + ", ".join(f"{key} {value:,}" for key, value in manifest["skipped"].items()))
        for record in manifest["malformed_records"][:10]:
            lines.append(f"  malformed record: {record['file']} PMID {record['pmid']}: {record['reason']}")
        lines.append(f"  shards: {self.shards_written} written, {self.shards_reused} already complete")
        if self.parse_seconds > 0 and self.files_parsed:
            lines.append(
                f"  throughput: {documents / self.seconds:,.0f} documents/s, {tokens / self.seconds:,.0f} tokens/s "
                f"overall ({self.seconds:.1f} s)"
            )
        for failure in self.failed_files:
            lines.append(f"  FAILED {failure['file']}: {failure['error']}")
        return "\n".join(lines)


def prepare_pubmed(
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str | Path = DEFAULT_TOKENIZER,
    workers: int = 1,
    val_fraction: float = 0.005,
    shard_tokens: int = 100_000_000,
    min_chars: int = 0,
    language: str | None = None,
    allow_failed_files: bool = False,
    command: str | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize PubMed XML files into train/validation uint16 shards plus manifest.json.

    Re-running with the same out_dir resumes: per-file token caches and finished shards
    (same sha256) are reused. Unreadable files (truncated gzip, not XML) do not stop the
    others; unless `allow_failed_files`, they raise PrepareError at the end and no
    manifest is written, so a partial dataset is never mistaken for a complete one.
    Raises PrepareError when no document survives.
    """
    from biomamba_jax.tokenizer import load_tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if shard_tokens <= 0 or workers <= 0 or min_chars < 0:
        raise ValueError(f"shard_tokens and workers must be positive and min_chars >= 0 "
                         f"(got {shard_tokens}, {workers}, {min_chars}).")
    started = time.perf_counter()
    files = resolve_pubmed_inputs(inputs)
    loaded_tokenizer = load_tokenizer(tokenizer)
    vocab_size = len(loaded_tokenizer)
    if vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"Tokenizer {tokenizer} has {vocab_size} ids; uint16 shards hold at most 65,536.")
    _worker_tokenizer[str(tokenizer)] = loaded_tokenizer
    fingerprint = tokenizer_fingerprint(loaded_tokenizer)

    out_dir = Path(out_dir)
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for leftover in [*out_dir.glob(f"*{PARTIAL_SUFFIX}"), *cache_dir.glob(f"*{PARTIAL_SUFFIX}")]:
        leftover.unlink()  # an interrupted write; never complete by construction

    jobs = [_FileJob(str(path), str(cache_dir), str(tokenizer), fingerprint) for path in files]
    results = _run_file_jobs(jobs, workers, progress)
    parse_seconds = time.perf_counter() - started
    failed = [{"file": str(result["path"]), "error": result["error"]} for result in results if "error" in result]
    good = [result for result in results if "error" not in result]
    if not good:
        raise PrepareError("No input file could be read:\n" + "\n".join(f"  {f['error']}" for f in failed))

    documents, skipped = _merge_files([r["index_path"] for r in good], min_chars=min_chars, language=language)
    malformed = [record for result in good for record in result["stats"]["malformed"]]
    skipped["malformed"] = len(malformed)
    if len(documents.pmids) == 0:
        raise PrepareError(
            f"No documents left from {len(good)} file(s) after parsing and filtering (skipped: {skipped}). "
            "Check --language / --min-chars and that the inputs are PubMed files with abstracts."
        )

    token_files = [np.load(result["tokens_path"], mmap_mode="r") for result in good]
    is_validation = _validation_mask(documents.pmids, val_fraction)
    splits = {
        "train": _write_split("train", documents.take(~is_validation), token_files, out_dir, shard_tokens),
        "validation": _write_split("validation", documents.take(is_validation), token_files, out_dir, shard_tokens),
    }
    shards_written = sum(split.pop("shards_written") for split in splits.values())
    shards_total = sum(len(split["shards"]) for split in splits.values())

    manifest = {
        "format": MANIFEST_FORMAT,
        "dtype": "uint16",
        "eos_id": EOS_ID,
        "tokenizer": {"name": str(tokenizer), "vocab_size": vocab_size, "sha256": fingerprint},
        "config": {
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
            "min_chars": min_chars,
            "language": language,
            "document": "title + '\\n\\n' + abstract (labelled sections 'LABEL: text', one per line) + EOS",
            "split": "validation if sha256(str(pmid))[:8] / 2**64 < val_fraction",
            "order": "documents sorted by PMID; later files replace earlier versions; DeleteCitation removes",
        },
        "sources": [
            {**result["source"], **{key: result["stats"][key] for key in ("records", "abstracts", "deletions", "tokens")},
             "malformed": len(result["stats"]["malformed"])}
            for result in good
        ],
        "failed_files": [{"file": Path(f["file"]).name, "error": f["error"]} for f in failed],
        "splits": splits,
        "skipped": skipped,
        "malformed_records": malformed[:_MAX_LISTED_MALFORMED],
        "command": command if command is not None else shlex.join(sys.argv),
    }
    result = PrepareResult(
        out_dir=out_dir,
        manifest=manifest,
        failed_files=failed,
        files_parsed=sum(not r["reused"] for r in good),
        files_reused=sum(r["reused"] for r in good),
        shards_written=shards_written,
        shards_reused=shards_total - shards_written,
        seconds=time.perf_counter() - started,
        parse_seconds=parse_seconds,
    )
    if failed and not allow_failed_files:
        raise PrepareError(
            f"{len(failed)} of {len(files)} input file(s) could not be read; shards for the other files are "
            "written but manifest.json is not (pass allow_failed_files / --allow-failed-files to accept):\n"
            + "\n".join(f"  {f['error']}" for f in failed)
        )
    with atomic_output(out_dir / MANIFEST_NAME) as partial:
        partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return result


# --------------------------------------------------------------------------- download


def _read_md5_file(text: str, file_name: str) -> str:
    """NLM writes `MD5(pubmed25n0001.xml.gz)= <hex>`; md5sum writes `<hex>  name`."""
    for token in text.replace("=", " ").split():
        if len(token) == 32 and all(c in "0123456789abcdefABCDEF" for c in token):
            return token.lower()
    raise DownloadError(f"No md5 found in the .md5 file of {file_name}: {text[:200]!r}")


def _fetch(url: str, destination: Path, timeout: float) -> str:
    """Download url to destination (atomically); return the md5 of what arrived."""
    md5 = hashlib.md5()
    with atomic_output(destination) as partial:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as stream:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                stream.write(chunk)
    return md5.hexdigest()


def download_pubmed_baseline(
    n_files: int,
    dest_dir: str | Path,
    *,
    base_url: str = BASELINE_URL,
    prefix: str = BASELINE_PREFIX,
    first: int = 1,
    retries: int = 2,
    timeout: float = 120.0,
) -> list[Path]:
    """Fetch `{prefix}{NNNN}.xml.gz` for NNNN = first .. first+n_files-1, each checked against its `.md5`.

    Files already present with the right md5 are not fetched again. Works with any URL
    urllib opens, including `file://` (used by the tests and for local mirrors).
    Raises DownloadError naming the file on a network error or md5 mismatch.
    """
    if n_files <= 0:
        raise ValueError(f"n_files must be positive, got {n_files}.")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    paths = []
    for number in range(first, first + n_files):
        name = f"{prefix}{number:04d}.xml.gz"
        paths.append(_download_verified(base_url + name, dest_dir / name, retries=retries, timeout=timeout))
    return paths


def _download_verified(url: str, destination: Path, *, retries: int, timeout: float) -> Path:
    name = destination.name
    try:
        with urllib.request.urlopen(url + ".md5", timeout=timeout) as response:
            expected = _read_md5_file(response.read().decode("ascii", "replace"), name)
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(f"Could not fetch {url}.md5: {error}") from error
    if destination.is_file() and file_digests(destination)["md5"] == expected:
        return destination
    problem = ""
    for _ in range(retries + 1):
        try:
            actual = _fetch(url, destination, timeout)
        except (urllib.error.URLError, OSError) as error:
            problem = f"could not fetch {url}: {error}"
            continue
        if actual == expected:
            return destination
        destination.unlink(missing_ok=True)
        problem = f"md5 mismatch for {name}: expected {expected} (from {url}.md5), got {actual}"
    raise DownloadError(f"Download of {name} failed after {retries + 1} attempt(s): {problem}")
