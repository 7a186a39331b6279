"""The GPT-NeoX-20B tokenizer that Mamba checkpoints were trained with.

Mamba (state-spaces/mamba-*) uses `<|endoftext|>` (id 0) both as end-of-document and as
padding, and adds no BOS token. `load_tokenizer` returns a Hugging Face fast tokenizer
configured that way, whether it comes from a local `tokenizer.json`, a local tokenizer
directory, or the Hugging Face Hub.
"""

from __future__ import annotations

import re
from pathlib import Path

import transformers

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
# The name under which run configs ask for the byte-level tokenizer built locally
# (`write_byte_level_tokenizer`): offline runs and tests need no download.
OFFLINE_TOKENIZER = "offline-bytes"
EOS_TOKEN = "<|endoftext|>"
EOS_ID = 0

# "owner/name" or "name": what the Hub accepts. Anything else that does not exist locally
# is almost certainly a mistyped path, and deserves a path error rather than a network one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def load_tokenizer(source: str | Path = DEFAULT_TOKENIZER) -> transformers.PreTrainedTokenizerFast:
    """Load the GPT-NeoX tokenizer with eos = pad = `<|endoftext|>` (id 0) and no BOS.

    `source` is a directory holding `tokenizer.json` (or other Hugging Face tokenizer
    files), a path to a `tokenizer.json` file, or a Hub id such as
    "EleutherAI/gpt-neox-20b" or "state-spaces/mamba-130m-hf" (needs network access).
    """
    path = Path(source).expanduser()
    if path.is_file():
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif path.is_dir():
        tokenizer = _from_directory(path, where=f"directory {path}")
    elif isinstance(source, str) and _HUB_ID.match(source) and not source.endswith(".json"):
        where = f"Hugging Face Hub id {source!r}"
        tokenizer = _from_directory(_download(source, where), where)
    else:
        raise FileNotFoundError(
            f"Tokenizer {str(source)!r} is neither an existing file or directory nor a Hugging Face "
            "Hub id (owner/name). Pass a path to tokenizer.json, a directory holding it, or a Hub "
            f"id such as {DEFAULT_TOKENIZER!r}."
        )
    return _configure_for_mamba(tokenizer, source)


_OFFLINE_HINT = ("If this machine is offline, pass a local tokenizer.json instead (for example "
                 "../shared/data/tokenizers/gpt-neox-20b/tokenizer.json).")
# The files a tokenizer may need; not the weights.
_TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "config.json"]


def _download(hub_id: str, where: str) -> Path:
    """The tokenizer files of a Hub repo, from the local Hugging Face cache or the Hub.

    Through huggingface_hub's snapshot_download, as `pretrained.resolve_source` fetches
    models: offline, it fails at once, where transformers' own loader retried each file
    with backoff for about 50 s before failing."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=_TOKENIZER_FILES))
    except Exception as error:  # offline, unknown repo, gated repo: all end the same way
        raise OSError(f"Could not load a tokenizer from {where} ({type(error).__name__}: {error})\n"
                      + _OFFLINE_HINT) from error


def _from_directory(directory: Path, where: str) -> transformers.PreTrainedTokenizerFast:
    """Its tokenizer.json when there is one, else whatever files transformers can load."""
    if (directory / "tokenizer.json").is_file():
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    return _from_pretrained(str(directory), where=where)


def _from_pretrained(name: str, where: str) -> transformers.PreTrainedTokenizerFast:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, use_fast=True)
    except (OSError, ValueError) as error:
        raise OSError(f"Could not load a tokenizer from {where}: {error}\n" + _OFFLINE_HINT) from error
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{where} gave a slow tokenizer ({type(tokenizer).__name__}); a fast one is required.")
    return tokenizer


def _configure_for_mamba(tokenizer, source) -> transformers.PreTrainedTokenizerFast:
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if eos_id != EOS_ID:
        raise ValueError(
            f"Tokenizer {str(source)!r} maps {EOS_TOKEN!r} to id {eos_id}, but Mamba checkpoints expect "
            f"id {EOS_ID}. Is this the GPT-NeoX-20B tokenizer?"
        )
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    # Some Hub configs set a BOS; Mamba was trained without one.
    tokenizer.bos_token = None
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    return tokenizer


def write_byte_level_tokenizer(path: str | Path) -> Path:
    """Write a `tokenizer.json` with `<|endoftext|>` = 0 and the 256 bytes as ids 1..256.

    It needs no download and no training, so offline runs (the smoke preset, CI) go
    through the same tokenizer-file path as the real GPT-NeoX tokenizer. The file is
    identical on every machine, which keeps prepared data byte-for-byte reproducible.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    byte_alphabet = sorted(ByteLevel.alphabet())
    vocab = {EOS_TOKEN: EOS_ID, **{symbol: index + 1 for index, symbol in enumerate(byte_alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    tokenizer.save(str(staging))
    staging.replace(path)
    return path
