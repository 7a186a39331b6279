"""Chunk-size edge cases of the `chunked` and `pallas` scans (Pallas in interpret mode on CPU)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biomamba_jax.scan import AUTO_IMPL_BY_PLATFORM, SCAN_IMPLS, _reference_scan
from biomamba_jax.scan_chunked import chunked_scan
from biomamba_jax.scan_pallas import PallasScanConfig, pallas_scan


def inputs(seed, batch, length, channels, d_state):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    return (
        jax.random.normal(k[0], (batch, length, channels)),
        jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels)) - 1.0),
        -jnp.exp(jax.random.normal(k[2], (channels, d_state)) * 0.5),
        jax.random.normal(k[3], (batch, length, d_state)),
        jax.random.normal(k[4], (batch, length, d_state)),
        jax.random.normal(k[5], (batch, channels, d_state)),
    )


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_matches_reference(fn, x, grads=True):
    y_ref, final_ref = _reference_scan(*x)
    y, final = jax.jit(fn)(*x)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(final, final_ref) < 1e-5
    if grads:
        w = jax.random.normal(jax.random.PRNGKey(9), y_ref.shape)

        def loss(scan):
            return lambda *a: jnp.sum(scan(*a)[0] * w) + jnp.sum(scan(*a)[1] ** 2)

        g_ref = jax.grad(loss(_reference_scan), argnums=tuple(range(6)))(*x)
        g = jax.jit(jax.grad(loss(fn), argnums=tuple(range(6))))(*x)
        for name, a, b in zip(("u", "delta", "A", "B", "C", "h0"), g, g_ref):
            assert rel_err(a, b) < 1e-5, name


def test_impls_registered_and_auto_choices():
    assert {"chunked", "pallas"} <= set(SCAN_IMPLS)
    assert AUTO_IMPL_BY_PLATFORM["cpu"] == "chunked"
    assert AUTO_IMPL_BY_PLATFORM["tpu"] == "chunked"
    assert AUTO_IMPL_BY_PLATFORM["gpu"] == "pallas"


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
def test_chunked_any_chunk_size_values(chunk):
    """Chunk 1, a divisor, a non-divisor (padding) and chunk > L (one chunk)."""
    x = inputs(chunk, 2, 20, 5, 3)
    assert_matches_reference(functools.partial(chunked_scan, chunk=chunk), x, grads=False)


@pytest.mark.parametrize("inner", [pytest.param("associative", marks=pytest.mark.slow), "sequential"])
def test_chunked_grads_with_padding(inner):
    x = inputs(1, 2, 19, 6, 4)
    assert_matches_reference(functools.partial(chunked_scan, chunk=8, inner=inner), x)


def test_chunked_without_initial_state():
    x = inputs(3, 1, 10, 3, 2)[:5] + (None,)
    y, final = chunked_scan(*x, chunk=4)
    y_ref, final_ref = _reference_scan(*x)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5


def test_chunked_rejects_unknown_inner():
    with pytest.raises(ValueError, match="inner must be"):
        chunked_scan(*inputs(0, 1, 4, 2, 2), inner="magic")


@pytest.mark.parametrize(
    "shape,config",
    [
        ((1, 13, 16, 16), PallasScanConfig(chunk=4, block_e=16)),  # L not a multiple of the chunk
        ((2, 8, 5, 3), PallasScanConfig(chunk=8, block_e=4)),  # odd channels, N not a power of 2
        ((1, 3, 2, 2), PallasScanConfig(chunk=16, block_e=32)),  # chunk and block larger than L, E
    ],
)
def test_pallas_interpret_values_and_grads(shape, config):
    assert_matches_reference(functools.partial(pallas_scan, config=config), inputs(sum(shape), *shape))


def test_pallas_picks_interpret_off_gpu():
    from biomamba_jax.scan_pallas import _interpret

    assert _interpret(PallasScanConfig()) == (jax.default_backend() != "gpu")
    assert _interpret(PallasScanConfig(interpret=True)) is True


@pytest.mark.slow
def test_pallas_longer_sequence_many_chunks():
    x = inputs(4, 2, 200, 40, 16)
    assert_matches_reference(functools.partial(pallas_scan, config=PallasScanConfig(chunk=8, block_e=16)), x)
