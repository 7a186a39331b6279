"""load_tokenizer: golden ids, Mamba's EOS/pad convention, local and Hub sources, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from biomamba_jax import tokenizer as tokenizer_module
from biomamba_jax.tokenizer import EOS_ID, load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TOKENIZER_JSON = SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


@pytest.fixture
def tokenizer_json() -> Path:
    if not TOKENIZER_JSON.exists():
        pytest.skip(f"shared tokenizer not found at {TOKENIZER_JSON} (a clone without ../shared/data)")
    return TOKENIZER_JSON


def test_golden_ids_and_mamba_special_tokens(tokenizer_json):
    tokenizer = load_tokenizer(tokenizer_json)
    assert tokenizer("Hey how are you doing?")["input_ids"] == [8262, 849, 403, 368, 2509, 32]
    assert tokenizer.encode("Hey how are you doing?") == [8262, 849, 403, 368, 2509, 32]  # no BOS added
    assert EOS_ID == 0
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.bos_token is None
    assert len(tokenizer) == 50277
    padded = tokenizer(["a b c", "a"], padding=True)["input_ids"]
    assert padded[1][1:] == [0, 0]


def test_directory_source(tokenizer_json, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(tokenizer_json.resolve())
    assert load_tokenizer(tmp_path).encode("Hey how are you doing?") == [8262, 849, 403, 368, 2509, 32]
    assert load_tokenizer(str(tmp_path)).pad_token_id == 0


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file or directory nor a Hugging Face"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer("tokenizer.json")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="(?s)Hugging Face Hub id 'EleutherAI/gpt-neox-20b'.*offline"):
        load_tokenizer("EleutherAI/gpt-neox-20b")
    assert tokenizer_module.DEFAULT_TOKENIZER == "EleutherAI/gpt-neox-20b"


def test_wrong_tokenizer_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.WordLevel({"hello": 0, "<|endoftext|>": 1}, unk_token="hello"))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="maps '<\\|endoftext\\|>' to id 1"):
        load_tokenizer(tmp_path / "tokenizer.json")
