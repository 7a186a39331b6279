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

import dataclasses
import json
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biomamba_jax.data.tokenizer import DEFAULT_TOKENIZER, EOS_ID
from biomamba_jax.data.pubmed.parse import resolve_pubmed_inputs
from biomamba_jax.files import PARTIAL_SUFFIX, atomic_output
from biomamba_jax.data.pubmed.shards import (MANIFEST_FORMAT, MANIFEST_NAME, SPLITS,
                                             merge_files, validation_mask, write_split)
from biomamba_jax.data.pubmed.tokenize import FileJob, run_file_jobs, tokenizer_fingerprint, worker_tokenizers

_MAX_LISTED_MALFORMED = 100  # malformed records listed in the manifest

class PrepareError(Exception):
    """prepare_pubmed could not produce a complete dataset; the message says why."""





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
    manifest is written, so a partial dataset is never mistaken for a complete one; a run
    that changes any file of an existing dataset removes its old manifest first. When no
    input can be read, an `out_dir` this run created is removed again.
    Raises PrepareError when no document survives.
    """
    from biomamba_jax.data.tokenizer import load_tokenizer

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
    worker_tokenizers[str(tokenizer)] = loaded_tokenizer
    fingerprint = tokenizer_fingerprint(loaded_tokenizer)

    out_dir = Path(out_dir)
    created_out_dir = not out_dir.exists()
    cache_dir = out_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for leftover in [*out_dir.glob(f"*{PARTIAL_SUFFIX}"), *cache_dir.glob(f"*{PARTIAL_SUFFIX}")]:
        leftover.unlink()  # an interrupted write; never complete by construction

    jobs = [FileJob(str(path), str(cache_dir), str(tokenizer), fingerprint) for path in files]
    results = run_file_jobs(jobs, workers, progress)
    parse_seconds = time.perf_counter() - started
    failed = [{"file": str(result["path"]), "error": result["error"]} for result in results if "error" in result]
    good = [result for result in results if "error" not in result]
    if not good:
        if created_out_dir:  # it holds nothing but an empty cache: leave no folder that looks like a dataset
            shutil.rmtree(out_dir, ignore_errors=True)
        raise PrepareError("No input file could be read:\n" + "\n".join(f"  {f['error']}" for f in failed))

    documents, skipped = merge_files([r["index_path"] for r in good], min_chars=min_chars, language=language)
    malformed = [record for result in good for record in result["stats"]["malformed"]]
    skipped["malformed"] = len(malformed)
    if len(documents.pmids) == 0:
        raise PrepareError(
            f"No documents left from {len(good)} file(s) after parsing and filtering (skipped: {skipped}). "
            "Check --language / --min-chars and that the inputs are PubMed files with abstracts."
        )

    token_files = [np.load(result["tokens_path"], mmap_mode="r") for result in good]
    is_validation = validation_mask(documents.pmids, val_fraction)

    def invalidate_manifest() -> None:
        # An old manifest describes the shards about to change: until this run writes a
        # new one (only when it succeeds), the folder must not pass for a finished dataset.
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    splits = {
        split: write_split(split, documents.take(mask), token_files, out_dir, shard_tokens, invalidate_manifest)
        for split, mask in (("train", ~is_validation), ("validation", is_validation))
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

