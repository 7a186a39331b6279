"""The train step under every parallel layout, the optimizer recipe, and batch planning."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from biomamba_jax.training.parallel import BatchPlan, BatchSplitError
from biomamba_jax.training.step import weight_decay_mask

REPO = Path(__file__).resolve().parents[1]


def step_test_config():
    """A tiny fp32 model whose train step compiles quickly: these tests are about the step."""
    from biomamba_jax.model.config import MambaConfig

    return MambaConfig.preset("tiny", vocab_size=64, dtype="float32", scan_impl="reference", remat="none")


def fake_device_env(count: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture(scope="module")
def four_ways():
    out = subprocess.run([sys.executable, str(REPO / "tests/workers/parallel_equivalence.py")],
                         env=fake_device_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def assert_same_step(a, b, tol=1e-5):
    assert abs(a["loss"] - b["loss"]) <= tol * abs(b["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= tol * abs(b["grad_norm"])
    for name in ("mu", "params"):
        for x, y in zip(a[name], b[name]):
            x, y = np.asarray(x), np.asarray(y)
            assert np.linalg.norm(x - y) <= tol * max(np.linalg.norm(y), 1e-12), name


def test_gradient_accumulation_equals_one_big_batch(four_ways):
    assert_same_step(four_ways["single_accumulated"], four_ways["single_big_batch"])


def test_pmap_on_8_devices_equals_single_device(four_ways):
    assert_same_step(four_ways["pmap"], four_ways["single_big_batch"])


def test_sharding_equals_pmap(four_ways):
    assert_same_step(four_ways["sharding"], four_ways["pmap"])
    assert_same_step(four_ways["sharding_fsdp"], four_ways["pmap"])


def test_weight_decay_mask_excludes_exactly_the_recipe_list():
    from flax import nnx

    from biomamba_jax.model.config import MambaConfig
    from biomamba_jax.model.mamba import MambaLM
    from biomamba_jax.checkpoints.load import model_params

    model = nnx.eval_shape(lambda: MambaLM(MambaConfig.preset("tiny", tie_embeddings=False, dtype="float32"), rngs=nnx.Rngs(0)))
    mask = weight_decay_mask(model_params(model))
    flat = {".".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(name for name, on in flat.items() if on)
    assert decayed == [
        "layers.mixer.conv1d.kernel", "layers.mixer.dt_proj.kernel", "layers.mixer.in_proj.kernel",
        "layers.mixer.out_proj.kernel", "layers.mixer.x_proj.kernel",
    ]
    assert not flat["embedding.embedding"] and not flat["lm_head.kernel"]
    assert not flat["layers.mixer.A_log"] and not flat["layers.mixer.D"]
    assert not flat["layers.mixer.dt_proj.bias"] and not flat["layers.mixer.conv1d.bias"]
    assert not flat["layers.norm.weight"] and not flat["norm_f.weight"]


def test_schedule_warms_up_then_decays_to_ten_percent():
    from biomamba_jax.training.step import lr_schedule

    schedule = lr_schedule(6e-4, warmup_steps=10, total_steps=100, final_fraction=0.1)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(6e-4)
    assert float(schedule(5)) == pytest.approx(3e-4)
    assert float(schedule(100)) == pytest.approx(6e-5)
    assert all(float(schedule(s)) >= float(schedule(s + 1)) for s in range(10, 100))


def test_batch_plan_and_impossible_split():
    plan = BatchPlan.from_tokens(524_288, 2048, micro_batch=8, num_devices=8, num_processes=2)
    assert (plan.global_rows, plan.micro_steps, plan.rows_per_process, plan.local_devices) == (256, 4, 128, 4)
    rows = np.arange(128)
    assert plan.device_major(rows).shape == (4, 4, 8)
    with pytest.raises(BatchSplitError, match="micro_batch_per_device to one of"):
        BatchPlan.from_tokens(524_288, 2048, micro_batch=6, num_devices=8, num_processes=1)
    with pytest.raises(BatchSplitError, match="not a whole number"):
        BatchPlan.from_tokens(1000, 2048, micro_batch=1, num_devices=1, num_processes=1)


def test_nonfinite_step_is_skipped_and_counted():
    from flax import nnx

    from biomamba_jax.model.mamba import MambaLM
    from biomamba_jax.checkpoints.load import model_params
    from biomamba_jax.training.config import OptimSection
    from biomamba_jax.training.step import TrainState, make_optimizer, make_train_step

    model = MambaLM(step_test_config(), rngs=nnx.Rngs(0))
    params = model_params(model)
    params["norm_f"]["weight"] = params["norm_f"]["weight"].at[0].set(np.nan)
    optimizer = make_optimizer(OptimSection(), total_steps=10)
    state = TrainState(params, optimizer.init(params), np.int32(0))
    step = jax.jit(make_train_step(nnx.graphdef(model), optimizer))
    tokens = np.random.RandomState(0).randint(0, 64, (1, 2, 9)).astype(np.int32)
    new_state, metrics = step(state, {"tokens": tokens})
    assert int(metrics["skipped"]) == 1
    for new, old in zip(jax.tree.leaves((new_state.params, new_state.opt_state)),
                        jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def _gradient_like_tree(seed, scale):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"stacked": scale * jax.random.normal(keys[0], (3, 5, 7)), "matrix": scale * jax.random.normal(keys[1], (11, 4)),
            "vector": scale * jax.random.normal(keys[2], (6,)), "scalar": scale * jax.random.normal(keys[3], ())}


def test_global_norm_is_optax_tree_norm():
    from biomamba_jax.training.step import global_norm

    tree = _gradient_like_tree(0, 1.0)
    np.testing.assert_allclose(float(jax.jit(global_norm)(tree)), float(optax.tree.norm(tree)), rtol=1e-6)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # summed in fp32 whatever the leaves' dtype
    np.testing.assert_allclose(float(global_norm(bf16)), float(optax.tree.norm(jax.tree.map(
        lambda x: x.astype(jnp.float32), bf16))), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # below and above max_norm
@pytest.mark.parametrize("given_norm", [False, True])
def test_clip_matches_optax_with_or_without_a_given_norm(scale, given_norm):
    from biomamba_jax.training.step import clip_by_global_norm, global_norm

    tree = _gradient_like_tree(1, scale)
    expected, _ = optax.clip_by_global_norm(1.0).update(tree, optax.EmptyState())
    extra = {"grad_norm": global_norm(tree)} if given_norm else {}
    clipped, state = clip_by_global_norm(1.0).update(tree, optax.EmptyState(), **extra)
    for got, want in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert state == optax.EmptyState()


def test_optimizer_state_layout_is_unchanged_so_old_checkpoints_resume():
    """The state must keep the layout of chain(optax.clip_by_global_norm, adamw), which
    checkpoints written before the clip took a given norm were saved with."""
    from biomamba_jax.training.config import OptimSection
    from biomamba_jax.training.step import lr_schedule, make_optimizer, weight_decay_mask

    params = {"mixer": {"in_proj": {"kernel": jnp.ones((3, 4))}}, "norm_f": {"weight": jnp.ones(4)}}
    optim = OptimSection()
    old = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                      optax.adamw(lr_schedule(optim.peak_lr, optim.warmup_steps, 10, optim.final_lr_fraction),
                                  b1=optim.beta1, b2=optim.beta2, eps=optim.eps, weight_decay=optim.weight_decay,
                                  mask=weight_decay_mask))
    new_state, old_state = make_optimizer(optim, total_steps=10).init(params), old.init(params)
    assert jax.tree.structure(new_state) == jax.tree.structure(old_state)
    grads = jax.tree.map(lambda x: 3.0 * x, params)  # norm above clip_norm: the clip acts
    new_updates, _ = make_optimizer(optim, total_steps=10).update(grads, new_state, params)
    old_updates, _ = old.update(grads, old_state, params)
    for got, want in zip(jax.tree.leaves(new_updates), jax.tree.leaves(old_updates)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_train_step_takes_an_optimizer_without_extra_arguments():
    """make_train_step passes its gradient norm to the optimizer; a plain optax
    GradientTransformation (no **extra_args) must still work."""
    from flax import nnx

    from biomamba_jax.model.mamba import MambaLM
    from biomamba_jax.checkpoints.load import model_params
    from biomamba_jax.training.step import TrainState, make_train_step

    model = MambaLM(step_test_config(), rngs=nnx.Rngs(0))
    params = model_params(model)
    sgd = optax.scale(-0.1)
    plain = optax.GradientTransformation(sgd.init, lambda updates, state, params=None: sgd.update(updates, state))
    state = TrainState(params, plain.init(params), np.int32(0))
    tokens = np.random.RandomState(0).randint(0, 64, (1, 2, 9)).astype(np.int32)
    new_state, metrics = jax.jit(make_train_step(nnx.graphdef(model), plain))(state, {"tokens": tokens})
    assert int(metrics["skipped"]) == 0 and np.isfinite(float(metrics["grad_norm"]))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params))]
    assert any(changed)
