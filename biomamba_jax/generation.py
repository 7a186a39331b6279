"""Prompt completion for `scripts/generate.py`: streaming (one jitted step per token) or batched.

Streaming runs `prefill` once and then a python loop over a jitted `model.step`, so each
token can be printed as soon as it exists; a batch of prompts goes through the jitted
`generate` loop in one call, left-padded.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from biomamba_jax.model.generate import generate, left_pad, sample_next_token

__all__ = ["GenerateError", "Generator", "load_generator", "stream_complete", "batch_complete"]


class GenerateError(ValueError):
    """A model or prompt that cannot be used, named."""


@dataclasses.dataclass
class Generator:
    model: object
    tokenizer: object
    eos_token_id: int


def load_generator(source: str, tokenizer: Optional[str] = None, dtype: str = "float32") -> Generator:
    from biomamba_jax.model.config import ConfigError
    from biomamba_jax.checkpoints.convert import ConversionError
    from biomamba_jax.checkpoints.load import model_from_params
    from biomamba_jax.checkpoints.runs import find_tokenizer, load_model
    from biomamba_jax.data.tokenizer import EOS_ID, load_tokenizer

    try:
        config, params, _ = load_model(source, dtype=dtype, remat="none")
    except (ConversionError, ConfigError) as err:
        raise GenerateError(str(err)) from err
    tokenizer_source = tokenizer or find_tokenizer(source)
    if tokenizer_source is None:
        raise GenerateError(f"{source} carries no tokenizer.json: pass --tokenizer")
    loaded = load_tokenizer(tokenizer_source)
    if len(loaded) > config.vocab_size:
        raise GenerateError(f"tokenizer {tokenizer_source} has {len(loaded)} ids, the model {config.vocab_size} rows")
    return Generator(model_from_params(config, params), loaded, EOS_ID)


def _encode(generator: Generator, prompt: str) -> list[int]:
    ids = generator.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GenerateError("empty prompt")
    return ids


def stream_complete(generator: Generator, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
    """Yield the completion's text piece by piece, as tokens are decoded."""
    graphdef, state = nnx.split(generator.model)

    @jax.jit
    def prefill(state, ids):
        return nnx.merge(graphdef, state).prefill(ids, last_logits_only=True)

    @jax.jit
    def step(state, token, cache, rng):
        logits, cache = nnx.merge(graphdef, state).step(token, cache)
        return sample_next_token(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p), cache

    logits, cache = prefill(state, np.asarray([_encode(generator, prompt)], np.int32))
    rng = jax.random.PRNGKey(seed)
    rng, first = jax.random.split(rng)
    token = sample_next_token(logits[:, -1], first, temperature=temperature, top_k=top_k, top_p=top_p)
    produced, emitted = [], ""
    for _ in range(max_new_tokens):
        value = int(token[0])
        if value == generator.eos_token_id:
            break
        produced.append(value)
        text = generator.tokenizer.decode(produced)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            yield text[len(emitted):]
            emitted = text
        rng, key = jax.random.split(rng)
        token, cache = step(state, token, cache, key)


def batch_complete(generator: Generator, prompts: Sequence[str], *, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    if not prompts:
        raise GenerateError("no prompts")
    ids, mask = left_pad([_encode(generator, p) for p in prompts], generator.eos_token_id)
    out = generate(generator.model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, eos_token_id=generator.eos_token_id,
                   pad_token_id=generator.eos_token_id, rng=jax.random.PRNGKey(seed))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    completions = []
    for row in range(len(prompts)):
        new = [t for t in tokens[row, :lengths[row]].tolist() if t != generator.eos_token_id]
        completions.append(generator.tokenizer.decode(new))
    return completions
