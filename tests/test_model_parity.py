"""Logits, gradients, decoding and generation of the JAX model against transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from biomamba_jax.model.generate import generate, left_pad
from biomamba_jax.checkpoints.load import from_pretrained, model_params, model_from_params
from torch_models import MAMBA_130M_HF, random_hf_mamba
from helpers import rel_err



@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    torch_model = random_hf_mamba(seed=0)
    directory = tmp_path_factory.mktemp("hf_tiny")
    torch_model.save_pretrained(directory)
    return torch_model, from_pretrained(directory, dtype="float32"), directory


@pytest.mark.parametrize("impl", ["reference", "associative"])
def test_tiny_logits_match_transformers(tiny_pair, impl):
    torch_model, _, directory = tiny_pair
    model = from_pretrained(directory, scan_impl=impl, dtype="float32")
    ids = np.random.RandomState(0).randint(0, 256, (3, 19))
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), expected) < 1e-4


def test_mamba_130m_logits_match_transformers(tmp_path):
    torch_model = random_hf_mamba(seed=1, **MAMBA_130M_HF)
    torch_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype="float32")
    ids = np.random.RandomState(1).randint(0, 50277, (1, 12))
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), expected) < 1e-4


def test_gradients_match_torch_autograd(tiny_pair):
    torch_model, model, _ = tiny_pair
    ids = np.random.RandomState(2).randint(0, 256, (2, 15))
    torch_model.zero_grad()
    out = torch_model(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    torch_grads = dict(torch_model.named_parameters())

    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray(ids[:, :-1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(ids[:, 1:])).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert rel_err(loss, out.loss.item()) < 1e-5
    mixer = grads["layers"]["mixer"]
    for layer in range(2):
        prefix = f"backbone.layers.{layer}.mixer."
        pairs = {
            "in_proj.weight": mixer["in_proj"]["kernel"][...][layer].T,
            "A_log": mixer["A_log"][...][layer],
            "dt_proj.weight": mixer["dt_proj"]["kernel"][...][layer].T,
            "dt_proj.bias": mixer["dt_proj"]["bias"][...][layer],
            "conv1d.weight": mixer["conv1d"]["kernel"][...][layer].transpose(2, 1, 0),
            "D": mixer["D"][...][layer],
        }
        for name, jax_grad in pairs.items():
            assert rel_err(jax_grad, torch_grads[prefix + name].grad.numpy()) < 1e-4, prefix + name


def test_step_by_step_decode_equals_full_forward(tiny_pair):
    _, model, _ = tiny_pair
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 256, (2, 12)))
    full = model(ids)
    logits, cache = model.prefill(ids[:, :2])  # shorter than the conv window
    stepped = [logits]
    for t in range(2, 12):
        logits, cache = model.step(ids[:, t], cache)
        stepped.append(logits[:, None])
    assert rel_err(jnp.concatenate(stepped, axis=1), full) < 1e-5


def test_left_padded_rows_equal_rows_alone(tiny_pair):
    _, model, _ = tiny_pair
    rng = np.random.RandomState(4)
    prompts = [list(rng.randint(1, 256, n)) for n in (9, 3, 6)]
    ids, mask = left_pad(prompts)
    batched_logits = model(jnp.asarray(ids), jnp.asarray(mask))
    batched = generate(model, ids, mask, max_new_tokens=8, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        alone_logits = model(jnp.asarray([prompt]))
        assert rel_err(batched_logits[row, -len(prompt):], alone_logits[0]) < 1e-5
        alone = generate(model, [prompt], max_new_tokens=8, eos_token_id=None)
        np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])


def test_greedy_generate_matches_transformers(tiny_pair):
    torch_model, model, _ = tiny_pair
    prompt = np.random.RandomState(5).randint(1, 256, (2, 7))
    with torch.no_grad():
        expected = torch_model.generate(
            torch.tensor(prompt), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
        )[:, 7:].numpy()
    ours = generate(model, prompt, max_new_tokens=20, eos_token_id=None)
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)


def test_generate_stops_at_eos_and_pads(tiny_pair):
    _, model, _ = tiny_pair
    prompt = np.random.RandomState(6).randint(1, 256, (2, 5))
    free = generate(model, prompt, max_new_tokens=6, eos_token_id=None)
    row = [int(t) for t in free.tokens[0]]
    eos = row[2]  # pretend the third greedy token of row 0 is EOS
    stop = row.index(eos) + 1  # greedy output of a random model may repeat it earlier
    stopped = generate(model, prompt, max_new_tokens=6, eos_token_id=eos, pad_token_id=255)
    assert int(stopped.lengths[0]) == stop
    np.testing.assert_array_equal(stopped.tokens[0, :stop], free.tokens[0, :stop])
    assert np.all(np.asarray(stopped.tokens[0, stop:]) == 255)


def test_sampling_controls(tiny_pair):
    from biomamba_jax.model.generate import sample_next_token

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    draw = lambda **kw: np.array([int(sample_next_token(logits, k, **kw)[0]) for k in keys[:200]])
    assert set(draw(temperature=1.0, top_k=2)) <= {0, 1}
    assert set(draw(temperature=1.0, top_p=0.7)) <= {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(draw(temperature=1.0, top_p=0.4)) == {0}
    assert len(set(draw(temperature=1.0))) == 4
    _, model, _ = tiny_pair
    out = generate(model, [[1, 2, 3]], max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9,
                   rng=jax.random.PRNGKey(1), eos_token_id=None)
    assert out.tokens.shape == (1, 5)


def test_generate_compiles_once_per_setting(tiny_pair):
    from biomamba_jax.model.generate import _generate_jit

    _, model, _ = tiny_pair
    generate(model, [[1, 2, 3]], max_new_tokens=4, eos_token_id=None)
    before = _generate_jit._cache_size()
    generate(model, [[4, 5, 6]], max_new_tokens=4, eos_token_id=None)
    assert _generate_jit._cache_size() == before


def test_bf16_compute_keeps_fp32_state_and_params(tiny_pair):
    _, _, directory = tiny_pair
    model = from_pretrained(directory, dtype="bfloat16")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(model_params(model)))
    logits, cache = model.prefill(jnp.asarray([[1, 2, 3, 4]]))
    assert logits.dtype == jnp.bfloat16 and cache.ssm_state.dtype == jnp.float32
    fp32 = from_pretrained(directory, dtype="float32")
    assert rel_err(logits.astype(jnp.float32), fp32(jnp.asarray([[1, 2, 3, 4]]))) < 3e-2


def test_remat_and_scan_impl_do_not_change_values(tiny_pair):
    _, model, _ = tiny_pair
    ids = jnp.asarray(np.random.RandomState(7).randint(0, 256, (2, 10)))
    params = model_params(model)
    for changes in (dict(remat="full"), dict(remat="dots"), dict(remat="scan"), dict(scan_impl="reference")):
        other = model_from_params(model.config.replace(**changes), params)
        assert rel_err(other(ids), model(ids)) < 1e-5


def test_causal_depthwise_conv_equals_grouped_lax_conv():
    """The shifted multiply-add conv against Flax's grouped convolution: values and grads."""
    from biomamba_jax.model.mamba import causal_depthwise_conv

    conv = nnx.Conv(6, 6, kernel_size=(4,), feature_group_count=6, padding=((3, 0),), use_bias=True,
                    rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.PRNGKey(2), (6,))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 6))
    weights = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 6))
    ours = lambda x, k, b: jnp.sum(causal_depthwise_conv(x, k, b) * weights)
    assert rel_err(causal_depthwise_conv(x, conv.kernel[...], conv.bias[...]), conv(x)) < 1e-6

    graphdef, _ = nnx.split(conv)

    def grouped(x, k, b):
        return jnp.sum(nnx.merge(graphdef, {"kernel": nnx.Param(k), "bias": nnx.Param(b)})(x) * weights)

    kernel, bias = conv.kernel[...], conv.bias[...]
    for ours_grad, ref_grad in zip(jax.grad(ours, argnums=(0, 1, 2))(x, kernel, bias),
                                   jax.grad(grouped, argnums=(0, 1, 2))(x, kernel, bias)):
        assert rel_err(ours_grad, ref_grad) < 1e-6


@pytest.mark.parametrize("remat", ["none", "full"])
def test_layers_written_out_match_the_layer_scan(tiny_pair, remat):
    """scan_layers=False (no stacking copies) gives the scan's logits, gradients and cache."""
    _, model, _ = tiny_pair
    ids = jnp.asarray(np.random.RandomState(8).randint(0, 256, (2, 12)))
    params = model_params(model)
    results = {}
    for scan_layers in (True, False):
        other = model_from_params(model.config.replace(remat=remat, scan_layers=scan_layers), params)
        graphdef, weights, rest = nnx.split(other, nnx.Param, ...)
        loss = lambda w: nnx.merge(graphdef, w, rest)(ids).astype(jnp.float32).mean()
        logits, cache = other.prefill(ids)
        results[scan_layers] = (logits, cache, jax.tree.leaves(jax.grad(loss)(weights)))
    (logits, cache, grads), (logits_out, cache_out, grads_out) = results[True], results[False]
    assert rel_err(logits_out, logits) < 1e-6
    assert rel_err(cache_out.ssm_state, cache.ssm_state) < 1e-6
    assert rel_err(cache_out.conv_state, cache.conv_state) < 1e-6
    for scanned, written_out in zip(grads, grads_out):
        assert rel_err(written_out, scanned) < 1e-5
