"""Merging per-file records across files, the train/validation split, and the uint16 token shards."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from biomamba_jax.files import atomic_output

SPLITS = ("train", "validation")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "biomamba-pubmed-tokens/1"
# What stage 1 records of each PubMed record, read again when merging.
STATUS_ABSTRACT, STATUS_NO_ABSTRACT = 0, 1

def file_digests(path: str | Path, chunk_bytes: int = 1 << 22) -> dict:
    """sha256, md5 and size of a file, in one read."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            sha256.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest(), "bytes": size}


def split_hash(pmid: int) -> float:
    """A PMID's position in [0, 1): documents with split_hash < val_fraction are validation.

    Depends only on the PMID, so adding or removing files never moves a document across
    the train/validation boundary.
    """
    digest = hashlib.sha256(str(pmid).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64





@dataclasses.dataclass(frozen=True)
class _Documents:
    """Surviving documents sorted by PMID, pointing into the per-file token caches."""

    pmids: np.ndarray  # int64
    file_index: np.ndarray  # int64, index into the list of good files
    token_offset: np.ndarray  # int64, offset within that file's token cache
    token_count: np.ndarray  # int64, including the EOS

    def take(self, mask: np.ndarray) -> _Documents:
        return _Documents(self.pmids[mask], self.file_index[mask], self.token_offset[mask], self.token_count[mask])


def merge_files(index_paths: list[str], *, min_chars: int, language: str | None) -> tuple[_Documents, dict]:
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
    no_abstract = statuses[surviving] != STATUS_ABSTRACT
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


def validation_mask(pmids: np.ndarray, val_fraction: float) -> np.ndarray:
    return np.fromiter((split_hash(int(pmid)) < val_fraction for pmid in pmids), bool, count=len(pmids))





def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_if_changed(path: Path, payload: bytes, on_change: Callable[[], None]) -> tuple[str, bool]:
    """Write `payload` atomically unless `path` already holds exactly it. (sha256, written).
    `on_change` runs first when it will be written."""
    digest = hashlib.sha256(payload).hexdigest()
    if path.is_file() and path.stat().st_size == len(payload) and file_digests(path)["sha256"] == digest:
        return digest, False
    on_change()
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


def write_split(split: str, documents: _Documents, token_files: list[np.ndarray], out_dir: Path, shard_tokens: int,
                on_change: Callable[[], None] = lambda: None) -> dict:
    """Write a split's shards and documents file, reusing identical files; `on_change` runs
    before the first file is written or deleted (prepare_pubmed drops the manifest then)."""
    shards, written = [], 0
    buffer = np.empty(shard_tokens, np.uint16)
    filled = 0

    def emit(tokens: np.ndarray) -> None:
        nonlocal written
        name = shard_name(split, len(shards))
        digest, was_written = _write_if_changed(out_dir / name, _npy_bytes(tokens), on_change)
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
            on_change()
            stale.unlink()
    documents_file = f"{split}-documents.npy"
    _write_if_changed(
        out_dir / documents_file, _npy_bytes(np.stack([documents.pmids, documents.token_count], axis=1).astype(np.int64)),
        on_change,
    )
    return {
        "documents": int(len(documents.pmids)),
        "tokens": int(documents.token_count.sum()),
        "shards": shards,
        "documents_file": documents_file,
        "shards_written": written,
    }

