"""The LM-head cross entropy without full logits (training/cross_entropy.py): values and
gradients against the plain softmax over all logits, its memory, and the train step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import rel_err

from biomamba_jax.training.cross_entropy import (lm_head_cross_entropy, resolve_loss_impl, tokamax_available,
                                                 tokamax_cross_entropy)


def _problem(tokens=37, d_model=16, vocab=101, seed=0, fractional=False):
    """hidden (T, D), head (V, D), targets (T,), weights (T,): a 0/1 mask with about a third
    left out, or weights in [0, 2) with a few exact zeros."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(k[0], (tokens, d_model))
    head = 0.5 * jax.random.normal(k[1], (vocab, d_model))
    targets = jax.random.randint(k[2], (tokens,), 0, vocab)
    draw = jax.random.uniform(k[3], (tokens,))
    weights = jnp.where(draw > 0.3, 2 * draw if fractional else 1.0, 0.0)
    return hidden, head, targets, weights


def _full_loss(hidden, head, targets, weights, dtype=jnp.float32):
    """The plain loss: logits in `dtype` (as the model's LM head), softmax in fp32."""
    logits = hidden.astype(dtype) @ head.astype(dtype).T
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets) * weights)


def _exact_loss(hidden, head, targets, weights, dtype):
    """The loss of the inputs as read in `dtype`, every step after that in fp32."""
    as_read = lambda x: x.astype(dtype).astype(jnp.float32)
    return _full_loss(as_read(hidden), as_read(head), targets, weights)


def _value_and_grads(loss, *args):
    """The loss and its gradient in every argument."""
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))(*args)


# 37 tokens: a ragged last chunk, one whole chunk, a chunk longer than the tokens.
@pytest.mark.parametrize("chunk_tokens, fractional", [(8, True), (37, False), (64, False)])
def test_chunked_loss_and_gradients_equal_the_full_loss_in_fp32(chunk_tokens, fractional):
    hidden, head, targets, weights = _problem(fractional=fractional)
    chunked = lambda h, w, m: lm_head_cross_entropy(h, w, targets, m, impl="chunked", chunk_tokens=chunk_tokens)
    full = lambda h, w, m: _full_loss(h, w, targets, m)
    value, (d_hidden, d_head, d_weights) = _value_and_grads(chunked, hidden, head, weights)
    ref_value, (ref_hidden, ref_head, ref_weights) = _value_and_grads(full, hidden, head, weights)
    assert value.dtype == jnp.float32 and rel_err(value, ref_value) < 1e-5
    assert rel_err(d_hidden, ref_hidden) < 1e-4 and rel_err(d_head, ref_head) < 1e-4
    # Left-out tokens have no gradient at all.
    assert np.all(np.asarray(d_hidden)[np.asarray(weights) == 0] == 0)
    # The loss is linear in the weights; their gradient is each token's loss.
    assert rel_err(d_weights, ref_weights) < 1e-5


def test_chunked_gradients_follow_the_loss_cotangent():
    """The forward pass computes the gradients of the loss sum; the backward scales them."""
    hidden, head, targets, weights = _problem(tokens=9, vocab=13)
    chunked = lambda h, w, m: -2.5 * lm_head_cross_entropy(h, w, targets, m, chunk_tokens=4)
    full = lambda h, w, m: -2.5 * _full_loss(h, w, targets, m)
    for got, want in zip(jax.tree.leaves(_value_and_grads(chunked, hidden, head, weights)),
                         jax.tree.leaves(_value_and_grads(full, hidden, head, weights))):
        assert rel_err(got, want) < 1e-5


def test_chunked_loss_in_bf16_accumulates_in_fp32():
    """Matmuls read bf16 and accumulate in fp32: the value is the exact loss of the
    bf16-rounded inputs to fp32 rounding; the gradients' matmuls read d(logits) in bf16 as
    the plain loss's backward does (about 3 significant digits). The plain loss also rounds
    its logits to bf16, so it is the further of the two from the exact value."""
    hidden, head, targets, weights = _problem(tokens=200, d_model=64, vocab=512, seed=1)
    chunked = lambda h, w: lm_head_cross_entropy(h, w, targets, weights, dtype=jnp.bfloat16, chunk_tokens=64)
    value, (d_hidden, d_head) = _value_and_grads(chunked, hidden, head)
    exact_value, (exact_hidden, exact_head) = _value_and_grads(
        lambda h, w: _exact_loss(h, w, targets, weights, jnp.bfloat16), hidden, head)
    assert d_hidden.dtype == d_head.dtype == jnp.float32  # the inputs' dtype
    assert rel_err(value, exact_value) < 1e-5
    assert rel_err(d_hidden, exact_hidden) < 1e-2 and rel_err(d_head, exact_head) < 1e-2
    plain_value = _full_loss(hidden, head, targets, weights, jnp.bfloat16)
    assert rel_err(value, exact_value) < rel_err(plain_value, exact_value) < 1e-2
    # Inputs already in bf16: gradients come back in bf16.
    bf16 = lambda x: x.astype(jnp.bfloat16)
    _, grads = _value_and_grads(chunked, bf16(hidden), bf16(head))
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    assert rel_err(grads[0], exact_hidden) < 2e-2 and rel_err(grads[1], exact_head) < 2e-2


def test_chunked_loss_compiles_to_a_fraction_of_the_full_loss_memory():
    """The point of the feature, from XLA's own buffer assignment: for 2k tokens and a 50k
    vocabulary the plain loss and its gradient hold (T, V) fp32 logits-sized temporaries
    (400 MB each); the chunked one only (chunk, V) ones."""
    tokens, d_model, vocab, chunk_tokens = 2048, 64, 50_000, 256
    shapes = (jax.ShapeDtypeStruct((tokens, d_model), jnp.float32), jax.ShapeDtypeStruct((vocab, d_model), jnp.float32),
              jax.ShapeDtypeStruct((tokens,), jnp.int32), jax.ShapeDtypeStruct((tokens,), jnp.float32))

    def temp_bytes(loss):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = temp_bytes(_full_loss)
    chunked = temp_bytes(lambda h, w, t, m: lm_head_cross_entropy(h, w, t, m, chunk_tokens=chunk_tokens))
    logits_bytes, chunk_logits_bytes = tokens * vocab * 4, chunk_tokens * vocab * 4
    assert full >= logits_bytes
    assert chunked <= 3 * chunk_logits_bytes and chunked * 4 < full


def _tokamax_stand_in(calls):
    """A function with `tokamax.linear_softmax_cross_entropy_loss`'s contract (x (B, H),
    labels (B,), w (H, V); the plain sum over every token) computed from full logits."""

    def loss_fn(x, labels, w, *, reduction, implementation):
        calls.append(implementation)
        assert reduction == "sum"
        logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss_fn


def test_tokamax_path_applies_a_loss_mask_tokamax_does_not_take():
    """tokamax sums over every token; left-out tokens get a zero hidden row (which adds
    log V to the sum and nothing to the gradients) and log V is taken off again."""
    hidden, head, targets, weights = _problem()
    calls = []
    loss = lambda h, w: tokamax_cross_entropy(h, w, targets, weights, dtype=jnp.float32, kernel="triton",
                                              loss_fn=_tokamax_stand_in(calls))
    value, (d_hidden, d_head) = _value_and_grads(loss, hidden, head)
    ref_value, (ref_hidden, ref_head) = _value_and_grads(lambda h, w: _full_loss(h, w, targets, weights), hidden, head)
    assert calls == ["triton"]
    assert rel_err(value, ref_value) < 1e-5
    assert rel_err(d_hidden, ref_hidden) < 1e-4 and rel_err(d_head, ref_head) < 1e-4


@pytest.mark.skipif(not tokamax_available(), reason="tokamax is not installed here, or has no cross-entropy "
                    "kernel for this backend (it has none for CPUs; released 0.0.12 has only the TPU one)")
def test_tokamax_kernel_equals_the_chunked_loss():
    hidden, head, targets, weights = _problem(tokens=2048, d_model=256, vocab=4096)
    results = {}
    for impl in ("tokamax", "chunked"):
        loss = lambda h, w, impl=impl: lm_head_cross_entropy(h, w, targets, weights, impl=impl, dtype=jnp.bfloat16)
        results[impl] = jax.tree.leaves(_value_and_grads(loss, hidden, head))
    for got, want in zip(results["tokamax"], results["chunked"]):
        assert rel_err(got, want) < 1e-2


def test_auto_resolves_to_chunked_without_tokamax(monkeypatch):
    from biomamba_jax.training import cross_entropy

    assert resolve_loss_impl("full") == "full" and resolve_loss_impl("chunked") == "chunked"
    assert resolve_loss_impl("auto", "cpu") == "chunked"  # tokamax has no CPU kernel
    monkeypatch.setitem(__import__("sys").modules, "tokamax", None)  # as if not installed
    assert not cross_entropy.tokamax_available("gpu") and resolve_loss_impl("auto", "gpu") == "chunked"


def test_bad_arguments_are_named():
    hidden, head, targets, _ = _problem()
    with pytest.raises(ValueError, match="targets"):
        lm_head_cross_entropy(hidden, head, targets[:-1])
    with pytest.raises(ValueError, match="impl='fused'"):
        lm_head_cross_entropy(hidden, head, targets, impl="fused")
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        lm_head_cross_entropy(hidden, head, targets, chunk_tokens=0)


def test_config_checks_the_loss_settings():
    from biomamba_jax.model.config import ConfigError, MambaConfig
    from biomamba_jax.training.config import ModelSection

    with pytest.raises(ConfigError, match="loss_impl"):
        MambaConfig(loss_impl="fused")
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        MambaConfig(loss_chunk_tokens=0)
    assert (ModelSection.loss_impl, ModelSection.loss_chunk_tokens) == (MambaConfig.loss_impl,
                                                                       MambaConfig.loss_chunk_tokens)


def test_an_untied_model_hands_the_loss_its_hidden_states_and_output_matrix():
    """The logits are `model(ids, lm_head=False)` times `output_matrix()` (tied: the train
    step test below)."""
    from flax import nnx

    from biomamba_jax.model.config import MambaConfig
    from biomamba_jax.model.mamba import MambaLM

    config = MambaConfig(d_model=32, n_layer=1, d_state=4, vocab_size=64, dtype="float32", scan_impl="reference",
                         remat="none", tie_embeddings=False)
    model = MambaLM(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)))
    hidden = model(ids, lm_head=False)
    assert hidden.shape == (2, 7, 32) and model.output_matrix().shape == (64, 32)
    assert rel_err(hidden @ model.output_matrix().T, model(ids)) < 1e-6


def test_train_and_eval_steps_give_the_same_loss_and_gradients_chunked_or_full():
    """Padding on the left (attention mask) and a loss mask; 2 x 11 targets in chunks of 4."""
    from flax import nnx

    from biomamba_jax.checkpoints.load import model_params
    from biomamba_jax.model.config import MambaConfig
    from biomamba_jax.model.mamba import MambaLM
    from biomamba_jax.training.step import make_eval_step, make_gradient_fn

    config = MambaConfig(d_model=32, n_layer=1, d_state=4, vocab_size=64, dtype="float32", scan_impl="reference",
                         remat="none", loss_chunk_tokens=4)
    params = model_params(MambaLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(0)
    attention = np.ones((2, 11), np.float32)
    attention[1, :3] = 0
    batch = {"tokens": rng.randint(0, 64, (2, 12)).astype(np.int32), "attention_mask": attention,
             "loss_mask": attention * (rng.rand(2, 11) > 0.2)}
    results = {}
    for loss_impl in ("full", "chunked"):
        graphdef = nnx.graphdef(MambaLM(config.replace(loss_impl=loss_impl), rngs=nnx.Rngs(0)))
        results[loss_impl] = jax.jit(make_gradient_fn(graphdef))(params, jax.tree.map(lambda x: x[None], batch))
        results[loss_impl, "eval"] = jax.jit(make_eval_step(graphdef))(params, batch)
    (full_sum, full_count, full_grads), (loss_sum, count, grads) = results["full"], results["chunked"]
    assert count == full_count == np.sum(batch["loss_mask"]) and rel_err(loss_sum, full_sum) < 1e-5
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        assert rel_err(got, want) < 1e-4
    (eval_sum, eval_count), (full_eval_sum, _) = results["chunked", "eval"], results["full", "eval"]
    assert eval_count == count and rel_err(eval_sum, loss_sum) < 1e-6 and rel_err(eval_sum, full_eval_sum) < 1e-5
