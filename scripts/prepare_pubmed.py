"""Tokenize PubMed baseline/update XML into packed uint16 shards for pretraining.

Examples:
  # fetch the first 2 baseline files from NLM and tokenize them
  python scripts/prepare_pubmed.py --download 2 --out data/pubmed
  # tokenize files already on disk (directory, glob or list), offline tokenizer
  python scripts/prepare_pubmed.py raw/*.xml.gz --out data/pubmed \\
      --tokenizer ../shared/data/tokenizers/gpt-neox-20b/tokenizer.json --workers 8

  # check a prepared dataset: every shard's size and sha256 against manifest.json
  python scripts/prepare_pubmed.py --verify --out data/pubmed

Re-running with the same --out resumes (finished files and shards are reused). Exit
status 1 when a file could not be read (truncated .gz, not XML), no document survives,
or --verify finds a shard that differs from the manifest.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from biomamba_jax.data.pubmed import (
    BASELINE_PREFIX,
    BASELINE_URL,
    DownloadError,
    PrepareError,
    download_pubmed_baseline,
    prepare_pubmed,
)
from biomamba_jax.data.tokenizer import DEFAULT_TOKENIZER


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="*", help="PubMed .xml/.xml.gz files, directories or globs (sorted by name = update order)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for shards and manifest.json")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.json, tokenizer directory or Hub id (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: CPU count, %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="share of PMIDs in validation, by PMID hash (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: %(default)s)")
    parser.add_argument("--min-chars", type=int, default=0, help="drop documents (title + abstract) shorter than this")
    parser.add_argument("--language", default=None, help="keep only articles in this Article/Language, e.g. eng")
    parser.add_argument("--allow-failed-files", action="store_true", help="write the manifest even if some input files were unreadable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", action="store_true",
                        help="only check the dataset in --out: each shard's size and sha256 against manifest.json")
    download = parser.add_argument_group("download from NLM")
    download.add_argument("--download", type=int, metavar="N", default=0, help="first fetch the first N baseline files (md5-checked)")
    download.add_argument("--download-dir", type=Path, default=None, help="where downloads go (default: OUT/raw)")
    download.add_argument("--base-url", default=BASELINE_URL, help="baseline URL, any urllib URL incl. file:// (default: %(default)s)")
    download.add_argument("--file-prefix", default=BASELINE_PREFIX, help="baseline file name prefix (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.verify and (args.inputs or args.download):
        parser.error("--verify checks the dataset already in --out; give it no inputs or --download")
    if not args.inputs and not args.download and not args.verify:
        parser.error("give input files/directories/globs, or --download N")
    return args


def verify(out: Path) -> int:
    from biomamba_jax.data import read_manifest

    try:
        manifest = read_manifest(out, verify=True)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    tokens = sum(shard["tokens"] for shard in shards)
    print(f"{out}: {len(shards)} shards, {tokens:,} tokens: sizes and sha256 match {out / 'manifest.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify:
        return verify(args.out)
    inputs = list(args.inputs)
    try:
        if args.download:
            inputs += download_pubmed_baseline(
                args.download, args.download_dir or args.out / "raw", base_url=args.base_url, prefix=args.file_prefix
            )
        result = prepare_pubmed(
            inputs,
            args.out,
            tokenizer=args.tokenizer,
            workers=args.workers,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            min_chars=args.min_chars,
            language=args.language,
            allow_failed_files=args.allow_failed_files,
            command=shlex.join(["python", "scripts/prepare_pubmed.py", *(argv if argv is not None else sys.argv[1:])]),
            progress=not args.no_progress,
        )
    except (PrepareError, DownloadError, FileNotFoundError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
