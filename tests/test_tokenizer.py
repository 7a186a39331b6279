"""load_tokenizer: golden ids, Mamba's EOS/pad convention, local and Hub sources, errors."""

from __future__ import annotations

import pytest
import transformers

from biomamba_jax.data import tokenizer as tokenizer_module
from biomamba_jax.data.tokenizer import EOS_ID, load_tokenizer

HEY = "Hey how are you doing?"
NEOX_HEY_IDS = [8262, 849, 403, 368, 2509, 32]


def test_neox_golden_ids(neox_tokenizer_path):
    tokenizer = load_tokenizer(neox_tokenizer_path)
    assert tokenizer(HEY)["input_ids"] == NEOX_HEY_IDS
    assert tokenizer.encode(HEY) == NEOX_HEY_IDS  # no BOS added
    assert len(tokenizer) == 50277


def test_mamba_special_tokens_eos_is_pad_and_no_bos(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    assert EOS_ID == 0
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.bos_token is None
    ids = tokenizer.encode(HEY)
    assert 0 not in ids and tokenizer.decode(ids) == HEY  # no BOS or EOS added; decodes back
    long, short = tokenizer.encode("a b c"), tokenizer.encode("a")
    assert tokenizer(["a b c", "a"], padding=True)["input_ids"] == [long, short + [0] * (len(long) - len(short))]


def test_directory_source(tokenizer_path, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(tokenizer_path.resolve())
    expected = load_tokenizer(tokenizer_path).encode(HEY)
    assert load_tokenizer(tmp_path).encode(HEY) == expected
    assert load_tokenizer(str(tmp_path)).pad_token_id == 0


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file or directory nor a Hugging Face"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer("tokenizer.json")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="(?s)Hugging Face Hub id 'EleutherAI/gpt-neox-20b'.*"
                                      "LocalEntryNotFoundError.*offline.*tokenizer.json"):
        load_tokenizer("EleutherAI/gpt-neox-20b")
    assert tokenizer_module.DEFAULT_TOKENIZER == "EleutherAI/gpt-neox-20b"


def test_hub_id_goes_through_snapshot_download_for_the_tokenizer_files_only(monkeypatch, tmp_path):
    """A Hub id is fetched as the models are (huggingface_hub's cache, fast failure
    offline), asking only for tokenizer files; transformers' own loader retried for ~50 s."""
    import huggingface_hub

    tokenizer_module.write_byte_level_tokenizer(tmp_path / "snapshot" / "tokenizer.json")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path / "snapshot"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", None)  # must not be needed
    tokenizer = load_tokenizer("state-spaces/mamba-130m-hf")
    ids = tokenizer.encode("ab")
    assert len(ids) == 2 and tokenizer.decode(ids) == "ab"  # the snapshot's byte-level tokenizer.json
    assert tokenizer.pad_token_id == 0
    [(repo, options)] = calls
    assert repo == "state-spaces/mamba-130m-hf"
    assert "tokenizer*" in options["allow_patterns"] and not any("safetensors" in p for p in options["allow_patterns"])


def test_wrong_tokenizer_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models

    other = Tokenizer(models.WordLevel({"hello": 0, "<|endoftext|>": 1}, unk_token="hello"))
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="maps '<\\|endoftext\\|>' to id 1"):
        load_tokenizer(tmp_path / "tokenizer.json")
