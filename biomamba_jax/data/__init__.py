"""Data pipelines: PubMed pretraining shards, the grain loader over them, BioASQ fine-tuning."""

from biomamba_jax.data.bioasq import (
    PROMPT_TEMPLATE,
    BioASQFormatError,
    BioASQQuestion,
    BioASQSet,
    ExampleTooLong,
    encode_example,
    encode_examples,
    load_bioasq,
    normalise_exact_answer,
    pad_batch,
)
from biomamba_jax.data.loader import LMBatchIterator, make_lm_loader, read_manifest
from biomamba_jax.data.pubmed import (
    DownloadError,
    PrepareError,
    PrepareResult,
    PubmedFileError,
    PubmedRecord,
    download_pubmed_baseline,
    iter_pubmed_file,
    prepare_pubmed,
)
from biomamba_jax.data.synthetic import write_synthetic_pubmed

__all__ = [
    "PROMPT_TEMPLATE",
    "BioASQFormatError",
    "BioASQQuestion",
    "BioASQSet",
    "ExampleTooLong",
    "encode_example",
    "encode_examples",
    "load_bioasq",
    "normalise_exact_answer",
    "pad_batch",
    "DownloadError",
    "LMBatchIterator",
    "PrepareError",
    "PrepareResult",
    "PubmedFileError",
    "PubmedRecord",
    "download_pubmed_baseline",
    "iter_pubmed_file",
    "make_lm_loader",
    "prepare_pubmed",
    "read_manifest",
    "write_synthetic_pubmed",
]
