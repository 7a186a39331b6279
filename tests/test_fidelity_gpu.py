"""The GPU training path against mamba_ssm, one step and greedy decoding (`pytest -m gpu`).

The cheap parts of `scripts/fidelity.py`: a 4-layer model of Mamba-130m's width from a
random init, exported with the project's converter and loaded by mamba_ssm. mamba_ssm in
float32 stands in for exact arithmetic; its own bf16 autocast run is the yardstick: the
JAX bf16 paths must err no more than about as much as it does (benchmarks/HISTORY.md,
"Training fidelity", has the measurements at 130m and of these tests).
"""
import jax
import numpy as np
import pytest

from biomamba_jax import fidelity

pytestmark = pytest.mark.gpu
pytest.importorskip("torch", reason="the reference is mamba_ssm, a PyTorch package")
pytest.importorskip("mamba_ssm", reason="mamba_ssm (CUDA kernels) is the reference here")

LAYERS, BATCH, LENGTH = 4, 2, 512
# The JAX bf16 error from fp32 over mamba_ssm's own bf16 error. Measured here (one H200,
# 2026-12-03): auto (mosaic) logits x1.145, worst gradient x1.23 (x_proj); pallas x1.147 and
# x1.20 (norm). The bound leaves room for mamba_ssm's bf16, which differs from run to run
# (HISTORY.md). pallas:fuse=true passed under 3.0 in the same run, but its printed ratios
# were lost, so it keeps that first bound until it is measured (`pytest -m gpu -rA` shows
# them).
RATIO = {"auto": 1.5, "pallas": 1.5, "pallas:fuse=true": 3.0}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    config, params = fidelity.random_start("mamba-130m", seed=0, n_layer=LAYERS, reset_at_documents=False)
    directory = fidelity.export_start(config, params, tmp_path_factory.mktemp("fidelity") / "ms", "mamba_ssm")
    tokens = fidelity.random_token_batches(1, BATCH, LENGTH, config.vocab_size, seed=1)[0]
    return config, params, directory, tokens


@pytest.fixture(scope="module")
def mamba_ssm_steps(start):
    config, _, directory, tokens = start
    return {dtype: fidelity.torch_step(directory, config, tokens, torch_impl="mamba_ssm", dtype=dtype, device="cuda")
            for dtype in ("float32", "bfloat16")}


def test_float32_step_matches_mamba_ssm(start, mamba_ssm_steps):
    config, params, _, tokens = start
    ours = fidelity.jax_step(config.replace(dtype="float32"), params, tokens, matmul_precision="highest")
    reference = mamba_ssm_steps["float32"]
    assert fidelity.relative_distance(ours["logits"], reference["logits"]) < 1e-4
    for name, grad in reference["grads"].items():
        assert fidelity.relative_distance(ours["grads"][name], grad) < 1e-3, name


# The defaults: auto (mosaic on Hopper) and pallas (other GPUs), and the fused option.
@pytest.mark.parametrize("scan_impl", ["auto", "pallas", "pallas:fuse=true"])
def test_bfloat16_step_errs_no_more_than_mamba_ssm_bfloat16(start, mamba_ssm_steps, scan_impl):
    config, params, _, tokens = start
    ours = fidelity.jax_step(config.replace(dtype="bfloat16", scan_impl=scan_impl), params, tokens)
    report = fidelity.step_detail(mamba_ssm_steps["float32"], {"mamba_ssm": mamba_ssm_steps["bfloat16"], "jax": ours},
                                  "mamba_ssm")["jax"]
    print(scan_impl, "logits x", round(report["logits_ratio"], 3), "grads worst x", round(report["grads_ratio_max"], 3),
          report["worst_grad"], "median x", round(report["grads_ratio_median"], 3))
    assert report["logits_ratio"] < RATIO[scan_impl]
    assert report["grads_ratio_max"] < RATIO[scan_impl], report["grads_ratio"]


def test_greedy_decoding_follows_mamba_ssm(start):
    config, params, directory, tokens = start
    prompts = tokens[:, :32]
    theirs, logits = fidelity.torch_greedy(directory, prompts, 32, torch_impl="mamba_ssm", dtype="float32",
                                           device="cuda")
    with jax.default_matmul_precision("highest"):  # no TF32: fp32 on both sides
        ours = fidelity.jax_greedy(config.replace(dtype="float32"), params, prompts, 32)
    agreement = fidelity.prefix_agreement(theirs, ours)
    gaps = fidelity.divergence_gaps(theirs, ours, logits)
    print("float32 greedy agreement", agreement["fraction"], "gaps", [round(g["gap"], 6) for g in gaps])
    # fp32 on both sides: a divergence can only be a near-exact tie.
    assert agreement["fraction"] >= 0.9
    assert all(abs(gap["gap"]) < 1e-3 for gap in gaps)
    np.testing.assert_array_equal(theirs, logits.argmax(-1))
