"""The Mamba-1 selective scan (S6) as pure functions behind one signature.

`selective_scan` mirrors mamba_ssm's `selective_scan_fn` argument for argument, but in
JAX's natural channel-last layout:

    u, delta, z      (B, L, E)      E = d_inner channels
    A                (E, N)         N = d_state
    B, C             (B, L, N)      input-dependent ("selective") projections
    D, delta_bias    (E,)
    initial_state    (B, E, N)      always fp32, as is the returned final state
    mask             (B, L)         1 = real token, 0 = padding

The recurrence, per channel e and state n (zero-order hold for A, Euler for B):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <h_t, C_t> + D * u_t,      then  y_t *= silu(z_t)

Implementations are listed by name in `SCAN_IMPLS` and all take the same normalised
arguments, so faster kernels drop in without touching the model. An impl string may set
an impl's options (`scan_options`), e.g. ``"pallas:fuse=delta"`` or ``"chunked:chunk=64"``:

- ``reference``: a sequential `lax.scan` over time; the numerical ground truth.
- ``associative``: `jax.lax.associative_scan` over time; parallel in L, but it
  materialises (B, L, E, N) fp32 tensors, so it is memory-bound on accelerators.
- ``chunked`` (`scan_chunked`): the portable XLA path for CPU, TPU and older GPUs.
- ``pallas`` (`scan_pallas`): fused GPU kernels, which also take the bias, softplus,
  D skip and gate.
- ``mosaic`` (`scan_mosaic`): the same fusion as Pallas Mosaic GPU kernels, for Hopper
  GPUs (compute capability 9.x), with document resets inside the kernels.
- ``auto``: ``mosaic`` on Hopper GPUs (d_state up to 16), ``pallas`` on other GPUs,
  ``chunked`` elsewhere.

Masked positions (mask == 0) get delta = 0 and u = 0, so exp(0 * A) = 1 and the input
term vanishes: the state passes through unchanged. That is what makes a left-padded row
equal to the same row without padding.

Document resets (`resets` (B, L), True at the first token of a new document, as in a row
of packed documents): the decay of that step is 0, so the state entering it is dropped,
h_t = delta_t * B_t * u_t, and nothing before it reaches the document, in values or
gradients. At position 0 a reset means the initial state is ignored. Every impl takes
`resets=` (None: none, and the code that runs is the code without the feature).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from biomamba_jax.model.scan_chunked import chunked_scan
from biomamba_jax.model.scan_math import (SCAN_RESIDUAL_NAMES, compose_affine, finish_output, prepare_delta, start_state,
                                          step_decay)
from biomamba_jax.model.scan_mosaic import mosaic_selective_scan
from biomamba_jax.model.scan_mosaic import unsupported_reason as mosaic_unsupported_reason
from biomamba_jax.model.scan_options import DEFAULT_SCAN_IMPL, ScanImpl, parse_scan_impl
from biomamba_jax.model.scan_pallas import pallas_scan, pallas_selective_scan

Array = jax.Array

__all__ = [
    "selective_scan",
    "selective_state_update",
    "reference_scan",
    "associative_scan",
    "resolve_scan_impl",
    "parse_scan_impl",
    "SCAN_IMPLS",
    "SCAN_RESIDUAL_NAMES",
]


def reference_scan(u, delta, A, B, C, initial_state, *, resets=None):
    """Sequential scan over time. u, delta fp32 (B, L, E); B, C fp32 (B, L, N); resets
    bool (B, L) or None."""
    batch, _, channels = u.shape
    state0 = start_state(initial_state, batch, channels, A.shape[-1])

    def step(state, inputs):
        u_t, delta_t, B_t, C_t, *reset_t = inputs  # (B, E), (B, E), (B, N), (B, N), [(B,)]
        decay = step_decay(delta_t, A, *reset_t)  # (B, E, N)
        state = decay * state + (delta_t * u_t)[..., None] * B_t[:, None, :]
        y_t = jnp.einsum("ben,bn->be", state, C_t)
        return state, y_t

    per_step = (u, delta, B, C) if resets is None else (u, delta, B, C, resets)
    time_major = [jnp.swapaxes(t, 0, 1) for t in per_step]
    final_state, y = jax.lax.scan(step, state0, time_major)
    return jnp.swapaxes(y, 0, 1), final_state


def associative_scan(u, delta, A, B, C, initial_state, *, resets=None):
    """Parallel prefix scan over time with the affine-map composition operator."""
    decay = step_decay(delta, A, resets)  # (B, L, E, N)
    drive = (delta * u)[..., None] * B[:, :, None, :]  # (B, L, E, N)
    if initial_state is not None:
        # Folding h0 into the first input makes every prefix start from h0.
        drive = drive.at[:, 0].add(decay[:, 0] * initial_state.astype(jnp.float32))
    _, states = jax.lax.associative_scan(compose_affine, (decay, drive), axis=1)
    y = jnp.einsum("blen,bln->ble", states, C)
    return y, states[:, -1]


# The recurrence alone: (u, delta, A, B, C, initial_state) in fp32, delta with its bias and
# softplus applied, and the keyword resets (bool (B, L) or None), returning y without D
# and gate, and the fp32 final state.
SCAN_IMPLS: dict[str, Callable[..., tuple]] = {
    "reference": reference_scan,
    "associative": associative_scan,
    "chunked": chunked_scan,
    "pallas": pallas_scan,
}
# Impls that take `selective_scan`'s own arguments (bias, softplus, D, gate, mask, resets) in their
# own dtypes and do that work themselves, instead of on fp32 copies made by XLA.
# "mosaic" runs on Hopper GPUs only, so it is not among the impls every platform runs.
FUSED_SCAN_IMPLS: dict[str, Callable[..., tuple]] = {"pallas": pallas_selective_scan,
                                                     "mosaic": mosaic_selective_scan}


def resolve_scan_impl(impl: Union[str, ScanImpl], d_state: Optional[int] = None) -> ScanImpl:
    """The implementation an impl string runs on the default device, for states of `d_state`
    (None: any the kernels take): "auto" resolved, every option spelt out (`str()` of the
    result is what a run plan prints)."""
    return parse_scan_impl(impl).resolve(_auto_platform(d_state))


def _auto_platform(d_state: Optional[int]) -> str:
    """The key of AUTO_IMPL for the default device: Hopper GPUs apart, where the Mosaic
    kernels run (when they take this d_state)."""
    platform = jax.default_backend()
    if platform == "gpu" and _on_hopper() and (d_state is None or mosaic_unsupported_reason(d_state) is None):
        return "gpu-hopper"
    return platform


def _on_hopper() -> bool:
    # Compute capability 9.x only: the Mosaic kernels also compile for newer GPUs, but they
    # were tested and measured on Hopper, so "auto" does not pick them elsewhere.
    return str(getattr(jax.devices()[0], "compute_capability", "") or "").startswith("9")


def selective_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Optional[Array] = None,
    z: Optional[Array] = None,
    delta_bias: Optional[Array] = None,
    delta_softplus: bool = False,
    initial_state: Optional[Array] = None,
    return_final_state: bool = False,
    *,
    mask: Optional[Array] = None,
    resets: Optional[Array] = None,
    impl: Union[str, ScanImpl] = DEFAULT_SCAN_IMPL,
):
    """Run the selective scan; returns y (B, L, E) in u's dtype, plus the fp32 final
    state (B, E, N) when `return_final_state`. Works under jit, grad and vmap.

    `resets` (B, L), bool or 0/1: True at the first token of a new document, where the
    state restarts from zero (see the module docstring)."""
    batch, length, channels = u.shape
    if A.shape[0] != channels:
        raise ValueError(f"A has shape {A.shape} but u has {channels} channels (B, L, E)")
    if B.shape[:2] != (batch, length) or C.shape[:2] != (batch, length):
        raise ValueError(
            f"B {B.shape} and C {C.shape} must be (batch, length, d_state) = "
            f"({batch}, {length}, {A.shape[-1]})"
        )
    if delta.shape != u.shape:
        raise ValueError(f"delta {delta.shape} must match u {u.shape}")
    if resets is not None:
        resets = jnp.asarray(resets)
        if resets.shape != (batch, length):
            raise ValueError(f"resets {resets.shape} must be (batch, length) = ({batch}, {length})")
        resets = resets.astype(bool)
    scan = resolve_scan_impl(impl, A.shape[-1])
    options = vars(scan.options)
    if scan.name in FUSED_SCAN_IMPLS:
        y, final_state = FUSED_SCAN_IMPLS[scan.name](
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, mask, resets=resets, **options
        )
        return (y, final_state) if return_final_state else y

    out_dtype = u.dtype
    delta = prepare_delta(delta, delta_bias, delta_softplus, mask)
    u = u.astype(jnp.float32)
    if mask is not None:
        u = u * mask[..., None].astype(jnp.float32)
    y, final_state = SCAN_IMPLS[scan.name](
        u, delta, A.astype(jnp.float32), B.astype(jnp.float32), C.astype(jnp.float32), initial_state,
        resets=resets, **options,
    )
    y = finish_output(y, u, D, z, out_dtype)
    return (y, final_state) if return_final_state else y


def selective_state_update(
    state: Array,
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Optional[Array] = None,
    z: Optional[Array] = None,
    delta_bias: Optional[Array] = None,
    delta_softplus: bool = False,
):
    """One recurrent step for decoding (mamba_ssm's `selective_state_update`).

    state (B, E, N) fp32; u, delta, z (B, E); B, C (B, N). Returns (y (B, E), new state).
    """
    delta = prepare_delta(delta, delta_bias, delta_softplus, None)
    u32 = u.astype(jnp.float32)
    decay = jnp.exp(delta[..., None] * A.astype(jnp.float32))
    state = decay * state + (delta * u32)[..., None] * B.astype(jnp.float32)[:, None, :]
    y = jnp.einsum("ben,bn->be", state, C.astype(jnp.float32))
    return finish_output(y, u32, D, z, u.dtype), state
