"""Packed documents kept apart: document resets through every scan impl and the model.

A row of packed documents with `segment_ids` must give each document the logits and the
gradients it would get alone (`MambaConfig.reset_at_documents`): the conv reads no input
of an earlier document and the scan state restarts at each document's first token. The
Pallas kernels run in the interpreter, with tilings small enough that boundaries fall
inside a chunk, on a chunk edge, on a segment edge, inside and on the edge of the
segment sums' tiles, and at position 0.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import recurrence_inputs, rel_err

from biomamba_jax.model import scan
from biomamba_jax.model.config import ConfigError, MambaConfig
from biomamba_jax.model.mamba import MambaLM, MambaMixer, document_resets
from biomamba_jax.model.scan import associative_scan, reference_scan, selective_scan
from biomamba_jax.model.scan_chunked import chunked_scan
from biomamba_jax.model.scan_pallas import pallas_scan, pallas_selective_scan

# Chunks of 4 steps; the sequence split into 4 segments of 12 steps (L = 48, or 45 padded
# to 48); the segment sums in tiles of 2 steps.
SEGMENTED = dict(chunk=4, block_e=8, bwd_block_e=4, segments=4, bwd_segments=2, sum_tile=2)
# Row 0's document starts: position 0 (the initial state dropped), the last step of a chunk
# (3), a chunk edge (4) whose document is one token long (5 starts the next), segment edges
# (12, 24, and 24 is also the backward's one segment edge), inside a sum tile (31) and the
# last step of a 45-step row (44).
HAND_PLACED = (0, 3, 4, 5, 12, 24, 31, 44)


def packed_resets(length, seed=0):
    """Row 0 at the hand-placed starts, row 1 at random ones (about one step in six)."""
    random_row = np.random.RandomState(seed).rand(length) < 0.17
    hand_row = np.zeros(length, bool)
    hand_row[[t for t in HAND_PLACED if t < length]] = True
    return jnp.asarray(np.stack([hand_row, random_row]))


def per_document_scan(x, resets):
    """The oracle, in numpy: the recurrence step by step, its state zeroed at each document's
    first token (the first document starts from h0 unless position 0 is a reset)."""
    u, delta, A, B, C, h0 = (np.asarray(a, np.float64) for a in x)
    resets = np.asarray(resets)
    y = np.zeros(u.shape)
    finals = []
    for row in range(u.shape[0]):
        h = h0[row]
        for t in range(u.shape[1]):
            if resets[row, t]:
                h = np.zeros_like(h)
            h = np.exp(delta[row, t][:, None] * A) * h + (delta[row, t] * u[row, t])[:, None] * B[row, t][None, :]
            y[row, t] = h @ C[row, t]
        finals.append(h)
    return y, np.stack(finals)


def test_document_resets_from_segment_ids():
    segment_ids = jnp.asarray([[1, 1, 2, 3, 3, 3, 4, 0, 0],  # a one-token document, then end padding
                               [0, 0, 1, 1, 1, 2, 2, 2, 2],  # left padding
                               [1, 1, 1, 1, 1, 1, 1, 1, 1]])  # one document: no resets
    expected = [[0, 0, 1, 1, 0, 0, 1, 0, 0],
                [0, 0, 1, 0, 0, 1, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert document_resets(segment_ids).tolist() == np.asarray(expected, bool).tolist()


def test_reference_with_resets_is_each_document_alone():
    """The definition every other impl is held to, with an initial state, a reset at
    position 0 in one row (which drops h0 and its gradient) and not in the other, and
    one-token documents."""
    x = recurrence_inputs(0, 2, 45, 5, 3)
    resets = packed_resets(45)
    y, final = jax.jit(functools.partial(reference_scan, resets=resets))(*x)
    y_alone, final_alone = per_document_scan(x, resets)
    assert rel_err(y, y_alone) < 1e-6 and rel_err(final, final_alone) < 1e-6
    grad_h0 = jax.jit(jax.grad(lambda h0: jnp.sum(reference_scan(*x[:5], h0, resets=resets)[0] ** 2)))(x[5])
    assert float(jnp.abs(grad_h0[0]).max()) == 0.0 and float(jnp.abs(grad_h0[1]).max()) > 0.0


IMPLS = {
    "associative": associative_scan,
    "chunked": functools.partial(chunked_scan, chunk=4),
    "chunked-sequential": functools.partial(chunked_scan, chunk=4, inner="sequential"),
    "pallas": functools.partial(pallas_scan, _tiling_overrides=dict(chunk=4, block_e=8, bwd_block_e=4)),
    "pallas-segmented": functools.partial(pallas_scan, _tiling_overrides=SEGMENTED),
}
# The slowest to compile or interpret on a CPU, each covered again below: the Pallas tilings
# by the model test, "pallas-segmented" with an initial state and padding also by the fused
# kernels' test, the associative step (chunked's inner scan) by "chunked".
SLOW_IMPLS = ("associative", "chunked-sequential", "pallas", "pallas-segmented")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_IMPLS else n for n in IMPLS])
def test_every_impl_matches_reference_with_resets_values_and_grads(name):
    """L = 45 pads to whole chunks and segments; the padding must start no document."""
    x = recurrence_inputs(1, 2, 45, 8, 4)
    resets = packed_resets(45)
    w = jax.random.normal(jax.random.PRNGKey(9), x[0].shape)

    def loss(fn):
        def value(*args):
            y, final = fn(*args, resets=resets)
            return jnp.sum(y * w) + jnp.sum(final ** 2)
        return value

    fn = IMPLS[name]
    y, final = jax.jit(functools.partial(fn, resets=resets))(*x)
    y_ref, final_ref = reference_scan(*x, resets=resets)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5
    grads = jax.jit(jax.grad(loss(fn), argnums=tuple(range(6))))(*x)
    grads_ref = jax.grad(loss(reference_scan), argnums=tuple(range(6)))(*x)
    for arg, g, g_ref in zip(("u", "delta", "A", "B", "C", "h0"), grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5, arg


@pytest.fixture
def pallas_tiling(monkeypatch):
    """selective_scan's "pallas" impl runs with these tiling overrides."""

    def use(**overrides):
        monkeypatch.setitem(scan.FUSED_SCAN_IMPLS, "pallas",
                            functools.partial(pallas_selective_scan, _tiling_overrides=overrides))

    return use


@pytest.mark.parametrize("fuse", [pytest.param("false", marks=pytest.mark.slow),
                                  pytest.param("delta", marks=pytest.mark.slow), "true"])
def test_selective_scan_with_resets_and_a_mask_through_the_fused_kernels(fuse, pallas_tiling):
    """The kernels doing the bias and softplus (and D and the gate) take resets as the plain
    ones do; padding (masked) and resets together. (fuse=false and fuse=delta also run in
    the model test below, as fuse=auto.)"""
    batch, length, channels, d_state = 2, 45, 8, 4
    k = jax.random.split(jax.random.PRNGKey(5), 9)
    u, delta, z = (jax.random.normal(k[i], (batch, length, channels)) for i in range(3))
    B, C = (jax.random.normal(k[i], (batch, length, d_state)) for i in (3, 4))
    A = -jnp.exp(jax.random.normal(k[5], (channels, d_state)) * 0.5)
    D, bias = jax.random.normal(k[6], (channels,)), jax.random.normal(k[7], (channels,)) * 0.3
    h0 = jax.random.normal(k[8], (batch, channels, d_state))
    mask = jnp.ones((batch, length)).at[1, :6].set(0).at[0, 40:].set(0)
    resets = packed_resets(length, seed=3)
    w = jax.random.normal(jax.random.PRNGKey(1), (batch, length, channels))
    pallas_tiling(**SEGMENTED)

    def loss(impl, *args):
        y, final = selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True,
                                  initial_state=args[8], return_final_state=True, mask=mask, resets=resets,
                                  impl=impl)
        return jnp.sum(y * w) + jnp.sum(final ** 2)

    args = (u, delta, A, B, C, D, z, bias, h0)
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, f"pallas:fuse={fuse}"),
                                              argnums=tuple(range(9))))(*args)
    ref_value, ref_grads = jax.value_and_grad(functools.partial(loss, "reference"), argnums=tuple(range(9)))(*args)
    assert abs(float(value) - float(ref_value)) < 1e-5 * abs(float(ref_value))
    for name, g, g_ref in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"), grads, ref_grads):
        assert rel_err(g, g_ref) < 1e-5, name


def test_resets_must_be_batch_by_length():
    u, B = jnp.ones((2, 6, 4)), jnp.ones((2, 6, 2))
    with pytest.raises(ValueError, match=r"resets \(2, 5\) must be \(batch, length\) = \(2, 6\)"):
        selective_scan(u, u, -jnp.ones((4, 2)), B, B, resets=jnp.zeros((2, 5), bool), impl="reference")


def test_without_resets_the_kernels_take_no_resets_input(monkeypatch):
    """resets=None: the kernels' argument lists are those of a build without the feature."""
    from biomamba_jax.model import scan_pallas

    counts = {}
    call = scan_pallas._call

    def counting_call(kernel, out_shape, grid, plan, num_warps, args):
        counts[(kernel.func.__name__, plan.resets)] = len(args)
        return call(kernel, out_shape, grid, plan, num_warps, args)

    monkeypatch.setattr(scan_pallas, "_call", counting_call)
    x = recurrence_inputs(6, 1, 32, 8, 4)
    def loss(resets, *args):
        return jnp.sum(pallas_scan(*args, resets=resets, _tiling_overrides=SEGMENTED)[0] ** 2)

    for resets in (None, jnp.zeros((1, 32), bool).at[0, 9].set(True)):
        jax.make_jaxpr(jax.grad(functools.partial(loss, resets), argnums=(0, 1)))(*x)  # tracing calls every kernel
    kernels = ("_segment_end_kernel", "_forward_kernel", "_segment_start_adjoint_kernel", "_backward_kernel")
    for kernel in kernels:
        assert counts[(kernel, True)] == counts[(kernel, False)] + 1, kernel


def test_kernels_with_resets_lower_for_cuda():
    """The four kernels with resets (scalar per-step loads, reset counts in the segment
    sums) go through the Triton lowering, which the interpreter does not exercise."""
    x = recurrence_inputs(0, 1, 64, 16, 16)
    resets = jnp.zeros((1, 64), bool).at[0, 5].set(True)
    scan_fn = functools.partial(pallas_scan, resets=resets, interpret=False, _tiling_overrides=dict(segments=2))
    loss = lambda *a: jnp.sum(scan_fn(*a)[0] ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(*x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 4


# ------------------------------------------------------------------------ model
def tiny_config(**changes):
    return MambaConfig(d_model=16, n_layer=1, vocab_size=64, d_state=4, dtype="float32", remat="none", **changes)


@functools.lru_cache(maxsize=None)
def _tiny_weights():
    return jax.jit(lambda: nnx.state(MambaLM(tiny_config(), rngs=nnx.Rngs(0))))()


def tiny_model(config):
    """(graphdef, state) of a tiny model with `config`'s run-time settings: the weights are
    made once, compiled (eager initialisation took most of a small test's time), and shared."""
    return nnx.graphdef(nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0)))), _tiny_weights()


# Two packed rows of 48 tokens: documents start at the hand-placed positions (row 0; position
# 0 is every row's first document) and at random ones (row 1), with one-token documents.
LENGTH = 48


def packed_rows(seed=0):
    resets = np.array(packed_resets(LENGTH, seed))
    resets[:, 0] = False
    segment_ids = 1 + np.cumsum(resets, axis=1)
    ids = np.random.RandomState(seed).randint(1, 64, (2, LENGTH))
    return jnp.asarray(ids), jnp.asarray(segment_ids)


def documents_alone(ids, segment_ids):
    """Every document of the packed rows as a row of its own, right-padded (the mask keeps
    padding out of the state, and a document's logits never see what follows it)."""
    spans = [(row, np.flatnonzero(np.asarray(segment_ids[row]) == s)) for row in range(ids.shape[0])
             for s in np.unique(np.asarray(segment_ids[row]))]
    longest = max(len(span) for _, span in spans)
    alone_ids = np.zeros((len(spans), longest), np.int32)
    mask = np.zeros((len(spans), longest), np.int32)
    for index, (row, span) in enumerate(spans):
        alone_ids[index, :len(span)] = np.asarray(ids[row])[span]
        mask[index, :len(span)] = 1
    return jnp.asarray(alone_ids), jnp.asarray(mask), spans


def loss_weights(config):
    return jax.random.normal(jax.random.PRNGKey(1), (2, LENGTH, config.vocab_size))


def packed_logits_and_grads(config):
    """Logits of `packed_rows()` and the gradients of every parameter of a loss on them."""
    graphdef, params = tiny_model(config)
    ids, segment_ids = packed_rows()

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, segment_ids=segment_ids)
        return jnp.sum(logits * loss_weights(config)), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    return logits, grads


@functools.lru_cache(maxsize=None)
def alone_logits_and_grads():
    """The same from each document of `packed_rows()` alone, scattered back to its packed
    positions: what every impl's packed rows must give. Run once, through the reference scan
    (test_scan and test_scan_kernels hold every impl to it on rows of one document)."""
    config = tiny_config(scan_impl="reference")
    graphdef, params = tiny_model(config)
    alone_ids, mask, spans = documents_alone(*packed_rows())
    rows = np.concatenate([np.full(len(span), row) for row, span in spans])
    positions = np.concatenate([span for _, span in spans])
    alone_rows = np.concatenate([np.full(len(span), index) for index, (_, span) in enumerate(spans)])
    alone_positions = np.concatenate([np.arange(len(span)) for _, span in spans])

    def loss(params):
        logits = nnx.merge(graphdef, params)(alone_ids, mask)
        logits = jnp.zeros((2, LENGTH, config.vocab_size)).at[rows, positions].set(logits[alone_rows, alone_positions])
        return jnp.sum(logits * loss_weights(config)), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    return logits, grads


def assert_same_logits_and_grads(packed, alone, tolerance):
    (logits, grads), (logits_alone, grads_alone) = packed, alone
    assert rel_err(logits, logits_alone) < tolerance
    flat, flat_alone = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_alone)
    assert len(flat) == len(flat_alone) >= 11  # every parameter of a one-layer model
    for (path, g), g_alone in zip(flat, flat_alone):
        assert rel_err(g, g_alone) < tolerance, jax.tree_util.keystr(path)


@pytest.mark.parametrize("impl,tiling", [
    ("reference", None), pytest.param("associative", None, marks=pytest.mark.slow),
    pytest.param("chunked:chunk=4", None, marks=pytest.mark.slow),  # chunk edges: the scan test above
    ("pallas", dict(chunk=4, block_e=8, bwd_block_e=8)),  # one program walks the whole row
    ("pallas", SEGMENTED),  # segment edges at 12, 24, 36; fuse=auto is fuse=delta here
])
def test_packed_row_gives_each_document_its_own_logits_and_gradients(impl, tiling, pallas_tiling):
    if tiling is not None:
        pallas_tiling(**tiling)
    assert_same_logits_and_grads(packed_logits_and_grads(tiny_config(scan_impl=impl)), alone_logits_and_grads(), 1e-4)


def test_without_resets_a_packed_row_is_one_stream():
    """reset_at_documents=False (mamba_ssm's way): documents see the ones before them, so a
    packed row's logits and gradients are not those of its documents alone."""
    logits, _ = packed_logits_and_grads(tiny_config(scan_impl="reference", reset_at_documents=False))
    assert rel_err(logits, alone_logits_and_grads()[0]) > 1e-2


def run_model(graphdef, state, ids, segment_ids):
    return nnx.merge(graphdef, state)(ids, segment_ids=segment_ids)


def test_a_row_of_one_document_or_with_the_switch_off_is_a_row_without_segment_ids():
    ids, segment_ids = packed_rows()
    logits = {}
    for name, config, segments in (("plain", tiny_config(), None), ("one document", tiny_config(), jnp.ones_like(ids)),
                                   ("switch off", tiny_config(reset_at_documents=False), segment_ids)):
        graphdef, state = tiny_model(config.replace(scan_impl="chunked:chunk=4"))
        logits[name] = jax.jit(functools.partial(run_model, graphdef))(state, ids, segments)
    assert rel_err(logits["one document"], logits["plain"]) == 0.0
    assert rel_err(logits["switch off"], logits["plain"]) == 0.0


def test_mixer_cache_after_a_packed_row_is_the_last_documents_own():
    """The conv window and SSM state a next token would see hold only the last document."""
    model_graphdef, state = tiny_model(tiny_config(scan_impl="reference"))
    layer = nnx.merge(model_graphdef, state).decode_weights().layers[0]
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MambaMixer(tiny_config(scan_impl="reference"), rngs=nnx.Rngs(0))))
    mixer = jax.jit(lambda hidden, resets: nnx.merge(graphdef, layer["mixer"])(hidden, resets=resets,
                                                                               return_cache=True))
    hidden = jax.random.normal(jax.random.PRNGKey(3), (1, 12, 16))
    resets = jnp.zeros((1, 12), bool).at[0, 4].set(True).at[0, 10].set(True)
    out, (conv_state, ssm_state) = mixer(hidden, resets)
    out_last, (conv_last, ssm_last) = mixer(hidden[:, 10:], None)
    assert rel_err(out[:, 10:], out_last) < 1e-6
    assert rel_err(conv_state, conv_last) < 1e-6 and rel_err(ssm_state, ssm_last) < 1e-6


# -------------------------------------------------------------- config and training
def test_switch_defaults_on_is_checked_and_reaches_run_configs():
    from biomamba_jax.training.config import load_run_config

    assert MambaConfig().reset_at_documents is True
    assert load_run_config("smoke").model.reset_at_documents is True
    assert load_run_config("smoke", overrides=["model.reset_at_documents=false"]).model.reset_at_documents is False
    with pytest.raises(ConfigError, match="reset_at_documents must be true or false"):
        MambaConfig(reset_at_documents="yes")
    assert MambaConfig.from_dict(tiny_config(reset_at_documents=False).to_dict()).reset_at_documents is False


def test_pretraining_batches_carry_segment_ids_to_the_loss():
    """Loader rows -> step batch with the inputs' segment ids, which the loss gives the model."""
    from biomamba_jax.training.pretrain import _packed_rows_to_step_batch
    from biomamba_jax.training.step import token_loss_sums

    tokens = np.random.RandomState(0).randint(1, 64, (2, 17)).astype(np.int32)
    loader_segments = np.repeat([[1, 2, 3, 4]], 2, axis=0).repeat([4, 5, 4, 4], axis=1).astype(np.int32)
    batch = _packed_rows_to_step_batch({"tokens": tokens, "segment_ids": loader_segments}, with_attention_mask=False)
    assert batch["segment_ids"].tolist() == loader_segments[:, :-1].tolist()
    graphdef, params = tiny_model(tiny_config(scan_impl="reference"))
    loss_sum, count = jax.jit(functools.partial(token_loss_sums, graphdef))(params, batch)

    @jax.jit
    def expected_loss(params, segment_ids):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1], segment_ids=segment_ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).sum()

    expected = expected_loss(params, batch["segment_ids"])
    assert abs(float(expected_loss(params, None)) - float(expected)) > 1e-3 * float(expected)  # they count
    assert float(count) == 32 and abs(float(loss_sum) - float(expected)) < 1e-5 * float(expected)
