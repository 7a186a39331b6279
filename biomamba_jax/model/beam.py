"""Beam search over the recurrent cache: one jitted `lax.while_loop`, no per-token retrace.

Every prompt row keeps `num_beams` hypotheses. Each step scores all continuations of
every live beam by total log-probability (no length normalisation), keeps the best
`num_beams`, reorders the cache rows to follow their parents, and runs one `model.step`.
A beam ends at EOS or at any token marked in `stop_mask` (e.g. tokens holding a newline);
an ended beam only continues with `pad_token_id` at no cost, so it keeps its score and
competes with the live ones. The result is sorted best first. With `num_beams=1` it is
greedy decoding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from biomamba_jax.model.generate import decode_model
from biomamba_jax.model.mamba import MambaLM

__all__ = ["beam_search", "BeamOutput", "newline_token_mask"]


class BeamOutput(NamedTuple):
    tokens: jax.Array  # (B, num_beams, max_new_tokens); pad_token_id after a beam ends
    scores: jax.Array  # (B, num_beams) total log-probability, descending
    lengths: jax.Array  # (B, num_beams) new tokens per beam, its final stop token included


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "max_new_tokens", "pad_token_id"))
def _beam_search_jit(graphdef, state, input_ids, attention_mask, stop_mask, *, num_beams,
                     max_new_tokens, pad_token_id):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(input_ids, attention_mask, last_logits_only=True)
    step_model, weights = decode_model(graphdef, state, jnp.dtype(model.config.dtype))
    batch, beams = input_ids.shape[0], num_beams
    vocab = logits.shape[-1]
    # Beam b of row r is cache row r * beams + b. Only beam 0 is live at the start, so the
    # first expansion picks the best `beams` first tokens of the one prompt.
    cache = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=1), cache)  # (Y, B*K, ...)
    next_logits = jnp.repeat(logits[:, -1], beams, axis=0)  # (B*K, V)
    scores = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf), (batch, 1))
    tokens = jnp.full((batch, beams, max_new_tokens), pad_token_id, jnp.int32)
    finished = jnp.zeros((batch, beams), bool)
    lengths = jnp.zeros((batch, beams), jnp.int32)
    pad_only = jnp.where(jnp.arange(vocab) == pad_token_id, 0.0, -jnp.inf)
    row_offset = (jnp.arange(batch) * beams)[:, None]

    def keep_going(carry):
        index, finished = carry[0], carry[5]
        return (index < max_new_tokens) & ~jnp.all(finished)

    def expand(carry):
        index, cache, next_logits, tokens, scores, finished, lengths = carry
        log_probs = jax.nn.log_softmax(next_logits.astype(jnp.float32), axis=-1).reshape(batch, beams, vocab)
        log_probs = jnp.where(finished[..., None], pad_only, log_probs)
        candidates = (scores[..., None] + log_probs).reshape(batch, beams * vocab)
        scores, flat = jax.lax.top_k(candidates, beams)  # (B, K), sorted descending
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, index].set(token)
        was_finished = jnp.take_along_axis(finished, parent, axis=1)
        lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~was_finished).astype(jnp.int32)
        finished = was_finished | stop_mask[token]
        rows = (parent + row_offset).reshape(-1)
        cache = jax.tree.map(lambda x: x[:, rows], cache)
        next_logits, cache = step_model.step(token.reshape(-1), cache, weights=weights)
        return index + 1, cache, next_logits, tokens, scores, finished, lengths

    carry = (jnp.int32(0), cache, next_logits, tokens, scores, finished, lengths)
    _, _, _, tokens, scores, _, lengths = jax.lax.while_loop(keep_going, expand, carry)
    return tokens, scores, lengths


def beam_search(
    model: MambaLM,
    input_ids,
    attention_mask=None,
    *,
    num_beams: int = 5,
    max_new_tokens: int = 32,
    eos_token_id: Optional[int] = 0,
    pad_token_id: int = 0,
    stop_mask=None,
) -> BeamOutput:
    """The `num_beams` best continuations of each (left-padded) prompt row, best first.

    `stop_mask` (V,) bool marks tokens that end a beam besides `eos_token_id`.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    vocab = model.config.vocab_size
    if not 1 <= num_beams <= vocab or max_new_tokens < 1:
        raise ValueError(f"need 1 <= num_beams <= vocab and max_new_tokens >= 1 (got {num_beams}, {max_new_tokens})")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    stops = np.zeros((vocab,), bool) if stop_mask is None else np.asarray(stop_mask, bool).copy()
    if stops.shape != (vocab,):
        raise ValueError(f"stop_mask must have shape ({vocab},), got {stops.shape}")
    if eos_token_id is not None:
        stops[eos_token_id] = True
    graphdef, state = nnx.split(model)
    tokens, scores, lengths = _beam_search_jit(
        graphdef, state, input_ids, jnp.asarray(attention_mask), jnp.asarray(stops),
        num_beams=int(num_beams), max_new_tokens=int(max_new_tokens), pad_token_id=int(pad_token_id),
    )
    return BeamOutput(tokens, scores, lengths)


def newline_token_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """(V,) bool: the tokens whose text holds a newline (byte-level BPE writes it as 'Ċ')."""
    mask = np.zeros((vocab_size,), bool)
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size and ("Ċ" in token or "\n" in token):
            mask[index] = True
    return mask
