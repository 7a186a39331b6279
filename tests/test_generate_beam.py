"""Beam search over the recurrent cache: beam 1 is greedy, beams come out sorted by their
true total log-probability, and repeated calls do not retrace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from biomamba_jax.model.beam import _beam_search_jit, beam_search
from biomamba_jax.model.config import MambaConfig
from biomamba_jax.model.generate import generate, left_pad
from biomamba_jax.model.mamba import MambaLM


@pytest.fixture(scope="module")
def model():
    config = MambaConfig.preset("tiny", vocab_size=48, dtype="float32", scan_impl="reference", remat="none")
    return MambaLM(config, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def prompts():
    return left_pad([[5, 9, 11, 2, 7], [3, 4]], pad_token_id=0)


def test_beam_one_equals_greedy(model, prompts):
    ids, mask = prompts
    greedy = generate(model, ids, mask, max_new_tokens=8, eos_token_id=None)
    beams = beam_search(model, ids, mask, num_beams=1, max_new_tokens=8, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(beams.tokens[:, 0]), np.asarray(greedy.tokens))


def _sequence_log_prob(model, prompt, new_tokens):
    tokens = jnp.asarray([list(prompt) + list(new_tokens)], jnp.int32)
    log_probs = jax.nn.log_softmax(model(tokens[:, :-1]).astype(jnp.float32), axis=-1)[0]
    positions = np.arange(len(prompt) - 1, tokens.shape[1] - 1)
    return float(jnp.sum(log_probs[positions, tokens[0, len(prompt):]]))


def test_beams_sorted_by_their_true_total_log_prob(model, prompts):
    ids, mask = prompts
    out = beam_search(model, ids, mask, num_beams=4, max_new_tokens=5, eos_token_id=None)
    scores = np.asarray(out.scores)
    assert np.all(np.diff(scores, axis=1) <= 0)
    for row in range(2):
        prompt = ids[row][mask[row] == 1]
        assert len({tuple(t) for t in np.asarray(out.tokens[row]).tolist()}) == 4  # distinct beams
        for beam in range(4):
            expected = _sequence_log_prob(model, prompt, np.asarray(out.tokens[row, beam]))
            assert scores[row, beam] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # The best beam is at least as likely as greedy decoding.
    greedy = generate(model, ids, mask, max_new_tokens=5, eos_token_id=None)
    assert scores[0, 0] >= _sequence_log_prob(model, ids[0][mask[0] == 1], np.asarray(greedy.tokens[0])) - 1e-4


def test_stop_tokens_end_beams_and_calls_do_not_retrace(model, prompts):
    ids, mask = prompts
    stops = np.zeros(48, bool)
    stops[::2] = True  # every even token ends a beam
    first = beam_search(model, ids, mask, num_beams=3, max_new_tokens=6, eos_token_id=None, stop_mask=stops)
    compiled = _beam_search_jit._cache_size()
    beam_search(model, ids + 1, mask, num_beams=3, max_new_tokens=6, eos_token_id=None, stop_mask=stops)
    assert _beam_search_jit._cache_size() == compiled
    tokens, lengths = np.asarray(first.tokens), np.asarray(first.lengths)
    for row in range(2):
        for beam in range(3):
            produced = tokens[row, beam, :lengths[row, beam]]
            assert all(t % 2 for t in produced[:-1])  # nothing after a stop token
            assert np.all(tokens[row, beam, lengths[row, beam]:] == 0)


def test_precast_weights_and_unrolled_layers_give_identical_bf16_steps():
    """The decode loop's speed-ups change nothing: kernels cast to bf16 once before the
    loop, per-layer weights and the tied output matrix prepared once (`decode_weights`),
    and the layer loop unrolled (cache updated in place) give the bits of the plain step."""
    from biomamba_jax.model.generate import matmul_weights_in_compute_dtype

    config = MambaConfig.preset("tiny", vocab_size=48, dtype="bfloat16", scan_impl="reference")
    bf16_model = MambaLM(config, rngs=nnx.Rngs(4))
    graphdef, state = nnx.split(bf16_model)
    precast = matmul_weights_in_compute_dtype(state, jnp.bfloat16)
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(precast) if "kernel" in jax.tree_util.keystr(path)]
    assert kernels and all(k.dtype == jnp.bfloat16 for k in kernels)
    assert nnx.merge(graphdef, precast).layers.mixer.A_log[...].dtype == jnp.float32

    _, cache = bf16_model.prefill(jnp.asarray([[5, 9, 11, 2]]))
    token = jnp.asarray([7])
    def step(state, unroll, prepared):
        model = nnx.merge(graphdef, state)
        return model.step(token, cache, unroll_layers=unroll, weights=model.decode_weights() if prepared else None)

    step = jax.jit(step, static_argnums=(1, 2))
    reference_logits, reference_cache = step(state, False, False)
    for candidate_state, unroll, prepared in (
        (precast, False, False), (precast, True, False), (state, True, False), (precast, True, True),
    ):
        logits, new_cache = step(candidate_state, unroll, prepared)
        # The per-layer cache form a decode loop carries comes back per layer, with the same
        # logits and the state equal up to fp32 rounding (XLA fuses the two programs apart).
        per_layer_logits, per_layer_cache = jax.jit(
            lambda s, c: nnx.merge(graphdef, s).step(token, c, unroll_layers=unroll),
        )(candidate_state, cache.per_layer())
        assert isinstance(per_layer_cache.ssm_state, tuple) and len(per_layer_cache.ssm_state) == config.n_layer
        np.testing.assert_array_equal(np.asarray(per_layer_logits, np.float32), np.asarray(logits, np.float32))
        ours, expected = np.asarray(per_layer_cache.stacked().ssm_state), np.asarray(new_cache.ssm_state)
        assert np.linalg.norm(ours - expected) <= 1e-6 * np.linalg.norm(expected)
        np.testing.assert_array_equal(np.asarray(logits, np.float32), np.asarray(reference_logits, np.float32))
        np.testing.assert_array_equal(np.asarray(new_cache.ssm_state), np.asarray(reference_cache.ssm_state))
        np.testing.assert_array_equal(np.asarray(new_cache.conv_state, np.float32),
                                      np.asarray(reference_cache.conv_state, np.float32))


def test_prefill_of_the_last_logits_only_matches_and_needs_far_less_memory():
    """What generation and beam search prefill with: the last position's logits, equal to the
    full prefill's, without the (B, L, V) logits that dominate a long prompt's memory."""
    config = MambaConfig.preset("tiny", vocab_size=4096, dtype="float32", scan_impl="chunked", remat="none")
    graphdef, state = nnx.split(MambaLM(config, rngs=nnx.Rngs(0)))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 4096, (1, 1024)))
    prefills = {last: jax.jit(lambda s, i, last=last: nnx.merge(graphdef, s).prefill(i, last_logits_only=last))
                for last in (False, True)}
    (full, full_cache), (last, last_cache) = prefills[False](state, ids), prefills[True](state, ids)
    assert last.shape == (1, 1, 4096)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(last_cache)):
        np.testing.assert_array_equal(a, b)

    def footprint(fn):
        memory = fn.lower(state, ids).compile().memory_analysis()
        return memory.temp_size_in_bytes + memory.output_size_in_bytes

    full_logits_bytes = 1024 * 4096 * 4
    assert footprint(prefills[True]) < footprint(prefills[False]) - full_logits_bytes * 0.9
