"""Pieces every selective-scan implementation shares: the work around the recurrence
(bias, softplus, masking, D skip, gate), the step decay with its document resets, the
affine-map composition that makes the recurrence associative, and the fp32 start state.

Kept apart from `scan.py`, which picks an implementation, so that the implementations
import these without importing the dispatcher that imports them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["SCAN_RESIDUAL_NAMES", "prepare_delta", "finish_output", "step_decay", "compose_affine", "start_state"]

# Names under which an impl tags what its backward needs from the forward (its output and
# its chunk-start states), with `jax.ad_checkpoint.checkpoint_name`. A remat policy that
# saves these names (remat="scan") recomputes the rest of a layer in the backward pass but
# not the scan kernel. Impls without such residuals (reference, associative, chunked) tag
# nothing, and the policy then recomputes them as "full" does.
SCAN_RESIDUAL_NAMES = ("selective_scan_output", "selective_scan_states")


def prepare_delta(delta, delta_bias, delta_softplus, mask):
    """delta in fp32 with its bias and softplus applied, zeroed where masked."""
    delta = delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    if mask is not None:
        delta = delta * mask[..., None].astype(jnp.float32)
    return delta


def finish_output(y, u, D, z, out_dtype):
    """Skip connection and SiLU gate, computed in fp32 and cast once at the end."""
    if D is not None:
        y = y + u * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(out_dtype)


def step_decay(delta, A, resets=None):
    """exp(delta * A): (..., E, N) from delta (..., E) and A (E, N).

    `resets` (...) marks steps that start a new document: their decay is 0, so the state
    entering them is dropped (h_t = delta_t B_t u_t) and no gradient flows through it, to
    delta or A (`jnp.where` passes none to the branch it does not take)."""
    decay = jnp.exp(delta[..., None] * A)
    if resets is None:
        return decay
    return jnp.where(resets[..., None, None], 0.0, decay)


def compose_affine(earlier, later):
    """Compose the affine maps h -> decay * h + drive, `earlier` applied first.

    The recurrence h_t = decay_t * h_{t-1} + drive_t is a chain of such maps, and their
    composition is associative: the reason a prefix scan can run it in parallel."""
    decay_a, drive_a = earlier
    decay_b, drive_b = later
    return decay_b * decay_a, decay_b * drive_a + drive_b


def start_state(initial_state, batch: int, channels: int, d_state: int):
    """The fp32 (B, E, N) state a scan starts from: zeros when none is given."""
    if initial_state is None:
        return jnp.zeros((batch, channels, d_state), jnp.float32)
    return initial_state.astype(jnp.float32)
