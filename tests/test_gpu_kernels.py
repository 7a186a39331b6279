"""The compiled GPU kernels against the sequential `reference` scan: values and gradients.

Run on a GPU machine before any timing: `pytest -m gpu tests/test_gpu_kernels.py`. CI (a
CPU) does not select the `gpu` marker; the CPU suite checks the same kernels through the
Pallas interpreter (tests/test_scan_kernels.py), which cannot run the GPU's approximate
math instructions and so misses what only the compiled kernels do.
"""
import jax
import jax.numpy as jnp
import pytest

from biomamba_jax.benchmark import scan_inputs
from biomamba_jax.model.scan import selective_scan
from helpers import rel_err, scan_with_resets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with -m gpu on a GPU machine)"),
]
on_hopper = pytest.mark.skipif(
    jax.default_backend() != "gpu" or not str(getattr(jax.devices()[0], "compute_capability", "0")).startswith("9"),
    reason="impl mosaic needs a Hopper GPU")


def values_and_grads(impl, x, mask, resets=None):
    weights = jax.random.normal(jax.random.PRNGKey(1), x["u"].shape)

    def loss(x):
        y, final = selective_scan(**x, delta_softplus=True, return_final_state=True, mask=mask, resets=resets,
                                  impl=impl)
        return jnp.sum(y.astype(jnp.float32) * weights) + jnp.sum(final ** 2), (y, final)

    (_, (y, final)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    return y, final, grads


# Shapes: a full grid (no sequence segments), batch 1 with a long sequence (segments in
# the forward and the backward), and odd sizes that the kernels pad (channels not a
# multiple of a block, N not a power of two, L not a multiple of the chunk or segments).
SHAPES = [(4, 512, 256, 16), (1, 4096, 128, 16), (2, 77, 40, 5), (1, 2045, 64, 16)]
# Every option a preset or a default can pick, on a shape with segments and one without.
CASES = ([(shape, "pallas", mask) for shape in SHAPES for mask in (False, True)]
         + [(shape, "pallas:fuse=false", False) for shape in SHAPES]
         + [(shape, impl, False) for shape in SHAPES[:2]
            for impl in ("pallas:fuse=delta", "pallas:fuse=true", "pallas:approx_math=false")])


@pytest.mark.parametrize("shape,impl,use_mask", CASES)
def test_fp32_matches_reference(shape, impl, use_mask):
    x = scan_inputs(sum(shape), *shape, jnp.float32, initial_state=True)
    mask = (jax.random.uniform(jax.random.PRNGKey(7), shape[:2]) > 0.2).astype(jnp.float32) if use_mask else None
    y, final, grads = values_and_grads(impl, x, mask)
    y_ref, final_ref, grads_ref = values_and_grads("reference", x, mask)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


@pytest.mark.parametrize("shape,impl", [(shape, impl) for impl in ("pallas", "pallas:fuse=true") for shape in SHAPES[:2]]
                         + [pytest.param(SHAPES[0], "mosaic", marks=on_hopper)])
def test_bf16_activations_match_reference_on_the_same_inputs(shape, impl):
    """bf16 u, delta, z, B, C as in training: the kernels compute in fp32 like the reference,
    so the only differences are where each rounds its bf16 outputs and gradients."""
    x = scan_inputs(sum(shape), *shape, jnp.bfloat16, initial_state=True)
    y, final, grads = values_and_grads(impl, x, None)
    y_ref, final_ref, grads_ref = values_and_grads("reference", x, None)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(final, final_ref) < 1e-4
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype, name
        assert rel_err(grads[name], grads_ref[name]) < 2e-2, name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["pallas", "pallas:fuse=false", "pallas:fuse=true"])
def test_document_resets_match_reference(shape, impl):
    """Packed documents: resets at random (one step in 64), at position 0 of the first row
    (its initial state dropped), on a chunk edge followed by a one-token document (8, 9),
    and mid-sequence, a segment edge wherever the sequence is split."""
    batch, length = shape[:2]
    x = scan_inputs(sum(shape), *shape, jnp.float32, initial_state=True)
    resets = jax.random.uniform(jax.random.PRNGKey(3), (batch, length)) < 1 / 64
    resets = resets.at[0, 0].set(True).at[:, min(8, length - 1)].set(True).at[:, min(9, length - 1)].set(True)
    resets = resets.at[:, length // 2].set(True)
    y, final, grads = values_and_grads(impl, x, None, resets)
    y_ref, final_ref, grads_ref = values_and_grads("reference", x, None, resets)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


# The Mosaic GPU kernels (impl "mosaic", Hopper only): a full grid, a sequence that is not a
# whole number of tiles, channels that are not a multiple of the 128-channel block and an N
# the kernels pad (5 -> 8), with and without masks.
MOSAIC_CASES = [((4, 512, 256, 16), False), ((4, 512, 256, 16), True), ((2, 77, 40, 5), True),
                ((1, 2045, 64, 16), False)]


@on_hopper
@pytest.mark.parametrize("shape,use_mask", MOSAIC_CASES)
def test_mosaic_fp32_matches_reference(shape, use_mask):
    x = scan_inputs(sum(shape), *shape, jnp.float32, initial_state=True)
    mask = (jax.random.uniform(jax.random.PRNGKey(7), shape[:2]) > 0.2).astype(jnp.float32) if use_mask else None
    y, final, grads = values_and_grads("mosaic", x, mask)
    y_ref, final_ref, grads_ref = values_and_grads("reference", x, mask)
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


@on_hopper
def test_mosaic_without_softplus_masks_after_the_bias():
    """No softplus: masked and padded tokens need delta + bias = 0, so the bias is added
    before the kernels; delta stays small and positive so that the scan stays stable."""
    shape = (2, 77, 128, 8)
    x = scan_inputs(3, *shape, jnp.float32, initial_state=True)
    x["delta"] = jax.nn.softplus(x["delta"])
    mask = (jax.random.uniform(jax.random.PRNGKey(8), shape[:2]) > 0.3).astype(jnp.float32)
    weights = jax.random.normal(jax.random.PRNGKey(1), shape[:3])

    def run(impl, x):
        y, final = selective_scan(**x, delta_softplus=False, return_final_state=True, mask=mask, impl=impl)
        return jnp.sum(y * weights) + jnp.sum(final), (y, final)

    (_, (y, final)), grads = jax.value_and_grad(lambda x: run("mosaic", x), has_aux=True)(x)
    (_, (y_ref, final_ref)), grads_ref = jax.value_and_grad(lambda x: run("reference", x), has_aux=True)(x)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(final, final_ref) < 1e-4
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


@on_hopper
def test_mosaic_resets_match_the_contract():
    from biomamba_jax.model.scan_mosaic import mosaic_selective_scan

    shape = (3, 300, 256, 16)
    x = scan_inputs(5, *shape, jnp.float32, initial_state=True)
    resets = jax.random.uniform(jax.random.PRNGKey(9), shape[:2]) < 0.02
    resets = resets.at[0, 0].set(True).at[1, 16].set(True).at[2, 299].set(True)  # first, a tile start, last
    weights = jax.random.normal(jax.random.PRNGKey(1), shape[:3])

    def loss(fn, x):
        y, final = fn(x)
        return jnp.sum(y * weights) + jnp.sum(final ** 2), (y, final)

    mosaic = lambda x: mosaic_selective_scan(**x, delta_softplus=True, resets=resets)
    expected = lambda x: scan_with_resets(**x, resets=resets)
    (_, (y, final)), grads = jax.jit(jax.value_and_grad(lambda x: loss(mosaic, x), has_aux=True))(x)
    (_, (y_ref, final_ref)), grads_ref = jax.value_and_grad(lambda x: loss(expected, x), has_aux=True)(x)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(final, final_ref) < 1e-4
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


@on_hopper
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mosaic_cuts_few_long_rows_into_segments_and_matches_the_contract(dtype):
    """One row of 5,000 tokens in 3 channel blocks: `segment_count` cuts it in 4 or more on
    any GPU of 16 or more multiprocessors (9 on an H100 or H200: an odd count, the last
    segment padded), with resets inside segments and at the second segment's first token."""
    from biomamba_jax.model.scan_mosaic import TILE, mosaic_selective_scan, segment_count

    shape = (1, 5000, 384, 16)
    segments = segment_count(shape[0], shape[1], shape[2])
    assert segments >= 4
    segment_length = -(-shape[1] // (segments * TILE)) * TILE
    x = scan_inputs(7, *shape, dtype, initial_state=True)
    resets = (jax.random.uniform(jax.random.PRNGKey(10), shape[:2]) < 0.002).at[0, segment_length].set(True)
    weights = jax.random.normal(jax.random.PRNGKey(1), shape[:3])

    def loss(fn, x):
        y, final = fn(x)
        return jnp.sum(y.astype(jnp.float32) * weights) + jnp.sum(final ** 2), (y, final)

    mosaic = lambda x: mosaic_selective_scan(**x, delta_softplus=True, resets=resets)
    expected = lambda x: scan_with_resets(**x, resets=resets)
    (_, (y, final)), grads = jax.jit(jax.value_and_grad(lambda x: loss(mosaic, x), has_aux=True))(x)
    (_, (y_ref, final_ref)), grads_ref = jax.value_and_grad(lambda x: loss(expected, x), has_aux=True)(x)
    # bf16 inputs: the only differences are where each rounds its bf16 outputs and gradients.
    y_bound, grad_bound = (1e-4, 1e-4) if dtype == jnp.float32 else (1e-2, 2e-2)
    assert rel_err(y, y_ref) < y_bound and rel_err(final, final_ref) < 1e-4
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < grad_bound, name
