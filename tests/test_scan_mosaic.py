"""The Mosaic GPU scan (impl "mosaic") on a CPU: its option, its errors, and its kernels'
logic in Pallas' GPU interpreter (jax 0.11 or newer). The compiled kernels, warp shuffles
included, are checked against the reference in tests/test_gpu_kernels.py on a Hopper GPU."""
import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err, scan_with_resets

from biomamba_jax.model.scan import resolve_scan_impl, selective_scan
from biomamba_jax.model.scan_mosaic import mosaic_selective_scan
from biomamba_jax.model.scan_options import MosaicOptions, ScanImpl, parse_scan_impl

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])
needs_gpu_interpreter = pytest.mark.skipif(
    JAX_VERSION < (0, 11), reason="Pallas' GPU interpreter runs these kernels from jax 0.11 on")


def small_inputs(seed, batch, length, channels, d_state):
    k = jax.random.split(jax.random.PRNGKey(seed), 9)
    return {
        "u": jax.random.normal(k[0], (batch, length, channels)),
        "delta": jax.random.normal(k[1], (batch, length, channels)) - 1.0,
        "A": -jnp.exp(jax.random.normal(k[2], (channels, d_state)) * 0.5),
        "B": jax.random.normal(k[3], (batch, length, d_state)),
        "C": jax.random.normal(k[4], (batch, length, d_state)),
        "D": jax.random.normal(k[5], (channels,)),
        "z": jax.random.normal(k[6], (batch, length, channels)),
        "delta_bias": jax.random.normal(k[7], (channels,)) * 0.3,
        "initial_state": jax.random.normal(k[8], (batch, channels, d_state)),
    }


def test_mosaic_option_strings():
    assert parse_scan_impl("mosaic") == ScanImpl("mosaic", MosaicOptions(approx_math=True))
    assert parse_scan_impl("mosaic:approx_math=false").options == MosaicOptions(approx_math=False)
    assert str(parse_scan_impl("mosaic")) == "mosaic:approx_math=true"
    assert resolve_scan_impl("mosaic:approx_math=false") == ScanImpl("mosaic", MosaicOptions(False))
    with pytest.raises(ValueError, match=r"'mosaic' takes key=value options from \['approx_math'\]"):
        parse_scan_impl("mosaic:fuse=true")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the error is for machines without a Hopper GPU")
def test_mosaic_off_hopper_says_what_it_needs():
    x = small_inputs(0, 1, 8, 4, 3)
    with pytest.raises(ValueError, match="compute capability 9.0"):
        selective_scan(**x, delta_softplus=True, impl="mosaic")


def test_mosaic_names_the_largest_state_it_takes():
    x = small_inputs(0, 1, 8, 4, 32)
    with pytest.raises(ValueError, match="d_state up to 16.*got 32"):
        selective_scan(**x, delta_softplus=True, impl="mosaic")


def interpreted(x, **kwargs):
    weights = jax.random.normal(jax.random.PRNGKey(1), x["u"].shape)

    def loss(x, fn):
        y, final = fn(x)
        return jnp.sum(y * weights) + jnp.sum(final ** 2), (y, final)

    return lambda fn: jax.value_and_grad(lambda x: loss(x, fn), has_aux=True)(x)


def assert_interpreted_like(x, mosaic, expected):
    """Values, final states and every gradient of `mosaic` within 1e-5 of `expected`."""
    run = interpreted(x)
    (_, (y, final)), grads = run(mosaic)
    (_, (y_ref, final_ref)), grads_ref = run(expected)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-5, name


@needs_gpu_interpreter
@pytest.mark.parametrize("use_mask,backward_stages", [(False, 2), (True, 1)])
def test_mosaic_kernels_in_the_interpreter_match_reference(monkeypatch, use_mask, backward_stages):
    """A sequence that is not a whole number of tiles (32 tokens, the backward takes each in
    two halves), padded channels and states; the backward with a tile prefetched (bf16
    inputs) and without (fp32 inputs on a GPU: two tiles do not fit in shared memory)."""
    from biomamba_jax.model import scan_mosaic

    monkeypatch.setattr(scan_mosaic, "_backward_stages", lambda *args: backward_stages)
    scan_mosaic._backward_call.clear_cache()  # traced with the other stage count otherwise
    x = small_inputs(3, 1, 45, 100, 3)
    mask = (jax.random.uniform(jax.random.PRNGKey(4), (1, 45)) > 0.3).astype(jnp.float32) if use_mask else None
    mosaic = lambda x: mosaic_selective_scan(**x, delta_softplus=True, mask=mask, approx_math=False, _interpret=True)
    reference = lambda x: selective_scan(**x, delta_softplus=True, mask=mask, return_final_state=True,
                                         impl="reference")
    assert_interpreted_like(x, mosaic, reference)


@needs_gpu_interpreter
def test_mosaic_resets_in_the_interpreter_match_the_contract():
    # Resets in both halves of a tile, at a half's first token and at a tile's.
    x = small_inputs(5, 2, 40, 128, 4)
    resets = jnp.zeros((2, 40), bool).at[0, 0].set(True).at[0, 7].set(True).at[0, 20].set(True)
    resets = resets.at[1, 16].set(True).at[1, 32].set(True).at[1, 37].set(True)
    mosaic = lambda x: mosaic_selective_scan(**x, delta_softplus=True, resets=resets, approx_math=False,
                                             _interpret=True)
    assert_interpreted_like(x, mosaic, lambda x: scan_with_resets(**x, resets=resets))


@pytest.mark.parametrize("length,channels,d_state,with_resets", [(2048, 256, 16, True), (37, 200, 5, False)])
def test_mosaic_kernels_build_for_hopper_on_a_cpu(monkeypatch, length, channels, d_state, with_resets):
    """Forward and backward kernels lower for CUDA here (no GPU needed), with the Lane
    semantics they are written for. Under Lane a TMA copy must move a multiple of 128 bytes,
    which the reset row once broke; jax 0.11's default, Warpgroup, spent 13 of 14 s of the
    build in layout inference (benchmarks/HISTORY.md)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from biomamba_jax.model import scan_mosaic

    monkeypatch.setattr(scan_mosaic, "device_reason", lambda: None)
    semantics = []
    original_kernel = plgpu.kernel

    def recording_kernel(*args, compiler_params, **kwargs):
        semantics.append(compiler_params.lowering_semantics)
        return original_kernel(*args, compiler_params=compiler_params, **kwargs)

    monkeypatch.setattr(plgpu, "kernel", recording_kernel)
    x = small_inputs(0, 2, length, channels, d_state)
    x = {k: v.astype(jnp.bfloat16) if k in ("u", "delta", "z", "B", "C") else v for k, v in x.items()}
    resets = jnp.zeros((2, length), bool).at[:, ::7].set(True) if with_resets else None

    def loss(x):
        y, final = mosaic_selective_scan(**x, delta_softplus=True, resets=resets)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

    lowered = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",))
    assert "selective_scan_fwd" in lowered.as_text() and "selective_scan_bwd" in lowered.as_text()
    assert semantics == [plgpu.LoweringSemantics.Lane] * 2


def test_segment_count_fills_the_gpu_only_where_it_gains():
    from biomamba_jax.model.scan_mosaic import segment_count

    assert segment_count(8, 2048, 1536, multiprocessors=132) == 1  # 96 blocks already
    assert segment_count(1, 16384, 1536, multiprocessors=132) == 11  # 12 blocks -> 132, one wave
    assert segment_count(2, 16384, 1536, multiprocessors=132) == 5  # 24 blocks -> 120
    assert segment_count(1, 65536, 4096, multiprocessors=132) == 4  # 32 blocks -> 128
    assert segment_count(4, 16384, 1536, multiprocessors=132) == 1  # 2 segments would not gain
    assert segment_count(1, 1024, 1536, multiprocessors=132) == 1  # too short to cut


@needs_gpu_interpreter
@pytest.mark.parametrize("with_resets", [False, True])
def test_mosaic_segmented_rows_in_the_interpreter_match_reference(with_resets):
    """Rows cut into 4 segments (the last one padded), an initial state, a mask, and
    resets in the first token of a segment and inside one."""
    x = small_inputs(6, 2, 53, 100, 3)
    mask = jax.random.uniform(jax.random.PRNGKey(5), (2, 53)) > 0.2
    resets = jnp.zeros((2, 53), bool).at[0, 16].set(True).at[1, 5].set(True).at[1, 40].set(True)
    resets = resets if with_resets else None
    mosaic = lambda x: mosaic_selective_scan(**x, delta_softplus=True, mask=mask, resets=resets, approx_math=False,
                                             _interpret=True, _segments=4)
    reference = lambda x: selective_scan(**x, delta_softplus=True, mask=mask, resets=resets, return_final_state=True,
                                         impl="reference")
    assert_interpreted_like(x, mosaic, reference)
