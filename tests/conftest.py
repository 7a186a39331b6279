"""Shared test set-up: fp32 matmuls at full precision so parity tolerances mean something."""
from pathlib import Path

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TOKENIZER_JSON = SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


@pytest.fixture
def tokenizer_path():
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"shared tokenizer not found at {TOKENIZER_JSON} (fresh clone without ../shared/data)")
    return TOKENIZER_JSON
