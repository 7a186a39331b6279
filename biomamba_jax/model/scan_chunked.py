"""Chunked selective scan in plain XLA: portable to CPU, GPU and TPU.

A `lax.scan` over chunks of `chunk` time steps carries the fp32 state (B, E, N). Inside a
chunk the decay exp(delta * A) and the drive delta * u * B exist only for that chunk,
the recurrence runs as an associative (or sequential) scan over the chunk's T steps, and
the states are contracted with C before leaving the chunk. The chunk body is wrapped in
`jax.checkpoint`, so the backward pass keeps only one (B, E, N) state per chunk and
recomputes the chunk's (B, T, E, N) tensors: (B, L, E, N) never exists at once.

Lengths that are not a multiple of the chunk are padded with delta = 0 and u = 0, which
leaves the state unchanged (exp(0 * A) = 1, no input), then the padding is sliced off.
Document resets (padded with False) zero the decay of their step inside the chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from biomamba_jax.model.scan_math import compose_affine, start_state, step_decay

__all__ = ["chunked_scan", "pad_time", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 128


def pad_time(length: int, chunk: int, *arrays):
    """Pad axis 1 of each (B, L, ...) array with zeros up to a multiple of `chunk`.

    Zero delta and zero u make the padded steps state-preserving."""
    padded = -(-length // chunk) * chunk
    if padded == length:
        return arrays
    widths = lambda a: [(0, 0), (0, padded - length)] + [(0, 0)] * (a.ndim - 2)
    return tuple(jnp.pad(a, widths(a)) for a in arrays)


def _chunk_states(state, u, delta, A, B, inner, resets=None):
    """All T states of one chunk, (B, T, E, N), starting from `state` (B, E, N)."""
    decay = step_decay(delta, A, resets)  # (B, T, E, N)
    drive = (delta * u)[..., None] * B[:, :, None, :]  # (B, T, E, N)
    if inner == "associative":
        drive = drive.at[:, 0].add(decay[:, 0] * state)
        _, states = jax.lax.associative_scan(compose_affine, (decay, drive), axis=1)
        return states

    def step(h, inputs):
        decay_t, drive_t = inputs
        h = decay_t * h + drive_t
        return h, h

    _, states = jax.lax.scan(step, state, (jnp.swapaxes(decay, 0, 1), jnp.swapaxes(drive, 0, 1)))
    return jnp.swapaxes(states, 0, 1)


def chunked_scan(u, delta, A, B, C, initial_state, *, resets=None, chunk: int = DEFAULT_CHUNK,
                 inner: str = "associative"):
    """Selective scan over chunks of `chunk` steps; same contract as `scan.reference_scan`.

    u, delta (B, L, E) fp32; A (E, N); B, C (B, L, N); initial_state (B, E, N) or None;
    resets bool (B, L) or None. Returns y (B, L, E) without the D skip and gate, and the
    fp32 final state (B, E, N).
    """
    if inner not in ("associative", "sequential"):
        raise ValueError(f"inner must be 'associative' or 'sequential', got {inner!r}")
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    chunk = max(1, min(chunk, length))
    state0 = start_state(initial_state, batch, channels, d_state)
    per_step = (u, delta, B, C) if resets is None else (u, delta, B, C, resets)
    per_step = pad_time(length, chunk, *per_step)
    n_chunks = per_step[0].shape[1] // chunk

    def to_chunks(x):  # (B, nC*T, ...) -> (nC, B, T, ...)
        return jnp.swapaxes(x.reshape(batch, n_chunks, chunk, *x.shape[2:]), 0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def body(state, xs):
        u_c, delta_c, B_c, C_c, *resets_c = xs
        states = _chunk_states(state, u_c, delta_c, A, B_c, inner, *resets_c)
        y_c = jnp.einsum("bten,btn->bte", states, C_c)
        return states[:, -1], y_c

    final_state, y = jax.lax.scan(body, state0, tuple(map(to_chunks, per_step)))
    y = jnp.swapaxes(y, 0, 1).reshape(batch, n_chunks * chunk, channels)[:, :length]
    return y, final_state
