"""PubMed baseline/update XML to tokenized, packed, sharded pretraining data.

The pipeline reads as its modules: `download` (NLM files, md5-checked), `parse` (streaming
XML to records), `tokenize` (per-file token caches in worker processes), `shards`
(merge across files, train/validation split, uint16 shards and manifest), and `prepare`,
which runs them in order.
"""

from biomamba_jax.data.pubmed.download import BASELINE_PREFIX, BASELINE_URL, DownloadError, download_pubmed_baseline
from biomamba_jax.data.pubmed.parse import (DeletedCitation, MalformedRecord, PubmedFileError, PubmedRecord,
                                            iter_pubmed_file, parse_pubmed_article, resolve_pubmed_inputs)
from biomamba_jax.data.pubmed.prepare import PrepareError, PrepareResult, prepare_pubmed
from biomamba_jax.data.pubmed.shards import MANIFEST_FORMAT, MANIFEST_NAME, SPLITS, split_hash
from biomamba_jax.files import atomic_output

__all__ = [
    "BASELINE_PREFIX", "BASELINE_URL", "DeletedCitation", "DownloadError", "MalformedRecord", "MANIFEST_FORMAT", "MANIFEST_NAME", "PrepareError",
    "PrepareResult", "PubmedFileError", "PubmedRecord", "SPLITS", "atomic_output", "download_pubmed_baseline",
    "iter_pubmed_file", "parse_pubmed_article", "prepare_pubmed", "resolve_pubmed_inputs", "split_hash",
]
