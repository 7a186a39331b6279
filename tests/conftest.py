"""Shared test set-up: fp32 matmuls at full precision so parity tolerances mean something,
one compilation cache for the session, and the tokenizers the tests run with (GPT-NeoX's
when ../shared/data has it, else one trained here)."""
import os
import shutil
import tempfile
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test processes running side by side share a GPU: each takes memory as it needs it
    # rather than JAX's default of 75% up front (set before JAX starts its backend).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import pytest

from helpers import NEOX_TOKENIZER_JSON, write_local_bpe_tokenizer

jax.config.update("jax_default_matmul_precision", "highest")

_owned_cache_dir = None


def pytest_configure(config):
    """JAX's persistent compilation cache in a folder of this session (or the one that
    JAX_COMPILATION_CACHE_DIR names). The runs here compile the same train step many
    times over, in this process and in the scripts and test processes (pytest-xdist) it
    starts, which inherit the variable; each compiles once. A fresh folder per session
    keeps timings honest."""
    global _owned_cache_dir
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not directory:
        directory = _owned_cache_dir = tempfile.mkdtemp(prefix="biomamba-tests-xla-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    jax.config.update("jax_compilation_cache_dir", directory)


def pytest_unconfigure(config):
    if _owned_cache_dir:
        shutil.rmtree(_owned_cache_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def neox_tokenizer_path() -> Path:
    """The GPT-NeoX-20B tokenizer.json, for tests of its exact token ids only."""
    if not NEOX_TOKENIZER_JSON.is_file():
        pytest.skip(f"GPT-NeoX-20B tokenizer not found at {NEOX_TOKENIZER_JSON} (a clone without "
                    "../shared/data, or BIOMAMBA_SHARED_DATA elsewhere): its exact token ids are not checked")
    return NEOX_TOKENIZER_JSON


@pytest.fixture(scope="session")
def local_tokenizer_path(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the fixtures' text (1,000 ids, `<|endoftext|>` = 0)."""
    return write_local_bpe_tokenizer(tmp_path_factory.mktemp("local-tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def tokenizer_path(request) -> Path:
    """A real subword tokenizer.json: GPT-NeoX's when present, else the locally trained one.
    Tests using it must hold for any tokenizer with `<|endoftext|>` = 0."""
    if NEOX_TOKENIZER_JSON.is_file():
        return NEOX_TOKENIZER_JSON
    return request.getfixturevalue("local_tokenizer_path")


def pytest_runtest_setup(item):
    # `pytest -m gpu` on a machine without one: say so rather than fail or run interpreted.
    if item.get_closest_marker("gpu") and jax.default_backend() != "gpu":
        pytest.skip(f"needs a GPU (JAX backend here: {jax.default_backend()})")
