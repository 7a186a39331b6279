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

Implementations are registered by name in `SCAN_IMPLS` and all take the same normalised
arguments, so faster kernels drop in without touching the model. An impl string may set
an impl's options, e.g. ``"pallas:block_e=32:chunk=8"`` or ``"chunked:chunk=64"``:

- ``reference``: a sequential `lax.scan` over time; the numerical ground truth.
- ``associative``: `jax.lax.associative_scan` over time; parallel in L, but it
  materialises (B, L, E, N) fp32 tensors, so it is memory-bound on accelerators.

Masked positions (mask == 0) get delta = 0 and u = 0, so exp(0 * A) = 1 and the input
term vanishes: the state passes through unchanged. That is what makes a left-padded row
equal to the same row without padding.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "selective_scan",
    "selective_state_update",
    "register_scan_impl",
    "resolve_scan_impl",
    "parse_scan_impl",
    "SCAN_IMPLS",
    "FUSED_SCAN_IMPLS",
    "SCAN_RESIDUAL_NAMES",
]

# Names under which an impl tags what its backward needs from the forward (its output and
# its chunk-start states), with `jax.ad_checkpoint.checkpoint_name`. A remat policy that
# saves these names (MambaConfig.remat="scan") recomputes the rest of a layer in the
# backward pass but not the scan kernel. Impls without such residuals (reference,
# associative, chunked) tag nothing, and the policy then recomputes them as "full" does.
SCAN_RESIDUAL_NAMES = ("selective_scan_output", "selective_scan_states")


def _prepare_delta(delta, delta_bias, delta_softplus, mask):
    """delta in fp32 with its bias and softplus applied, zeroed where masked."""
    delta = delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    if mask is not None:
        delta = delta * mask[..., None].astype(jnp.float32)
    return delta


def _finish_output(y, u, D, z, out_dtype):
    """Skip connection and SiLU gate, computed in fp32 and cast once at the end."""
    if D is not None:
        y = y + u * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(out_dtype)


def _reference_scan(u, delta, A, B, C, initial_state):
    """Sequential scan over time. u, delta fp32 (B, L, E); B, C fp32 (B, L, N)."""
    batch, _, channels = u.shape
    state0 = (
        jnp.zeros((batch, channels, A.shape[-1]), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )

    def step(state, inputs):
        u_t, delta_t, B_t, C_t = inputs  # (B, E), (B, E), (B, N), (B, N)
        decay = jnp.exp(delta_t[..., None] * A)  # (B, E, N)
        state = decay * state + (delta_t * u_t)[..., None] * B_t[:, None, :]
        y_t = jnp.einsum("ben,bn->be", state, C_t)
        return state, y_t

    time_major = [jnp.swapaxes(t, 0, 1) for t in (u, delta, B, C)]
    final_state, y = jax.lax.scan(step, state0, time_major)
    return jnp.swapaxes(y, 0, 1), final_state


def _associative_scan(u, delta, A, B, C, initial_state):
    """Parallel prefix scan over time with the affine-map composition operator."""
    decay = jnp.exp(delta[..., None] * A)  # (B, L, E, N)
    drive = (delta * u)[..., None] * B[:, :, None, :]  # (B, L, E, N)
    if initial_state is not None:
        # Folding h0 into the first input makes every prefix start from h0.
        drive = drive.at[:, 0].add(decay[:, 0] * initial_state.astype(jnp.float32))

    def compose(earlier, later):
        decay_a, drive_a = earlier
        decay_b, drive_b = later
        return decay_b * decay_a, decay_b * drive_a + drive_b

    _, states = jax.lax.associative_scan(compose, (decay, drive), axis=1)
    y = jnp.einsum("blen,bln->ble", states, C)
    return y, states[:, -1]


ScanImpl = Callable[..., tuple]
SCAN_IMPLS: dict[str, ScanImpl] = {
    "reference": _reference_scan,
    "associative": _associative_scan,
}
# Impls that also take selective_scan's own arguments (bias, softplus, D, gate, mask) and
# do that work themselves, in the inputs' dtype, instead of on fp32 copies in XLA.
FUSED_SCAN_IMPLS: dict[str, Callable[..., tuple]] = {}
# Keyword options each impl accepts in an impl string such as "pallas:block_e=32".
SCAN_IMPL_OPTIONS: dict[str, tuple[str, ...]] = {"reference": (), "associative": ()}
# Which registered impl `impl="auto"` picks per backend platform; later kernels update it.
AUTO_IMPL_BY_PLATFORM: dict[str, str] = {}


def register_scan_impl(name: str, fn: ScanImpl, *, auto_for: tuple[str, ...] = (),
                       options: tuple[str, ...] = (), fused: Optional[Callable[..., tuple]] = None) -> None:
    """Add a scan implementation taking (u, delta, A, B, C, initial_state) in fp32.

    `auto_for` lists backend platforms ("gpu", "tpu", "cpu") where `impl="auto"` picks it.
    `options` names the keyword arguments an impl string may set ("name:key=value:...").
    `fused`, if given, takes `selective_scan`'s arguments (u, delta, A, B, C, D, z,
    delta_bias, delta_softplus, initial_state, mask) in their own dtypes and returns
    (y in u's dtype, fp32 final state); `selective_scan` then calls it instead of `fn`.
    """
    SCAN_IMPLS[name] = fn
    SCAN_IMPL_OPTIONS[name] = tuple(options)
    if fused is not None:
        FUSED_SCAN_IMPLS[name] = fused
    for platform in auto_for:
        AUTO_IMPL_BY_PLATFORM[platform] = name


def _option_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def parse_scan_impl(impl: str) -> tuple[str, dict]:
    """"pallas:block_e=32:chunk=8" -> ("pallas", {"block_e": 32, "chunk": 8}); "auto"
    becomes the preferred impl of the default backend. Unknown names and options fail here,
    naming the valid ones."""
    name, *pairs = impl.split(":")
    if name == "auto":
        name = AUTO_IMPL_BY_PLATFORM.get(jax.default_backend(), "associative")
    if name not in SCAN_IMPLS:
        raise ValueError(
            f"unknown selective-scan impl {name!r}; choose one of {sorted(SCAN_IMPLS) + ['auto']}"
        )
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SCAN_IMPL_OPTIONS[name]:
            raise ValueError(
                f"bad option {pair!r} in selective-scan impl {impl!r}; {name!r} takes "
                f"key=value options from {list(SCAN_IMPL_OPTIONS[name])}"
            )
        options[key] = _option_value(value)
    return name, options


def resolve_scan_impl(impl: str) -> str:
    """The registered impl name an impl string runs ("auto" resolved, options dropped)."""
    return parse_scan_impl(impl)[0]


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
    impl: str = "associative",
):
    """Run the selective scan; returns y (B, L, E) in u's dtype, plus the fp32 final
    state (B, E, N) when `return_final_state`. Works under jit, grad and vmap."""
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
    name, options = parse_scan_impl(impl)
    if name in FUSED_SCAN_IMPLS:
        y, final_state = FUSED_SCAN_IMPLS[name](
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, mask, **options
        )
        return (y, final_state) if return_final_state else y
    scan_fn = functools.partial(SCAN_IMPLS[name], **options)

    out_dtype = u.dtype
    delta = _prepare_delta(delta, delta_bias, delta_softplus, mask)
    u = u.astype(jnp.float32)
    if mask is not None:
        u = u * mask[..., None].astype(jnp.float32)
    A = A.astype(jnp.float32)
    y, final_state = scan_fn(
        u, delta, A, B.astype(jnp.float32), C.astype(jnp.float32), initial_state
    )
    y = _finish_output(y, u, D, z, out_dtype)
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
    delta = _prepare_delta(delta, delta_bias, delta_softplus, None)
    u32 = u.astype(jnp.float32)
    decay = jnp.exp(delta[..., None] * A.astype(jnp.float32))
    state = decay * state + (delta * u32)[..., None] * B.astype(jnp.float32)[:, None, :]
    y = jnp.einsum("ben,bn->be", state, C.astype(jnp.float32))
    return _finish_output(y, u32, D, z, u.dtype), state


# Faster impls live in their own modules and register themselves on import.
from biomamba_jax import scan_chunked, scan_pallas  # noqa: E402,F401  (register "chunked", "pallas")
