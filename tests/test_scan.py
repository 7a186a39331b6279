"""Every selective-scan impl against the sequential `reference`: values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biomamba_jax.benchmark import scan_inputs
from biomamba_jax.model.scan import SCAN_IMPLS, selective_scan, selective_state_update
from helpers import rel_err

FAST_IMPLS = [name for name in SCAN_IMPLS if name != "reference"]


def random_inputs(seed, batch, length, channels, d_state, dtype=jnp.float32):
    return scan_inputs(seed, batch, length, channels, d_state, dtype, initial_state=True)


def naive_numpy_scan(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """A float64 loop straight from the recurrence in DESIGN.md, independent of scan.py."""
    u, delta, A, B, C, D, z, bias, h = (np.asarray(t, np.float64) for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    delta = np.log1p(np.exp(delta + bias))
    ys = []
    for t in range(u.shape[1]):
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append(np.einsum("ben,bn->be", h, C[:, t]) + D * u[:, t])
    y = np.stack(ys, 1)
    return y * z / (1 + np.exp(-z)), h


def test_reference_matches_float64_loop():
    x = random_inputs(0, 2, 13, 5, 4)
    y, final = selective_scan(**x, delta_softplus=True, return_final_state=True, impl="reference")
    y_ref, final_ref = naive_numpy_scan(**x)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(final, final_ref) < 1e-5


def _impl_cases():
    # The associative scan's gradient is slow to compile on a CPU: its masked cases (a
    # superset of what the unmasked ones check) run by default, the rest under the slow marker.
    for impl in FAST_IMPLS:
        for shape in [(2, 17, 6, 4), (1, 33, 7, 16), (3, 5, 3, 2)]:
            for use_mask in (False, True):
                slow = impl == "associative" and not use_mask
                yield pytest.param(impl, shape, use_mask, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("impl,shape,use_mask", list(_impl_cases()))
def test_impl_matches_reference_values_and_grads(impl, shape, use_mask):
    x = random_inputs(sum(shape), *shape)
    mask = None
    if use_mask:
        mask = (jax.random.uniform(jax.random.PRNGKey(7), shape[:2]) > 0.3).astype(jnp.float32)

    def run(which, x):
        y, final = selective_scan(**x, delta_softplus=True, return_final_state=True, mask=mask, impl=which)
        return y, final

    y_ref, f_ref = run("reference", x)
    y, f = run(impl, x)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(f, f_ref) < 1e-5

    weights = jax.random.normal(jax.random.PRNGKey(3), y_ref.shape)

    def loss(x, which):
        y, final = run(which, x)
        return jnp.sum(y * weights) + jnp.sum(final**2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one program: op by op is slower on a CPU
    g_ref = grad(x, "reference")
    g = grad(x, impl)
    for name in x:
        assert rel_err(g[name], g_ref[name]) < 1e-5, name


@pytest.mark.parametrize("impl", [pytest.param(impl, marks=[pytest.mark.slow] if impl == "associative" else [])
                                  for impl in FAST_IMPLS])
def test_bf16_inputs_close_to_reference(impl):
    x = random_inputs(11, 2, 24, 8, 4, dtype=jnp.bfloat16)
    y_ref = selective_scan(**x, delta_softplus=True, impl="reference")
    y = selective_scan(**x, delta_softplus=True, impl=impl)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, y_ref) < 1e-2


@pytest.mark.parametrize("impl", list(SCAN_IMPLS))
def test_masked_positions_leave_state_unchanged(impl):
    """Left padding: a padded row equals the row without its padding."""
    x = random_inputs(5, 1, 12, 4, 3)
    x.pop("initial_state")
    pad = 5
    mask = jnp.concatenate([jnp.zeros((1, pad)), jnp.ones((1, 12 - pad))], axis=1)
    y_pad, f_pad = selective_scan(**x, delta_softplus=True, mask=mask, return_final_state=True, impl=impl)
    unpadded = {k: (v[:, pad:] if v.ndim == 3 and v.shape[1] == 12 else v) for k, v in x.items()}
    y, f = selective_scan(**unpadded, delta_softplus=True, return_final_state=True, impl=impl)
    assert rel_err(y_pad[:, pad:], y) < 1e-6
    assert rel_err(f_pad, f) < 1e-6


@pytest.mark.parametrize("impl", list(SCAN_IMPLS))
def test_jit_and_vmap(impl):
    x = random_inputs(2, 3, 9, 4, 2)
    jitted = jax.jit(lambda x: selective_scan(**x, delta_softplus=True, impl=impl))
    y = jitted(x)
    per_row = jax.vmap(
        lambda row: selective_scan(**{**row, "A": x["A"], "D": x["D"], "delta_bias": x["delta_bias"]},
                                   delta_softplus=True, impl=impl)[0],
    )({k: x[k][:, None] for k in ("u", "delta", "B", "C", "z", "initial_state")})
    assert rel_err(per_row, y) < 1e-6


def test_state_update_equals_one_scan_step():
    x = random_inputs(9, 2, 6, 5, 3)
    y, final = selective_scan(**x, delta_softplus=True, return_final_state=True, impl="reference")
    state = x["initial_state"]
    for t in range(6):
        y_t, state = selective_state_update(
            state, x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t], x["C"][:, t],
            x["D"], x["z"][:, t], x["delta_bias"], delta_softplus=True)
        assert rel_err(y_t, y[:, t]) < 1e-5
    assert rel_err(state, final) < 1e-5


def test_bad_shapes_and_impl_names_are_named():
    x = random_inputs(0, 2, 5, 4, 3)
    with pytest.raises(ValueError, match="unknown selective-scan impl 'fast'"):
        selective_scan(**x, impl="fast")
    with pytest.raises(ValueError, match="A has shape"):
        selective_scan(**{**x, "A": x["A"][:3]})
