"""Chunk-size edge cases of the `chunked` and `pallas` scans (Pallas in interpret mode on CPU)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import recurrence_inputs, rel_err

from biomamba_jax.model.scan import SCAN_IMPLS, reference_scan
from biomamba_jax.model.scan_chunked import chunked_scan
from biomamba_jax.model.scan_options import AUTO_IMPL, PallasOptions
from biomamba_jax.model.scan_pallas import pallas_scan, pallas_selective_scan


def assert_matches_reference(fn, x, grads=True):
    y_ref, final_ref = reference_scan(*x)
    y, final = jax.jit(fn)(*x)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(final, final_ref) < 1e-5
    if grads:
        w = jax.random.normal(jax.random.PRNGKey(9), y_ref.shape)

        def loss(scan):
            return lambda *a: jnp.sum(scan(*a)[0] * w) + jnp.sum(scan(*a)[1] ** 2)

        g_ref = jax.grad(loss(reference_scan), argnums=tuple(range(6)))(*x)
        g = jax.jit(jax.grad(loss(fn), argnums=tuple(range(6))))(*x)
        for name, a, b in zip(("u", "delta", "A", "B", "C", "h0"), g, g_ref):
            assert rel_err(a, b) < 1e-5, name


def test_impls_registered_and_auto_choices():
    assert {"chunked", "pallas"} <= set(SCAN_IMPLS)
    assert AUTO_IMPL["cpu"] == "chunked"
    assert AUTO_IMPL["tpu"] == "chunked"
    assert AUTO_IMPL["gpu"] == "pallas"
    assert AUTO_IMPL["gpu-hopper"] == "mosaic"


@pytest.mark.parametrize("hopper,d_state,expected", [(True, 16, "mosaic"), (True, 5, "mosaic"), (True, 32, "pallas"),
                                                     (False, 16, "pallas"), (True, None, "mosaic")])
def test_auto_takes_the_mosaic_kernels_on_hopper_for_the_states_they_take(monkeypatch, hopper, d_state, expected):
    from biomamba_jax.model import scan

    monkeypatch.setattr(scan.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(scan, "_on_hopper", lambda: hopper)
    assert scan.resolve_scan_impl("auto", d_state).name == expected
    assert scan.resolve_scan_impl("pallas", d_state).name == "pallas"  # a named impl is never swapped


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
def test_chunked_any_chunk_size_values(chunk):
    """Chunk 1, a divisor, a non-divisor (padding) and chunk > L (one chunk)."""
    x = recurrence_inputs(chunk, 2, 20, 5, 3)
    assert_matches_reference(functools.partial(chunked_scan, chunk=chunk), x, grads=False)


@pytest.mark.parametrize("inner", [pytest.param("associative", marks=pytest.mark.slow), "sequential"])
def test_chunked_grads_with_padding(inner):
    x = recurrence_inputs(1, 2, 19, 6, 4)
    assert_matches_reference(functools.partial(chunked_scan, chunk=8, inner=inner), x)


def test_chunked_without_initial_state():
    x = recurrence_inputs(3, 1, 10, 3, 2)[:5] + (None,)
    y, final = chunked_scan(*x, chunk=4)
    y_ref, final_ref = reference_scan(*x)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5


def test_chunked_rejects_unknown_inner():
    with pytest.raises(ValueError, match="inner must be"):
        chunked_scan(*recurrence_inputs(0, 1, 4, 2, 2), inner="magic")


@pytest.mark.parametrize(
    "shape,options",
    [
        ((1, 13, 16, 16), dict(chunk=4, block_e=16)),  # L not a multiple of the chunk
        ((2, 8, 5, 3), dict(chunk=8, block_e=4)),  # odd channels, N not a power of 2
        ((1, 3, 2, 2), dict(chunk=16, block_e=32)),  # chunk and block larger than L, E
        ((1, 9, 12, 4), dict(chunk=2, block_e=8, bwd_block_e=4)),  # backward tiled differently
    ],
)
def test_pallas_interpret_values_and_grads(shape, options):
    assert_matches_reference(functools.partial(pallas_scan, _tiling_overrides=options), recurrence_inputs(sum(shape), *shape))


# A tiling and segment rule small enough for the interpreter that short sequences split.
SEGMENTED = dict(chunk=4, block_e=8, min_programs=64, target_programs=64, min_segment_length=8)


@pytest.fixture
def pallas_tiling(monkeypatch):
    """`pallas_tiling(**overrides)`: selective_scan's "pallas" impl, whatever its options,
    runs with these tiling overrides (which no impl string reaches)."""
    from biomamba_jax.model import scan

    def use(**overrides):
        monkeypatch.setitem(scan.FUSED_SCAN_IMPLS, "pallas",
                            functools.partial(pallas_selective_scan, _tiling_overrides=overrides))

    return use


def _is_power_of_two(n):
    return n >= 1 and n & (n - 1) == 0


# Shapes from one-token decoding rows to long prompts, at Mamba-130m's channels and odd ones.
TILING_SHAPES = [(batch, length, channels) for batch in (1, 2, 3, 4, 8, 32)
                 for length in (1, 7, 600, 1024, 2048, 8192, 16384, 65536) for channels in (3, 12, 768, 1536)]


@pytest.mark.parametrize("rule", [{}, dict(min_programs=64, target_programs=64, min_segment_length=8)])
def test_tiling_invariants(rule):
    """What `_tiling` must hold at any shape, whatever the table's tuned values: powers of
    two where Triton needs them, segments only where the grid is short, never shorter than
    the minimum, and stopped for a reason; padding that every pass divides evenly; fuse=auto
    fused exactly where the sequence is split."""
    from biomamba_jax.model.scan_pallas import _TABLE, _next_pow2, _padded, _tiling

    table = _TABLE._replace(**rule)
    segments = {}
    for batch, length, channels in TILING_SHAPES:
        t = _tiling(batch, length, channels, PallasOptions(), rule or None)
        at = (batch, length, channels)
        segments[at] = t.segments
        assert all(map(_is_power_of_two, (t.block_e, t.bwd_block_e, t.segments, t.bwd_segments, t.sum_tile))), at
        assert t.block_e <= _next_pow2(channels) and t.bwd_block_e <= _next_pow2(channels), at
        assert 1 <= t.chunk <= length, at
        assert t.bwd_segments == t.segments, at  # unless told otherwise, the backward splits as the forward
        programs = batch * -(-channels // t.block_e)
        if programs >= table.min_programs:
            assert t.segments == 1, at  # a full grid is not split
        else:  # doubling stopped: the grid is filled with no segment over the maximum, or one more would be too short
            filled = programs * t.segments >= table.target_programs and length <= t.segments * table.max_segment_length
            assert filled or length < 2 * t.segments * table.min_segment_length, at
        if t.segments > 1:
            assert length >= t.segments * table.min_segment_length, at  # no segment below the minimum
        padded_length, padded_channels = _padded(t, length, channels)
        assert padded_length >= length and padded_channels >= channels, at
        for count in (t.segments, t.bwd_segments):
            assert padded_length % (count * t.chunk) == 0, at  # whole chunks in every segment
        assert padded_channels % t.block_e == 0 and padded_channels % t.bwd_block_e == 0, at
        assert t.fuse == ("delta" if t.segments > 1 else False), at
    for (batch, length, channels), count in segments.items():  # more rows or steps never reverse the rule
        assert segments.get((batch * 2, length, channels), 1) <= count
        assert segments.get((batch, length * 2, channels), count) >= count
    for fuse in (False, True, "delta"):  # an explicit fuse is kept
        assert _tiling(1, 8192, 1536, PallasOptions(fuse=fuse)).fuse is fuse


def test_tiling_overrides_fix_the_outcome_and_are_checked():
    from biomamba_jax.model.scan_pallas import _tiling

    fixed = dict(chunk=4, block_e=64, num_warps=4, bwd_block_e=16, bwd_num_warps=2, segments=2, bwd_segments=1,
                 sum_tile=4, sum_num_warps=8)
    tiling = _tiling(1, 8192, 1536, PallasOptions(fuse=True), fixed)
    assert tiling._asdict() == dict(fixed, fuse=True)
    # Clamped to the channels (next power of two) and the length.
    tiling = _tiling(1, 3, 5, PallasOptions(), dict(chunk=16, block_e=64, bwd_block_e=64))
    assert (tiling.chunk, tiling.block_e, tiling.bwd_block_e) == (3, 8, 8)
    with pytest.raises(ValueError, match=r"unknown pallas tiling override\(s\) \['blocke'\]; valid: .*'block_e'"):
        _tiling(1, 8, 4, PallasOptions(), dict(blocke=8))
    with pytest.raises(ValueError, match="bwd_segments=3: give a power of two"):
        _tiling(1, 8, 4, PallasOptions(), dict(bwd_segments=3))
    for bad in (dict(chunk=0), dict(min_programs="64"), dict(num_warps=True)):
        with pytest.raises(ValueError, match="give a positive whole number"):
            _tiling(1, 8, 4, PallasOptions(), bad)


@pytest.mark.parametrize("batch,length", [(1, 70), pytest.param(2, 67, marks=pytest.mark.slow)])
def test_pallas_segmented_values_and_grads(batch, length):
    """Segments: zero-state pass (a sum over each segment's steps), XLA composition, second
    pass; the adjoint likewise."""
    assert_matches_reference(functools.partial(pallas_scan, _tiling_overrides=SEGMENTED),
                             recurrence_inputs(length, batch, length, 12, 4))


@pytest.mark.parametrize("length,segments,tile,used", [
    pytest.param(96, 8, 1, 1, marks=pytest.mark.slow), pytest.param(96, 8, 2, 2, marks=pytest.mark.slow),
    (96, 8, 16, 4), (256, 2, 32, 32)])
def test_segment_sums_match_the_recurrence_for_any_tile(length, segments, tile, used):
    """The sum kernels' tiles: one step, two, one clamped to the largest power of two that
    divides a 12-step segment, and the default 32 steps, with deltas large enough that
    exp(A * delta summed) spans many orders of magnitude."""
    from biomamba_jax.model.scan_pallas import _Fusion, _Plan, _sum_tile

    x = list(recurrence_inputs(11, 1, length, 12, 4))
    x[1] = x[1] * 4.0
    overrides = dict(SEGMENTED, sum_tile=tile, segments=segments, bwd_segments=segments)
    assert_matches_reference(functools.partial(pallas_scan, _tiling_overrides=overrides), tuple(x))
    chunk = SEGMENTED["chunk"]
    plan = _Plan(chunk, -(-length // (segments * chunk)) * segments, segments, segments, _Fusion())
    assert _sum_tile(plan, tile) == used


@pytest.mark.parametrize("segments,bwd_segments", [
    pytest.param(8, 1, marks=pytest.mark.slow), pytest.param(1, 4, marks=pytest.mark.slow), (2, 8)])
def test_pallas_forward_and_backward_segment_independently(segments, bwd_segments):
    """The forward saves the state at every chunk start, so the backward may split the
    sequence differently (fewer programs per pass, no adjoint pass when it does not split)."""
    overrides = dict(SEGMENTED, segments=segments, bwd_segments=bwd_segments)
    assert_matches_reference(functools.partial(pallas_scan, _tiling_overrides=overrides), recurrence_inputs(3, 2, 70, 12, 4))
    from biomamba_jax.model.scan_pallas import _tiling

    tiling = _tiling(2, 70, 12, PallasOptions(), overrides)
    assert (tiling.segments, tiling.bwd_segments) == (segments, bwd_segments)


@pytest.mark.parametrize(
    "dtype,tolerance,fusion",
    # Each fusion in one dtype by default; the other dtype under the slow marker.
    [(jnp.float32, 1e-5, "fuse=false"), pytest.param(jnp.bfloat16, 2e-2, "fuse=false", marks=pytest.mark.slow),
     pytest.param(jnp.float32, 1e-5, "fuse=true", marks=pytest.mark.slow), (jnp.bfloat16, 2e-2, "fuse=true"),
     (jnp.float32, 1e-5, "fuse=delta"), pytest.param(jnp.bfloat16, 2e-2, "fuse=delta", marks=pytest.mark.slow)],
)
def test_segmented_selective_scan_with_mask_matches_reference(dtype, tolerance, fusion, pallas_tiling):
    """selective_scan through the kernels with segments and a mask, in fp32 and bf16: XLA
    doing bias, softplus, D and gate around the kernels, the kernels doing the bias and
    softplus, or all four (the backward kernel all but the gate, whose chain rule XLA
    applies)."""
    from biomamba_jax.model.scan import selective_scan

    batch, length, channels, d_state = 2, 75, 12, 4
    k = jax.random.split(jax.random.PRNGKey(5), 9)
    u, delta, z = (jax.random.normal(k[i], (batch, length, channels), dtype) for i in range(3))
    B, C = (jax.random.normal(k[i], (batch, length, d_state), dtype) for i in (3, 4))
    A = -jnp.exp(jax.random.normal(k[5], (channels, d_state)) * 0.5)
    D, bias = jax.random.normal(k[6], (channels,)), jax.random.normal(k[7], (channels,)) * 0.3
    h0 = jax.random.normal(k[8], (batch, channels, d_state))
    mask = jnp.ones((batch, length)).at[1, :9].set(0).at[0, 30:33].set(0)
    w = jax.random.normal(jax.random.PRNGKey(1), (batch, length, channels))
    pallas_tiling(**SEGMENTED)
    impl = f"pallas:{fusion}"

    def loss(impl, *args):
        y, final = selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True,
                                  initial_state=args[8], return_final_state=True, mask=mask, impl=impl)
        return jnp.sum(y.astype(jnp.float32) * w) + jnp.sum(final ** 2)

    args = (u, delta, A, B, C, D, z, bias, h0)
    up = lambda t: t.astype(jnp.float32)
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, impl), argnums=tuple(range(9))))(*args)
    ref_value, ref_grads = jax.value_and_grad(functools.partial(loss, "reference"), argnums=tuple(range(9)))(
        *map(up, args))
    assert abs(float(value) - float(ref_value)) < tolerance * abs(float(ref_value))
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0")
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert g.dtype == args[names.index(name)].dtype, name
        assert rel_err(g, g_ref) < tolerance, name


@pytest.mark.parametrize("impl", [pytest.param("pallas:fuse=false", marks=pytest.mark.slow), "pallas:fuse=true",
                                  "pallas:fuse=delta", "chunked:chunk=4"])
def test_bias_without_softplus_leaves_padded_and_masked_steps_alone(impl, pallas_tiling):
    """A dt bias without the softplus: padded steps (13 is not a multiple of the chunk) and
    masked steps must leave the state alone, as in the reference, in values and gradients."""
    from biomamba_jax.model.scan import selective_scan

    k = jax.random.split(jax.random.PRNGKey(6), 6)
    batch, length, channels, d_state = 2, 13, 6, 4
    u, delta = jax.random.normal(k[0], (batch, length, channels)), jax.random.uniform(k[1], (batch, length, channels))
    A = -jnp.exp(jax.random.normal(k[2], (channels, d_state)))
    B, C = (jax.random.normal(k[i], (batch, length, d_state)) for i in (3, 4))
    bias = jax.random.uniform(k[5], (channels,)) + 0.5
    mask = jnp.ones((batch, length)).at[1, 10:].set(0).at[0, 4:6].set(0)
    pallas_tiling(chunk=4)

    def loss(impl, u, bias):
        y, final = selective_scan(u, delta, A, B, C, delta_bias=bias, delta_softplus=False, mask=mask,
                                  return_final_state=True, impl=impl)
        return jnp.sum(y ** 2) + jnp.sum(final ** 2), final

    (value, final), grads = jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1), has_aux=True)(u, bias)
    (ref_value, ref_final), ref_grads = jax.value_and_grad(
        functools.partial(loss, "reference"), argnums=(0, 1), has_aux=True)(u, bias)
    assert rel_err(final, ref_final) < 1e-5 and abs(float(value - ref_value)) < 1e-5 * abs(float(ref_value))
    for g, g_ref in zip(grads, ref_grads):
        assert rel_err(g, g_ref) < 1e-5


def test_impl_string_options_and_errors():
    from biomamba_jax.model.scan_options import ChunkedOptions, NoOptions, ScanImpl, parse_scan_impl

    assert parse_scan_impl("pallas:fuse=delta:approx_math=false:interpret=true") == ScanImpl(
        "pallas", PallasOptions(fuse="delta", approx_math=False, interpret=True))
    assert parse_scan_impl("pallas") == ScanImpl("pallas", PallasOptions())
    assert parse_scan_impl("pallas:interpret=none").options.interpret is None
    assert parse_scan_impl("chunked:chunk=64:inner=sequential") == ScanImpl("chunked", ChunkedOptions(64, "sequential"))
    assert parse_scan_impl("associative") == ScanImpl("associative", NoOptions())
    with pytest.raises(ValueError, match=r"unknown selective-scan impl 'palas'; choose one of .*'chunked'.*'pallas'.*auto"):
        parse_scan_impl("palas:fuse=true")
    # Unknown options name the valid ones; the tiling is not an option: no impl string sets it.
    for option in ("blocke=32", "block_e=32", "chunk=8", "segments=2", "bwd_fuse=off", "fwd_bc=input",
                   "bwd_partials=float32", "min_programs=64", "_tiling_overrides=none"):
        with pytest.raises(ValueError, match=r"takes key=value options from \['fuse', 'approx_math', 'interpret'\]"):
            parse_scan_impl(f"pallas:{option}")
    with pytest.raises(ValueError, match="takes key=value options from none"):
        parse_scan_impl("associative:chunk=4")
    with pytest.raises(ValueError, match="fuse='gate'; choose auto, true, false or delta"):
        parse_scan_impl("pallas:fuse=gate")
    # Values of the wrong kind (here from a comma where ':' belongs) fail, naming the option.
    for impl, option in (("pallas:interpret=false,fuse=true", "interpret"), ("pallas:approx_math=yes", "approx_math"),
                         ("chunked:chunk=abc", "chunk")):
        with pytest.raises(ValueError, match=f"option {option}=.*give .*separated by ':'"):
            parse_scan_impl(impl)
    with pytest.raises(ValueError, match="chunk=-3: give a positive whole number"):
        parse_scan_impl("chunked:chunk=-3")
    # Every value of fuse survives the impl string, and the string a run plan prints.
    for text, value in (("auto", "auto"), ("delta", "delta"), ("true", True), ("false", False)):
        parsed = parse_scan_impl(f"pallas:fuse={text}")
        assert parsed.options.fuse == value and type(parsed.options.fuse) is type(value)
        assert parse_scan_impl(str(parsed)) == parsed


def test_pallas_picks_interpret_off_gpu():
    from biomamba_jax.model.scan_pallas import _interpret

    assert _interpret(PallasOptions()) == (jax.default_backend() != "gpu")
    assert _interpret(PallasOptions(interpret=True)) is True


@pytest.mark.slow
def test_pallas_longer_sequence_many_chunks():
    x = recurrence_inputs(4, 2, 200, 40, 16)
    assert_matches_reference(functools.partial(pallas_scan, _tiling_overrides=dict(chunk=8, block_e=16)), x)


def test_fuse_false_leaves_bias_softplus_skip_and_gate_to_xla(monkeypatch):
    """fuse=false runs the plain kernels, fuse=delta and fuse=true the fused ones."""
    import biomamba_jax.model.scan_pallas as scan_pallas
    from biomamba_jax.model.scan import selective_scan

    calls = []
    run = scan_pallas._run
    monkeypatch.setattr(scan_pallas, "_run", lambda *a, **k: calls.append(a) or run(*a, **k))
    x = recurrence_inputs(0, 1, 6, 4, 2)
    extras = dict(D=jnp.ones(4), z=x[0], delta_bias=jnp.zeros(4), delta_softplus=True)
    for fuse in ("false", "delta", "true"):
        selective_scan(*x[:5], **extras, impl=f"pallas:fuse={fuse}")
    plain = [all(x is None for x in a[6:9]) and a[9] == scan_pallas._Fusion() for a in calls]
    assert plain == [True, False, False]

    # bf16 activations reach the plain kernels as they are, with no fp32 copy made first.
    calls.clear()
    bf16 = lambda t: t.astype(jnp.bfloat16)
    selective_scan(bf16(x[0]), bf16(x[1]), x[2], bf16(x[3]), bf16(x[4]), **extras, impl="pallas:fuse=false")
    u, delta, _, B, C = calls[0][:5]
    assert (u.dtype, B.dtype, C.dtype, delta.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_backward_partials_take_the_dtype_of_b_and_c():
    """The backward writes its per-channel-block dB and dC partial sums in B's and C's own
    dtype (half the bytes in bf16 training), and sums them in fp32."""
    x = recurrence_inputs(4, 1, 16, 8, 4)
    bf16 = lambda t: t.astype(jnp.bfloat16)
    args = (bf16(x[0]), x[1], x[2], bf16(x[3]), bf16(x[4]), x[5])
    w = jax.random.normal(jax.random.PRNGKey(2), (1, 16, 8))

    def loss(scan):
        return lambda *a: jnp.sum(scan(*a)[0].astype(jnp.float32) * w) + jnp.sum(scan(*a)[1] ** 2)

    fn = functools.partial(pallas_scan, _tiling_overrides=dict(bwd_block_e=4))
    grad = jax.grad(loss(fn), argnums=(3, 4))
    assert "bf16[1,2,16,4]" in str(jax.make_jaxpr(grad)(*args))  # (batch, 8 / 4 blocks, L, N)
    up = lambda t: t.astype(jnp.float32)
    g_ref = jax.grad(loss(reference_scan), argnums=(3, 4))(*map(up, args))
    for g, ref in zip(jax.jit(grad)(*args), g_ref):
        assert g.dtype == jnp.bfloat16 and rel_err(g, ref) < 1e-2


@pytest.mark.parametrize("impl", ["pallas", pytest.param("pallas:fuse=true", marks=pytest.mark.slow)])
def test_remat_scan_keeps_the_scan_residuals_and_the_gradients(impl, capsys):
    """remat="scan" saves the kernel's output and chunk states (so the backward pass need
    not rerun the forward kernel) and gives the same gradients as remat="full"."""
    from flax import nnx

    from biomamba_jax.model.config import MambaConfig
    from biomamba_jax.model.mamba import MambaBlock, MambaLM, _REMAT_POLICIES

    config = MambaConfig(d_model=16, n_layer=1, vocab_size=64, d_state=4, scan_impl=impl, remat="scan")
    graphdef, state = nnx.split(MambaBlock(config, rngs=nnx.Rngs(0)))
    layer = jax.checkpoint(lambda h, s: nnx.merge(graphdef, s)(h), policy=_REMAT_POLICIES["scan"])
    jax.ad_checkpoint.print_saved_residuals(lambda h, s: layer(h, s).sum(), jnp.ones((2, 10, 16)), state)
    saved = capsys.readouterr().out
    assert "named 'selective_scan_output'" in saved and "named 'selective_scan_states'" in saved

    ids = jnp.asarray(np.random.RandomState(3).randint(0, 64, (2, 21)))
    grads = {}
    for remat in ("full", "scan"):
        model = MambaLM(config.replace(remat=remat), rngs=nnx.Rngs(1))
        graphdef_lm, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: nnx.merge(graphdef_lm, p, rest)(ids).astype(jnp.float32).mean()
        grads[remat] = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
    for full, kept in zip(grads["full"], grads["scan"]):
        assert rel_err(kept, full) < 1e-6


def test_remat_scan_runs_the_forward_kernel_once_per_training_step():
    """The point of remat="scan", in the compiled program: a loss and its gradient run the
    Pallas forward kernel once; under remat="full" the backward pass runs it again (XLA's
    name for that copy is rematted_computation/forward_kernel)."""
    import re

    from flax import nnx

    from biomamba_jax.model.config import MambaConfig
    from biomamba_jax.model.mamba import _REMAT_POLICIES, MambaBlock

    config = MambaConfig(d_model=16, n_layer=1, vocab_size=64, d_state=4, scan_impl="pallas:fuse=false")
    graphdef, state = nnx.split(MambaBlock(config, rngs=nnx.Rngs(0)))
    kernels = {}
    for remat in ("scan", "full"):
        layer = jax.checkpoint(lambda h, s: nnx.merge(graphdef, s)(h), policy=_REMAT_POLICIES[remat])
        step = jax.jit(jax.value_and_grad(lambda h, s, layer=layer: layer(h, s).sum(), argnums=(0, 1)))
        hlo = step.lower(jnp.ones((2, 16, 16)), state).compile().as_text()
        # Each kernel is one outer `while` in the interpreter's lowering, named after it.
        names = re.findall(r' while\(.*op_name="([^"]*(forward|backward)_kernel\)?)/while"', hlo)
        kernels[remat] = [(kernel, "rematted_computation" in name) for name, kernel in names]
    assert sorted(kernels["scan"]) == [("backward", False), ("forward", False)]
    assert sorted(kernels["full"]) == [("backward", False), ("forward", False), ("forward", True)]


@pytest.mark.parametrize("segments", [pytest.param(1, marks=pytest.mark.slow), 2, 5, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.parametrize("reverse", [False, True])
def test_segment_recurrence_is_the_step_by_step_composition(segments, reverse):
    """The associative scan that composes segment results (forward states, backward
    adjoints) against the plain loop it replaced."""
    from biomamba_jax.model.scan_pallas import _segment_recurrence

    k = jax.random.split(jax.random.PRNGKey(segments), 3)
    decays = jax.random.uniform(k[0], (2, segments, 3, 4))
    drives = jax.random.normal(k[1], (2, segments, 3, 4))
    initial = jax.random.normal(k[2], (2, 3, 4))
    x, expected = initial, [None] * segments
    for s in (reversed(range(segments)) if reverse else range(segments)):
        x = decays[:, s] * x + drives[:, s]
        expected[s] = x
    assert rel_err(_segment_recurrence(decays, drives, initial, reverse), jnp.stack(expected, axis=1)) < 1e-6


def test_fuse_delta_puts_only_bias_and_softplus_in_the_kernels(monkeypatch):
    """fuse=delta: the kernels get the raw delta with the bias and softplus to apply, and
    no D or gate; fuse=true gives them all four."""
    import biomamba_jax.model.scan_pallas as scan_pallas
    from biomamba_jax.model.scan import selective_scan

    fusions = []
    run = scan_pallas._run
    monkeypatch.setattr(scan_pallas, "_run", lambda *a, **k: fusions.append((a[6:9], a[9])) or run(*a, **k))
    x = recurrence_inputs(0, 1, 6, 4, 2)
    extras = dict(D=jnp.ones(4), z=x[0], delta_bias=jnp.zeros(4), delta_softplus=True)
    for fuse in ("delta", "true"):
        selective_scan(*x[:5], **extras, impl=f"pallas:fuse={fuse}")
    (delta_args, delta_fusion), (all_args, all_fusion) = fusions
    assert delta_fusion == scan_pallas._Fusion(bias=True, softplus=True, skip=False, gate=False)
    assert delta_args[0] is not None and delta_args[1:] == (None, None)  # bias in; D, z not
    assert all_fusion == scan_pallas._Fusion(True, True, True, True) and None not in all_args


@pytest.mark.parametrize("options, approx", [("", True), (":approx_math=false", False)])
def test_gpu_kernels_take_the_approximate_exp_unless_told_not_to(options, approx, pallas_tiling):
    """For CUDA, the kernels' exp is PTX ex2.approx (libdevice's __nv_expf with
    approx_math=false) in all four kernels of a segmented forward and backward, the fused
    softplus and sigmoid included; the softplus takes lg2.approx. (The interpreter always
    computes exactly: every other Pallas test here runs it with the default, true.)"""
    from biomamba_jax.model.scan import selective_scan

    x = recurrence_inputs(0, 1, 64, 16, 16)
    extras = dict(delta_bias=jnp.zeros(16), delta_softplus=True)
    pallas_tiling(segments=2)
    for fuse in ("false", "delta", "true"):
        impl = f"pallas:interpret=false:fuse={fuse}{options}"
        loss = lambda *a: jnp.sum(selective_scan(*a, **extras, impl=impl)[0] ** 2)
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*x[:5]).lower(lowering_platforms=("cuda",)).as_text()
        # Each kernel's serialized IR names an instruction once, however often it is used.
        assert text.count("xla.gpu.triton") == 4
        assert text.count("ex2.approx") == (4 if approx else 0)
        assert (text.count("__nv_expf") == 0) == approx
        assert text.count("lg2.approx") == (4 if approx and fuse != "false" else 0)


@pytest.mark.slow  # a spy on the kernels' inputs through a whole interpreted forward and backward
def test_forward_kernels_read_b_and_c_in_fp32_and_the_backward_in_their_dtype(monkeypatch):
    """XLA converts B and C to fp32 for the forward's kernels (segment sums and pass 2);
    the backward reads them, and writes its partials, in their own dtype. bf16 -> fp32 is
    exact, so the results match the kernels' fp32 arithmetic on the bf16 values."""
    import biomamba_jax.model.scan_pallas as scan_pallas

    seen = []
    call = scan_pallas._call
    monkeypatch.setattr(scan_pallas, "_call", lambda kernel, out, grid, plan, warps, args: seen.append(
        (kernel.func.__name__, [a.dtype for a in args[:5]])) or call(kernel, out, grid, plan, warps, args))
    x = recurrence_inputs(6, 1, 32, 8, 4)
    bf16 = lambda t: t.astype(jnp.bfloat16)
    args = (bf16(x[0]), x[1], x[2], bf16(x[3]), bf16(x[4]), x[5])
    loss = lambda *a: jnp.sum(pallas_scan(*a, _tiling_overrides=SEGMENTED)[0].astype(jnp.float32) ** 2)
    jax.value_and_grad(loss, argnums=(0, 1, 3, 4))(*args)
    dtypes = dict(seen)
    assert set(dtypes) == {"_segment_end_kernel", "_forward_kernel", "_segment_start_adjoint_kernel",
                           "_backward_kernel"}
    assert dtypes["_segment_end_kernel"][3] == jnp.float32
    assert dtypes["_forward_kernel"][3:5] == [jnp.float32, jnp.float32]
    assert dtypes["_backward_kernel"][3:5] == [jnp.bfloat16, jnp.bfloat16]


def _reductions(jaxpr):
    """Input shapes of every reduce_sum in a jaxpr, nested jaxprs included (the kernels'
    own bodies excepted: they are not XLA's)."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum":
            shapes.append(eqn.invars[0].aval.shape)
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(inner, "jaxpr") and hasattr(inner.jaxpr, "eqns"):
                    shapes += _reductions(inner.jaxpr)
                elif hasattr(inner, "eqns"):
                    shapes += _reductions(inner)
    return shapes


@pytest.mark.slow  # a spy on the kernels' inputs through a whole interpreted forward and backward
def test_segment_decays_come_from_the_pass_one_kernels_not_a_second_read_of_delta():
    """The segment sum kernels write each segment's delta total; XLA used to sum the fp32
    (B, L, E) delta once more for the segment decays, forward and backward."""
    batch, length, channels = 1, 64, 8
    x = recurrence_inputs(2, batch, length, channels, 4)
    scan = functools.partial(pallas_scan, _tiling_overrides=dict(SEGMENTED, segments=4, bwd_segments=4))

    def loss(*a):  # no (B, L, E) reduction of its own: the last step's y and the final state
        y, final = scan(*a)
        return jnp.sum(y[:, -1]) + jnp.sum(final)

    for fn in (scan, jax.grad(loss, argnums=(0, 1))):
        shapes = _reductions(jax.make_jaxpr(fn)(*x).jaxpr)
        big = [s for s in shapes if np.prod(s) >= batch * length * channels and channels in s]
        assert not big, f"XLA reduces a (B, L, E)-sized array: {big}"
    assert_matches_reference(scan, x)


@pytest.mark.parametrize("length,segmented", [(6, False), (64, True)])
def test_default_fuses_the_delta_only_where_the_sequence_is_split(monkeypatch, pallas_tiling, length, segmented):
    """fuse=auto (the default) is fuse=delta where the forward runs in segments and
    fuse=false elsewhere."""
    import biomamba_jax.model.scan_pallas as scan_pallas
    from biomamba_jax.model.scan import selective_scan

    fusions = []
    run = scan_pallas._run
    monkeypatch.setattr(scan_pallas, "_run", lambda *a, **k: fusions.append(a[9]) or run(*a, **k))
    x = recurrence_inputs(0, 1, length, 8, 2)
    extras = dict(D=jnp.ones(8), z=x[0], delta_bias=jnp.zeros(8), delta_softplus=True)
    pallas_tiling(**SEGMENTED)
    selective_scan(*x[:5], **extras, impl="pallas")
    delta_only = scan_pallas._Fusion(bias=True, softplus=True)
    assert fusions == ([delta_only] if segmented else [scan_pallas._Fusion()])
    assert PallasOptions().fuse == "auto"
