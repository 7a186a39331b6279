"""The time-parallel forward experiment (benchmarks/time_parallel_forward.py): values and
gradients against the reference scan in interpret mode, and a lowering to Triton IR for
CUDA. It is not part of the library; its GPU checks and timings are benchmarks/device_tp1.sh and
device_s5r2.sh."""
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biomamba_jax.scan import _reference_scan, selective_scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:  # the experiment builds its Triton lowering from JAX internals, bound to a JAX version
    from time_parallel_forward import linear_scan, time_parallel_scan  # noqa: E402
except (ImportError, AttributeError) as error:
    pytest.skip(f"time-parallel experiment needs JAX internals this JAX lacks: {error}", allow_module_level=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def inputs(seed, batch, length, channels, d_state):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    return (jax.random.normal(k[0], (batch, length, channels)),
            jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels))),
            -jnp.exp(jax.random.normal(k[2], (channels, d_state))),
            jax.random.normal(k[3], (batch, length, d_state)), jax.random.normal(k[4], (batch, length, d_state)),
            jax.random.normal(k[5], (batch, channels, d_state)))


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


@pytest.mark.parametrize("shape,options", [
    ((2, 32, 8, 4), dict(tile=8, tp_block_e=4)),  # one chunk per tile
    ((1, 70, 12, 4), dict(tile=16, tp_block_e=8)),  # L and E padded, two chunks per tile
    ((1, 96, 12, 4), dict(tile=32, min_programs=64, target_programs=64, min_segment_length=8)),  # backward in segments
    ((2, 32, 8, 4), dict(tile=8, tp_block_e=4, tp_per_state=True)),
    ((1, 70, 12, 4), dict(tile=16, tp_block_e=8, tp_per_state=True)),
    ((1, 96, 12, 4), dict(tile=32, tp_per_state=True, min_programs=64, target_programs=64, min_segment_length=8)),
])
def test_values_and_gradients_match_reference(shape, options):
    x = inputs(sum(shape), *shape)
    fn = functools.partial(time_parallel_scan, **options)
    y, final = jax.jit(fn)(*x)
    y_ref, final_ref = _reference_scan(*x)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5
    w = jax.random.normal(jax.random.PRNGKey(9), y_ref.shape)
    loss = lambda scan: lambda *a: jnp.sum(scan(*a)[0] * w) + jnp.sum(scan(*a)[1] ** 2)
    grads = jax.jit(jax.grad(loss(fn), argnums=tuple(range(6))))(*x)
    for name, g, g_ref in zip("u delta A B C h0".split(), grads, jax.grad(loss(_reference_scan), argnums=tuple(range(6)))(*x)):
        assert rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("impl", ["pallas_tp", "pallas_tp:tp_per_state=true"])
def test_selective_scan_impl_in_bf16(impl):
    """Registered as "pallas_tp": selective_scan as the model calls it, bf16 activations."""
    x = inputs(3, 2, 40, 8, 4)
    bf16 = lambda t: t.astype(jnp.bfloat16)
    args = (bf16(x[0]), bf16(x[1]), x[2], bf16(x[3]), bf16(x[4]))
    extras = dict(D=jnp.ones(8), z=bf16(x[0]), delta_bias=jnp.zeros(8), delta_softplus=True)
    loss = lambda impl: lambda u: jnp.sum(selective_scan(u, *args[1:], **extras, impl=impl).astype(jnp.float32) ** 2)
    value, grad = jax.value_and_grad(loss(impl))(args[0])
    ref_value, ref_grad = jax.value_and_grad(loss("reference"))(args[0])
    assert abs(float(value - ref_value)) < 2e-2 * abs(float(ref_value)) and rel_err(grad, ref_grad) < 2e-2


@pytest.mark.parametrize("per_state", [False, True])
def test_lowers_to_triton_ir_for_cuda(per_state):
    x = inputs(4, 1, 128, 16, 16)[:5]
    fn = lambda *a: time_parallel_scan(*a, interpret=False, tp_per_state=per_state)
    text = jax.jit(fn).trace(*x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1  # the forward alone
    grad = jax.grad(lambda *a: jnp.sum(fn(*a)[0] ** 2))
    text = jax.jit(grad).trace(*x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2  # the forward saving states, the library's backward
