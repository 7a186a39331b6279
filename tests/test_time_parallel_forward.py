"""The time-parallel forward experiment (benchmarks/time_parallel_forward.py): values
against the reference scan in interpret mode, and a lowering to Triton IR for CUDA."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biomamba_jax.scan import _reference_scan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:  # the experiment builds its Triton lowering from JAX internals, bound to a JAX version
    from time_parallel_forward import linear_scan, time_parallel_scan  # noqa: E402
except (ImportError, AttributeError) as error:
    pytest.skip(f"time-parallel experiment needs JAX internals this JAX lacks: {error}", allow_module_level=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_linear_scan_is_the_recurrence():
    a = jax.random.uniform(jax.random.PRNGKey(0), (9, 3))
    b = jax.random.normal(jax.random.PRNGKey(1), (9, 3))
    cum, h = linear_scan(a, b)
    expect, state = [], jnp.zeros(3)
    for t in range(9):
        state = a[t] * state + b[t]
        expect.append(state)
    assert rel_err(h, jnp.stack(expect)) < 1e-6
    assert rel_err(cum, jnp.cumprod(a, axis=0)) < 1e-6


@pytest.mark.parametrize("tile,block_e", [(4, 2), (8, 4)])
def test_matches_reference(tile, block_e):
    k = jax.random.split(jax.random.PRNGKey(2), 6)
    batch, length, channels, d_state = 2, 32, 8, 4
    u = jax.random.normal(k[0], (batch, length, channels))
    delta = jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels)))
    A = -jnp.exp(jax.random.normal(k[2], (channels, d_state)))
    B, C = (jax.random.normal(k[i], (batch, length, d_state)) for i in (3, 4))
    h0 = jax.random.normal(k[5], (batch, channels, d_state))
    y, h = jax.jit(lambda *x: time_parallel_scan(*x, block_e=block_e, tile=tile))(u, delta, A, B, C, h0)
    y_ref, h_ref = _reference_scan(u, delta, A, B, C, h0)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


def test_lowers_to_triton_ir_for_cuda():
    x = (jnp.ones((1, 128, 16)), jnp.ones((1, 128, 16)), -jnp.ones((16, 16)), jnp.ones((1, 128, 16)),
         jnp.ones((1, 128, 16)))
    fn = lambda *a: time_parallel_scan(*a, interpret=False)
    text = jax.jit(fn).trace(*x).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
