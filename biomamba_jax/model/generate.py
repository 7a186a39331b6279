"""Autoregressive decoding with the recurrent cache: one jitted program per settings.

The prompt runs once through the parallel `prefill`; every new token is one `step`. The
whole token loop is a `lax.while_loop` inside a single `jax.jit`, so decoding compiles
once for a given (batch, prompt length, max_new_tokens, sampling settings) and never
retraces per token.

Prompts of different lengths are left-padded (see `left_pad`): with the attention mask,
padding leaves the state untouched, so every row ends its prompt at the last column.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from biomamba_jax.model.mamba import MambaLM

__all__ = ["generate", "GenerationOutput", "sample_next_token", "left_pad", "matmul_weights_in_compute_dtype"]


class GenerationOutput(NamedTuple):
    tokens: jax.Array  # (B, max_new_tokens) new tokens; pad_token_id after EOS
    lengths: jax.Array  # (B,) new tokens per row, EOS included


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (input_ids, attention_mask), both (B, longest), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def sample_next_token(logits, rng, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 are off."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth_best = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_best, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass
        # before it is still below top_p (so the most likely token always stays).
        kept = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def matmul_weights_in_compute_dtype(state, dtype):
    """The model state with every Linear/Conv kernel cast to `dtype` ahead of time.

    A decode step casts each fp32 kernel to the compute dtype before its matmul, and for
    one token that cast moves more bytes than the matmul itself; casting once before the
    token loop gives bit-identical steps. Norms, A_log, D, biases and the embedding table
    (whose lookup feeds the fp32 residual stream) are left alone.
    """
    def cast(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return leaf.astype(dtype) if "kernel" in names else leaf

    return jax.tree_util.tree_map_with_path(cast, state)


def decode_model(graphdef, state, dtype):
    """(model, weights) for a token loop: kernels cast to `dtype` and the per-layer weights
    prepared once (`MambaLM.decode_weights`), so no step recasts or re-slices them. The
    prefill keeps the fp32 kernels: its conv runs in fp32 and must match model(...)."""
    model = nnx.merge(graphdef, matmul_weights_in_compute_dtype(state, dtype))
    return model, model.decode_weights()


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                     "eos_token_id", "pad_token_id", "unroll_layers"),
)
def _generate_jit(graphdef, state, input_ids, attention_mask, rng, *, max_new_tokens,
                  temperature, top_k, top_p, eos_token_id, pad_token_id, unroll_layers):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(input_ids, attention_mask, last_logits_only=True)
    step_model, weights = decode_model(graphdef, state, jnp.dtype(model.config.dtype))
    batch = input_ids.shape[0]
    tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)
    finished = jnp.zeros((batch,), bool)
    lengths = jnp.zeros((batch,), jnp.int32)

    def keep_going(carry):
        index, _, _, _, finished, _, _ = carry
        return (index < max_new_tokens) & ~jnp.all(finished)

    def decode_one(carry):
        index, cache, next_logits, tokens, finished, lengths, rng = carry
        rng, sample_rng = jax.random.split(rng)
        token = sample_next_token(next_logits, sample_rng, temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(finished, pad_token_id, token)
        tokens = tokens.at[:, index].set(token)
        lengths = lengths + (~finished).astype(jnp.int32)
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        next_logits, cache = step_model.step(token, cache, unroll_layers=unroll_layers, weights=weights)
        return index + 1, cache, next_logits, tokens, finished, lengths, rng

    # Each layer's state as its own loop buffer, rewritten in place by that layer's step.
    carry = (jnp.int32(0), cache.per_layer(), logits[:, -1], tokens, finished, lengths, rng)
    _, _, _, tokens, _, lengths, _ = jax.lax.while_loop(keep_going, decode_one, carry)
    return tokens, lengths


def generate(
    model: MambaLM,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = 0,
    pad_token_id: int = 0,
    rng=None,
    unroll_layers: bool = True,
) -> GenerationOutput:
    """Decode up to `max_new_tokens` after each (left-padded) prompt row.

    Greedy when `temperature == 0`; otherwise temperature sampling with optional top-k
    and nucleus (top-p) filtering. A row stops at `eos_token_id` (None disables it) and
    is padded with `pad_token_id` afterwards; the loop ends when every row has stopped.
    `unroll_layers=False` keeps a `lax.scan` over layers in each step (a smaller program
    for very deep models; see `MambaLM.step`).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    if rng is None:
        rng = jax.random.PRNGKey(0)
    graphdef, state = nnx.split(model)
    tokens, lengths = _generate_jit(
        graphdef, state, input_ids, jnp.asarray(attention_mask), rng,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p), eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        unroll_layers=bool(unroll_layers),
    )
    return GenerationOutput(tokens, lengths)
