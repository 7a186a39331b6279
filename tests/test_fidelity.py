"""The training-fidelity tool (`scripts/fidelity.py`): JAX and transformers train alike in fp32 on the CPU."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from biomamba_jax import fidelity
from biomamba_jax.training.config import OptimSection
from biomamba_jax.training.step import lr_schedule, weight_decay_mask
from helpers import load_script

pytest.importorskip("torch", reason="the torch side of the comparison needs torch")
pytest.importorskip("transformers", reason="the CPU reference is transformers' MambaForCausalLM")

STEPS, BATCH, LENGTH, VOCAB = 6, 2, 32, 64
# The pretraining recipe, with an lr high enough that 6 steps move the loss visibly and
# that decaying the wrong parameters shows; the warmup puts a zero-lr first step in.
RECIPE = OptimSection(peak_lr=1e-2, warmup_steps=2, final_lr_fraction=0.1)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    config, params = fidelity.random_start("tiny", seed=0, vocab_size=VOCAB, dtype="float32",
                                           scan_impl="reference", remat="none")
    directory = fidelity.export_start(config, params, tmp_path_factory.mktemp("fidelity") / "hf", "transformers")
    # One batch seen every step: uniform random tokens cannot be learnt, a repeated batch
    # can, so the loss falls and the curves show the optimizer at work.
    batches = fidelity.random_token_batches(STEPS, BATCH, LENGTH, VOCAB, seed=1, distinct=1)
    return config, params, directory, batches


@pytest.fixture(scope="module")
def jax_curves(start):
    config, params, _, batches = start
    return fidelity.jax_losses(config, params, batches, RECIPE)[0]


def test_jax_and_transformers_train_alike_in_float32(start, jax_curves):
    _, _, directory, batches = start
    torch_curves = fidelity.torch_losses(directory, batches, RECIPE, torch_impl="transformers")
    summary = fidelity.compare_curves(jax_curves["loss"], torch_curves["loss"])
    assert summary["max_rel_diff"] < 1e-4, summary
    # The training moved: otherwise agreement would say nothing about the optimizer.
    assert jax_curves["loss"][-1] < jax_curves["loss"][0] - 0.05
    np.testing.assert_allclose(torch_curves["grad_norm"], jax_curves["grad_norm"], rtol=1e-4)


def test_bfloat16_runs_both_sides_close(start):
    """bf16 compute in JAX, bf16 autocast in torch: no longer equal, still close (measured
    here: 3e-4 relative at most); this mainly proves the bf16 paths run before a GPU does."""
    config, params, directory, batches = start
    jax_bf16, _ = fidelity.jax_losses(config.replace(dtype="bfloat16"), params, batches, RECIPE)
    torch_bf16 = fidelity.torch_losses(directory, batches, RECIPE, dtype="bfloat16")
    assert fidelity.compare_curves(torch_bf16["loss"], jax_bf16["loss"])["max_rel_diff"] < 5e-3


def test_decaying_every_parameter_is_detected(start, jax_curves):
    """Negative control: the same run with weight decay on A_log, D, norms, biases and
    embeddings too lands measurably away from JAX, so the agreement above does check the mask."""
    _, _, directory, batches = start
    wrong = fidelity.torch_losses(directory, batches, RECIPE, decays=lambda name: True)
    summary = fidelity.compare_curves(jax_curves["loss"], wrong["loss"])
    assert summary["max_rel_diff"] > 1e-3, summary


def test_torch_decay_mask_matches_the_jax_mask(start):
    from transformers import MambaForCausalLM

    _, params, directory, _ = start
    torch_model = MambaForCausalLM.from_pretrained(directory)
    decayed_torch = sum(p.numel() for n, p in torch_model.named_parameters() if fidelity.torch_decays(n))
    mask = weight_decay_mask(params)
    decayed_jax = sum(np.size(x) for x, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if keep)
    assert decayed_torch == decayed_jax > 0
    assert not fidelity.torch_decays("backbone.layers.0.mixer.A_log")
    assert not fidelity.torch_decays("backbone.layers.0.mixer.conv1d.bias")
    assert not fidelity.torch_decays("backbone.embeddings.weight")


@pytest.mark.parametrize("warmup, total", [(2, 6), (0, 5), (10, 4), (3, 4), (200, 2000)])
def test_torch_schedule_equals_the_optax_schedule(warmup, total):
    optim = dataclasses.replace(RECIPE, warmup_steps=warmup)
    schedule = lr_schedule(optim.peak_lr, optim.warmup_steps, total, optim.final_lr_fraction)
    # rel=1e-5: optax works in float32 and its warmup is peak - peak * (1 - k / warmup),
    # which cancels digits early in a long warmup; torch's factor is a Python float.
    for step in list(range(min(total, 50))) + [total - 1, total, total + 3]:
        expected = float(schedule(step))
        assert fidelity.torch_lr_factor(step, optim, total) * optim.peak_lr == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_random_batches_cycle_when_asked():
    fresh = fidelity.random_token_batches(4, 2, 8, VOCAB, seed=3)
    assert fresh.shape == (4, 2, 9) and fresh.dtype == np.int32 and 0 <= fresh.min() and fresh.max() < VOCAB
    assert not np.array_equal(fresh[0], fresh[1])
    cycled = fidelity.random_token_batches(5, 2, 8, VOCAB, seed=3, distinct=2)
    np.testing.assert_array_equal(cycled[0], cycled[2])
    np.testing.assert_array_equal(cycled[0], cycled[4])
    np.testing.assert_array_equal(cycled[1], cycled[3])
    assert not np.array_equal(cycled[0], cycled[1])


def test_compare_curves_skips_early_steps():
    summary = fidelity.compare_curves([4.0, 3.0, 2.0], [5.0, 3.3, 2.0], skip_steps=1)
    assert summary["steps_compared"] == 2
    assert summary["max_abs_diff"] == pytest.approx(0.3)
    assert summary["max_rel_diff"] == pytest.approx(0.1)
    assert summary["tail_steps"] == 1 and summary["tail_mean_candidate"] == 2.0
    with pytest.raises(ValueError):
        fidelity.compare_curves([1.0], [1.0, 2.0])


def test_cli_writes_results_and_plot(tmp_path):
    # In process: a subprocess would spend longer importing jax and torch than training.
    script = load_script("fidelity")
    out = tmp_path / "run"
    assert script.main(["--size", "tiny", "--vocab-size", str(VOCAB), "--steps", "3", "--batch", "2", "--length",
                        "16", "--warmup", "1", "--scan-impl", "reference", "--torch-impl", "transformers",
                        "--spread", "order,repeat", "--detail-rows", "2", "--variants", "reference,chunked",
                        "--decode-prompts", "3", "--prompt-length", "8", "--decode-tokens", "5",
                        "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    curves = results["curves"]
    assert len(curves["jax"]["loss"]) == len(curves["transformers"]["loss"]) == len(curves["transformers order"]["loss"]) == 3
    assert results["comparison"]["max_rel_diff"] < 1e-4
    assert results["grad_norm_comparison"]["max_rel_diff"] < 1e-4
    # Another batch order moves the torch curve; fp32 JAX stays far inside that spread. The
    # repeat of the same run on a CPU is exact, so the order run sets the tolerance.
    assert set(results["spreads"]) == {"transformers order", "transformers repeat"}
    assert results["spreads"]["transformers repeat"]["max_abs_diff"] == 0.0
    assert results["verdict"]["all_within"] and results["verdict"]["tolerance_abs"] > 1e-3
    assert results["verdict"]["tolerance_from"] == "transformers order"
    runs = results["one_step"]["runs"]
    assert set(runs) == {"transformers bfloat16", "jax float32", "jax bfloat16 reference", "jax bfloat16 chunked"}
    assert runs["jax float32"]["logits"] < 1e-5 and runs["transformers bfloat16"]["grads_ratio_max"] == 1.0
    greedy = results["greedy"]["pairs"]["jax float32 vs transformers float32"]
    assert greedy["rows"] == 3 and len(results["greedy"]["tokens"]["jax bfloat16"][0]) == 5
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in out.iterdir()) == ["curves.png", "results.json"]


def test_a_run_cut_short_keeps_the_curves_it_finished(tmp_path, monkeypatch):
    script = load_script("fidelity")

    def cut(*args, **kwargs):
        raise KeyboardInterrupt  # as when a run is stopped during the JAX curve

    monkeypatch.setattr(fidelity, "jax_losses", cut)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        script.main(["--size", "tiny", "--vocab-size", str(VOCAB), "--steps", "2", "--batch", "1", "--length", "8",
                     "--torch-impl", "transformers", "--spread", "order", "--out", str(out)])
    curves = json.loads((out / "results.json").read_text())["curves"]
    assert set(curves) == {"transformers", "transformers order"} and len(curves["transformers order"]["loss"]) == 2
    assert (out / "curves.png").is_file()


def test_decoding_cut_short_keeps_the_pairs_it_finished(tmp_path, monkeypatch):
    script = load_script("fidelity")
    decode = fidelity.jax_greedy

    def cut_in_float32(config, *args, **kwargs):
        if config.dtype == "float32":
            raise KeyboardInterrupt  # as when a run is stopped during the last, slowest decoder
        return decode(config, *args, **kwargs)

    monkeypatch.setattr(fidelity, "jax_greedy", cut_in_float32)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        script.main(["--size", "tiny", "--vocab-size", str(VOCAB), "--steps", "1", "--batch", "1", "--length", "8",
                     "--scan-impl", "reference", "--torch-impl", "transformers", "--decode-prompts", "2",
                     "--prompt-length", "4", "--decode-tokens", "3", "--out", str(out)])
    greedy = json.loads((out / "results.json").read_text())["greedy"]
    assert set(greedy["pairs"]) == {"jax bfloat16 vs transformers bfloat16",
                                    "transformers bfloat16 vs transformers float32"}
    assert set(greedy["tokens"]) == {"transformers bfloat16", "jax bfloat16", "transformers float32"}


def test_cli_refuses_a_float32_spread_of_a_float32_run(capsys):
    script = load_script("fidelity")
    assert script.main(["--spread", "float32"]) == 2
    assert "--spread order" in capsys.readouterr().err
    for bad in ("fp32", "order,order"):
        with pytest.raises(SystemExit):
            script.parse_args(["--spread", bad])
        assert "float32, order, repeat" in capsys.readouterr().err


def test_one_step_matches_transformers_in_float32_logits_and_every_gradient(start):
    config, params, directory, batches = start
    reference = fidelity.torch_step(directory, config, batches[0])
    ours = fidelity.jax_step(config, params, batches[0])
    assert set(ours["grads"]) == set(reference["grads"]) and len(ours["grads"]) > 10
    assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert fidelity.relative_distance(ours["logits"], reference["logits"]) < 1e-4
    for name, grad in reference["grads"].items():
        assert fidelity.relative_distance(ours["grads"][name], grad) < 1e-4, name
    # A wrong gradient shows: the in_proj gradient of other text (each row reversed) is far away.
    other = fidelity.jax_step(config, params, np.ascontiguousarray(batches[0][:, ::-1]))
    name = next(k for k in ours["grads"] if "in_proj" in k)
    assert fidelity.relative_distance(other["grads"][name], reference["grads"][name]) > 1e-2


def test_step_detail_ratios_are_against_the_baseline():
    reference = {"loss": 1.0, "logits": np.ones((2, 3)), "grads": {"a": np.ones(4), "b": np.full(4, 2.0)}}
    baseline = {"loss": 1.1, "logits": np.full((2, 3), 1.1), "grads": {"a": np.full(4, 1.1), "b": np.full(4, 2.2)}}
    candidate = {"loss": 1.0, "logits": np.full((2, 3), 1.05), "grads": {"a": np.full(4, 1.3), "b": np.full(4, 2.0)}}
    report = fidelity.step_detail(reference, {"base": baseline, "ours": candidate}, "base")
    assert report["base"]["grads_ratio_max"] == pytest.approx(1.0)
    assert report["ours"]["logits_ratio"] == pytest.approx(0.5)
    assert report["ours"]["grads_ratio"]["a"] == pytest.approx(3.0) and report["ours"]["worst_grad"] == "a"
    assert report["ours"]["grads_ratio"]["b"] == 0.0 and report["ours"]["loss_diff"] == 0.0


def test_greedy_decoding_agrees_with_transformers_in_float32(start):
    config, params, directory, batches = start
    prompts = fidelity.random_token_batches(1, 4, 6, VOCAB, seed=9)[0]
    ours = fidelity.jax_greedy(config, params, prompts, 8)
    theirs, logits = fidelity.torch_greedy(directory, prompts, 8)
    assert ours.shape == theirs.shape == (4, 8) and logits.shape == (4, 8, VOCAB)
    np.testing.assert_array_equal(theirs, logits.argmax(-1))
    assert fidelity.prefix_agreement(theirs, ours)["fraction"] == 1.0


def test_prefix_agreement_stops_at_the_first_divergence_and_measures_its_gap():
    reference = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    candidate = np.array([[1, 2, 9, 4], [5, 6, 7, 8]])
    summary = fidelity.prefix_agreement(reference, candidate)
    assert summary["prefix_lengths"] == [2, 4] and summary["fraction"] == 6 / 8 and summary["rows_identical"] == 1
    logits = np.zeros((2, 4, 10), np.float32)
    logits[0, 2, 3], logits[0, 2, 9] = 10.0, 10.0 - 2 ** -4  # 10 is in [8, 16): a bf16 step is 2^-4
    (gap,) = fidelity.divergence_gaps(reference, candidate, logits)
    assert gap["row"] == 0 and gap["step"] == 2 and gap["candidate_token"] == 9
    assert gap["gap_in_bf16_steps"] == pytest.approx(1.0)


def test_pubmed_batches_are_the_loaders_rows_in_order(tmp_path, tokenizer_path):
    from biomamba_jax.data.loader import make_lm_loader
    from biomamba_jax.data.pubmed import prepare_pubmed
    from biomamba_jax.data.synthetic import write_synthetic_pubmed

    corpus = write_synthetic_pubmed(tmp_path / "xml", n_files=1, docs_per_file=30, seed=3)
    prepare_pubmed(corpus, tmp_path / "data", tokenizer=tokenizer_path, val_fraction=0.2, progress=False,
                   command="test")
    batches = fidelity.pubmed_token_batches(tmp_path / "data", 3, BATCH, 15, seed=5)
    assert batches.shape == (3, BATCH, 16) and batches.dtype == np.int32
    loader = make_lm_loader(tmp_path / "data", "train", 15, BATCH, seed=5, process_index=0, process_count=1)
    for expected, got in zip(loader, batches):
        np.testing.assert_array_equal(expected["tokens"], got)


def test_torch_impl_choice_and_mamba_ssm_vocab_guard(tmp_path):
    try:
        import mamba_ssm  # noqa: F401
        expected_auto = "mamba_ssm"
    except ImportError:
        expected_auto = "transformers"
    assert fidelity.resolve_torch_impl("auto") == expected_auto
    with pytest.raises(ValueError, match="torch_impl"):
        fidelity.resolve_torch_impl("flax")
    config, params = fidelity.random_start("tiny", vocab_size=VOCAB - 1, dtype="float32")
    with pytest.raises(ValueError, match="pad"):
        fidelity.export_start(config, params, tmp_path / "ms", "mamba_ssm")
    assert not (tmp_path / "ms").exists()
