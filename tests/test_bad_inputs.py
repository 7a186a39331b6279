"""Bad input to the checkpoint readers, the converters, BioASQ loading, evaluation and
fine-tuning: each is refused (or skipped and counted) with one line that names the thing
and the fix, never a traceback. New names are imported inside the tests that use them, so
each test fails on its own on code without the fix."""
import contextlib
import gzip
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from biomamba_jax.model.config import ConfigError, MambaConfig
from biomamba_jax.model.mamba import MambaLM
from biomamba_jax.checkpoints.convert import ConversionError
from biomamba_jax.checkpoints.export import export_hf, save_pretrained
from biomamba_jax.checkpoints.load import from_pretrained, load_checkpoint, model_params
from biomamba_jax.data.bioasq import BioASQFormatError, load_bioasq
from biomamba_jax.data.tokenizer import write_byte_level_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # conversions/ is not installed
from conversions import jax_to_torch, torch_to_jax  # noqa: E402
from helpers import load_script

TINY_BIOASQ = REPO / "tests" / "fixtures" / "bioasq" / "training_tiny.json"

# config.json of state-spaces/mamba-130m-hf (the transformers conversion of the original
# checkpoint): transformers keys plus the mamba_ssm keys it carries.
OFFICIAL_HF_CONFIG = {
    "_name_or_path": "./", "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4,
    "d_inner": 1536, "d_model": 768, "eos_token_id": 0, "expand": 2, "fused_add_norm": True, "hidden_act": "silu",
    "hidden_size": 768, "initializer_range": 0.1, "intermediate_size": 1536, "layer_norm_epsilon": 1e-05,
    "model_type": "mamba", "n_layer": 24, "num_hidden_layers": 24, "pad_token_id": 0, "pad_vocab_size_multiple": 8,
    "rescale_prenorm_residual": False, "residual_in_fp32": True, "rms_norm": True, "ssm_cfg": {}, "state_size": 16,
    "time_step_floor": 0.0001, "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001,
    "time_step_rank": 48, "time_step_scale": 1.0, "torch_dtype": "float32", "transformers_version": "4.39.0.dev0",
    "use_bias": False, "use_cache": True, "use_conv_bias": True, "vocab_size": 50280,
}


def _one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model (264 embedding rows), its tokenizer, and it saved as a native
    JAX directory and as a transformers directory."""
    root = tmp_path_factory.mktemp("tiny")
    config = MambaConfig.preset("tiny", vocab_size=264, dtype="float32", scan_impl="reference", remat="none")
    model = MambaLM(config, rngs=nnx.Rngs(0))
    tokenizer = write_byte_level_tokenizer(root / "tok" / "tokenizer.json")
    save_pretrained(model, config, root / "native", extra_files={"tokenizer.json": tokenizer})
    export_hf(model, config, root / "hf", extra_files={"tokenizer.json": tokenizer})
    return {"root": root, "config": config, "model": model, "tokenizer": tokenizer,
            "native": root / "native", "hf": root / "hf"}


def _hf_copy(tiny, tmp_path, edit) -> Path:
    directory = Path(shutil.copytree(tiny["hf"], tmp_path / "src"))
    values = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(edit(values)))
    return directory


# ------------------------------------------------------------------ config.json
@pytest.mark.parametrize("value", [42, "hidden_size", "d_model n_layer", [1, 2], None])
def test_config_json_that_is_not_an_object_is_one_config_error_naming_the_file(tiny, tmp_path, capsys, value):
    src = _hf_copy(tiny, tmp_path, lambda _: value)
    with pytest.raises(ConfigError, match="not an object") as caught:
        load_checkpoint(src)
    assert str(src / "config.json") in str(caught.value)
    capsys.readouterr()
    assert torch_to_jax.main([str(src), str(tmp_path / "out")]) == 2
    _one_line_error(capsys.readouterr().err, "torch_to_jax.py: error:", "config.json holds a JSON")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, fragments", [
    ("hidden_size", "64", ["'hidden_size' must be an integer", "write 64 without quotes"]),
    ("num_hidden_layers", True, ["'num_hidden_layers' must be an integer", "true and false are not numbers"]),
    ("state_size", 8.0, ["'state_size' must be an integer", "write 8"]),
    ("layer_norm_epsilon", "1e-5", ["'layer_norm_epsilon' must be a number", "write 1e-5 without quotes"]),
    ("time_step_max", None, ["'time_step_max' must be a number"]),
    ("tie_word_embeddings", "false", ["'tie_word_embeddings' must be true or false", "write false without quotes"]),
    ("use_conv_bias", 1, ["'use_conv_bias' must be true or false"]),
    ("eos_token_id", "0", ["'eos_token_id' must be an integer token id"]),
    ("hidden_act", 7, ["'hidden_act' must be a string"]),
])
def test_wrongly_typed_hf_field_names_field_file_and_fix(tiny, tmp_path, key, value, fragments):
    src = _hf_copy(tiny, tmp_path, lambda values: {**values, key: value})
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(src)
    message = str(caught.value)
    assert message.startswith(f"{src / 'config.json'}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("edit, fragments", [
    (lambda ms: {**ms, "d_model": "64"}, ["'d_model' must be an integer", "write 64 without quotes"]),
    (lambda ms: {**ms, "n_layer": 2.5}, ["'n_layer' must be an integer"]),
    (lambda ms: {**ms, "ssm_cfg": [1]}, ["'ssm_cfg' must be an object"]),
    (lambda ms: {**ms, "ssm_cfg": {"d_state": "8"}}, ["ssm_cfg: 'd_state' must be an integer"]),
    (lambda ms: {**ms, "ssm_cfg": {"dt_min": "0.001"}}, ["ssm_cfg: 'dt_min' must be a number"]),
    (lambda ms: {**ms, "rms_norm": "yes"}, ["'rms_norm' must be true or false"]),
    (lambda ms: {**ms, "tie_embeddings": 0}, ["'tie_embeddings' must be true or false"]),
])
def test_wrongly_typed_mamba_ssm_field_names_field_and_file(tmp_path, edit, fragments):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(edit(MambaConfig.preset("tiny", vocab_size=250).to_mamba_ssm_dict())))
    with pytest.raises(ConfigError) as caught:
        MambaConfig.from_json_file(path)
    assert str(caught.value).startswith(str(path))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_native_config_fields_are_type_checked_too(tiny, tmp_path):
    src = Path(shutil.copytree(tiny["native"], tmp_path / "native"))
    path = src / "biomamba_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "norm_eps": "1e-5"}))
    with pytest.raises(ConfigError, match="norm_eps must be a number") as caught:
        load_checkpoint(src)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("typo, meant, default", [
    ("state_sise", "state_size", "16"),
    ("layer_norm_epsilom", "layer_norm_epsilon", "1e-05"),
    ("time_step_mn", "time_step_min", "0.001"),
    ("time_step_flor", "time_step_floor", "0.0001"),
])
def test_misspelt_hf_key_warns_naming_the_field_that_takes_its_default(typo, meant, default):
    from biomamba_jax.model.config import ConfigWarning

    values = {k: v for k, v in OFFICIAL_HF_CONFIG.items() if k != meant}
    values[typo] = values.get(meant, 0.5)
    with pytest.warns(ConfigWarning) as caught:
        MambaConfig.from_hf_dict(values, source="ckpt/config.json")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert messages[0].startswith(f"ckpt/config.json: unknown key '{typo}'")
    assert f"did you mean '{meant}'? It is not set, so it takes its default {default}" in messages[0]


def test_misspelt_key_warning_reaches_the_cli_as_one_line(tiny, tmp_path, capsys):
    src = _hf_copy(tiny, tmp_path, lambda values: {**values, "use_cach": True})
    assert torch_to_jax.main([str(src), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "torch_to_jax.py: warning: " in err and "unknown key 'use_cach'" in err and "'use_cache'" in err
    assert "Traceback" not in err and "warnings.warn" not in err


def test_official_hf_config_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = MambaConfig.from_hf_dict(OFFICIAL_HF_CONFIG, source="mamba-130m-hf/config.json")
    assert (config.d_model, config.n_layer, config.dt_rank, config.vocab_size) == (768, 24, 48, 50280)


def test_carried_mamba_ssm_key_that_disagrees_warns():
    from biomamba_jax.model.config import ConfigWarning

    with pytest.warns(ConfigWarning, match="d_model=512 disagrees with hidden_size=768"):
        MambaConfig.from_hf_dict({**OFFICIAL_HF_CONFIG, "d_model": 512}, source="x/config.json")


def test_known_hf_keys_cover_what_installed_transformers_knows():
    """The list is written out (reading a config must not import transformers); this
    checks it against the installed transformers, so a new transformers key shows here."""
    import inspect

    import transformers

    from biomamba_jax.model.config import HF_MAMBA_KEYS

    signature = set(inspect.signature(transformers.MambaConfig.__init__).parameters) - {"self", "kwargs"}
    written = {key for key in transformers.MambaConfig().to_dict() if not key.startswith("_")}
    common = set(inspect.signature(transformers.PretrainedConfig.__init__).parameters) - {"self", "kwargs"}
    missing = sorted((signature | written | common) - HF_MAMBA_KEYS)
    assert not missing, f"add these keys to HF_MAMBA_KEYS: {missing}"


def test_config_matching_neither_format_lists_what_each_needs(tiny, tmp_path, capsys):
    src = _hf_copy(tiny, tmp_path, lambda _: {"dim": 64, "layers": 2})
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(src)
    message = str(caught.value)
    assert "needs hidden_size, num_hidden_layers, vocab_size" in message and "needs d_model, n_layer" in message
    assert "['dim', 'layers']" in message


def test_formats_are_told_apart_by_their_keys():
    from biomamba_jax.model.config import config_format

    tiny = MambaConfig.preset("tiny", vocab_size=256)
    assert config_format(tiny.to_hf_dict(), "c") == "hf"
    assert config_format(OFFICIAL_HF_CONFIG, "c") == "hf"  # mamba_ssm keys too, transformers' win
    assert config_format(tiny.to_mamba_ssm_dict(), "c") == "mamba_ssm"
    assert config_format({"d_model": 64, "n_layer": 2}, "c") == "mamba_ssm"
    assert config_format(tiny.to_dict(), "c") == "native"
    # A native-looking config.json is not read as native where only the PyTorch formats belong.
    with pytest.raises(ConfigError, match="neither"):
        config_format({"d_state": 16}, "c", native=False)


def test_model_type_other_than_mamba_is_refused(tiny, tmp_path):
    src = _hf_copy(tiny, tmp_path, lambda values: {**values, "model_type": "mamba2"})
    with pytest.raises(ConfigError, match="model_type 'mamba2' is not a Mamba-1 model"):
        load_checkpoint(src)


def test_mamba_ssm_key_put_at_the_top_level_warns_where_it_belongs(tmp_path):
    from biomamba_jax.model.config import ConfigWarning

    values = MambaConfig.preset("tiny", vocab_size=256).to_mamba_ssm_dict()
    with pytest.warns(ConfigWarning, match="'d_conv' belongs inside ssm_cfg"):
        MambaConfig.from_mamba_ssm_dict({**values, "d_conv": 3}, source="m/config.json")


# ------------------------------------------------------------- model sources
def _run_folder(tiny, root: Path) -> Path:
    """A finished run folder as Trainer.run leaves it (model_config.json + hf/ export)."""
    run = root / "runs" / "smoke"
    run.mkdir(parents=True)
    (run / "model_config.json").write_text(json.dumps(tiny["config"].to_dict()))
    shutil.copytree(tiny["hf"], run / "hf")
    return run


def test_from_pretrained_and_load_checkpoint_accept_a_run_folder(tiny, tmp_path, monkeypatch):
    from biomamba_jax.checkpoints.runs import load_model

    run = _run_folder(tiny, tmp_path)
    monkeypatch.chdir(tmp_path)
    model = from_pretrained("runs/smoke", dtype="float32")
    expected = model_params(tiny["model"])
    for got in (model_params(model), load_checkpoint(run)[1], load_model(run)[1]):
        assert jnp_equal(got, expected)


def jnp_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(jnp_equal(a[k], b[k]) for k in a)
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_mistyped_local_path_is_not_tried_as_a_hub_id(tiny, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    _run_folder(tiny, tmp_path)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: calls.append(repo_id))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConversionError) as caught:
        from_pretrained("runs/smok")
    assert str(caught.value) == "no such checkpoint directory: runs/smok (runs exists; did you mean runs/smoke?)"
    assert torch_to_jax.main(["runs/smok", str(tmp_path / "out")]) == 2
    _one_line_error(capsys.readouterr().err, "no such checkpoint directory: runs/smok")
    assert calls == []


def test_jax_to_torch_refuses_a_tokenizer_the_embedding_cannot_hold(tmp_path, capsys):
    config = MambaConfig.preset("tiny", vocab_size=128, dtype="float32", scan_impl="reference")
    save_pretrained(MambaLM(config, rngs=nnx.Rngs(0)), config, tmp_path / "native")
    tokenizer = write_byte_level_tokenizer(tmp_path / "tok" / "tokenizer.json")  # 257 ids
    assert jax_to_torch.main([str(tmp_path / "native"), str(tmp_path / "out"), "--format", "hf",
                              "--tokenizer", str(tokenizer)]) == 2
    _one_line_error(capsys.readouterr().err, "257 ids but the model has 128 embedding rows", "--tokenizer")
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def _umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_exports_get_the_modes_the_umask_gives(tiny, tmp_path, capsys):
    with _umask(0o022):
        assert jax_to_torch.main([str(tiny["native"]), str(tmp_path / "hf"), "--format", "hf"]) == 0
        assert torch_to_jax.main([str(tiny["hf"]), str(tmp_path / "jax")]) == 0
        export_hf(tiny["model"], tiny["config"], tmp_path / "api")
    for directory in (tmp_path / "hf", tmp_path / "jax", tmp_path / "api"):
        assert directory.stat().st_mode & 0o777 == 0o755, directory
        for file in directory.iterdir():
            assert file.stat().st_mode & 0o777 == 0o644, file


# ------------------------------------------------------------------- BioASQ
def _bioasq_variant(tmp_path: Path, name: str, edit=None) -> Path:
    document = json.loads(TINY_BIOASQ.read_text())
    if edit:
        edit(document)
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return path


def test_bioasq_reads_gzip_by_name_or_by_magic_bytes(tmp_path):
    expected = load_bioasq(TINY_BIOASQ).questions
    (tmp_path / "q.json.gz").write_bytes(gzip.compress(TINY_BIOASQ.read_bytes()))
    (tmp_path / "gzipped.json").write_bytes(gzip.compress(TINY_BIOASQ.read_bytes()))
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + TINY_BIOASQ.read_bytes())
    for name in ("q.json.gz", "gzipped.json", "bom.json"):
        assert load_bioasq(tmp_path / name).questions == expected


def _latin1(tmp_path: Path) -> Path:
    document = json.loads(TINY_BIOASQ.read_text())
    document["questions"][0]["body"] = "Which protéine is mutated in cystic fibrosis?"
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(document, ensure_ascii=False).encode("latin-1"))
    return path


def test_non_utf8_bioasq_file_is_one_line_naming_file_and_fix(tmp_path):
    path = _latin1(tmp_path)
    with pytest.raises(BioASQFormatError) as caught:
        load_bioasq(path)
    assert str(caught.value).startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset ")
    assert "convert it to UTF-8" in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(TINY_BIOASQ.read_bytes())[:40])
    with pytest.raises(BioASQFormatError, match="cut.json.gz: truncated or corrupt gzip"):
        load_bioasq(tmp_path / "cut.json.gz")


def _evaluate(argv, capsys):
    capsys.readouterr()
    code = load_script("evaluate").main(argv)
    return code, capsys.readouterr()


def _eval_args(tiny, tmp_path, bioasq, *extra):
    return ["--model", f"m={tiny['native']}", "--bioasq", str(bioasq), "--out", str(tmp_path / "eval"),
            "--max-tokens", "96", "--batch-size", "2", "--num-beams", "2", "--max-answer-tokens", "4", *extra]


def test_evaluate_cli_names_a_non_utf8_file_once_in_one_line(tiny, tmp_path, capsys):
    path = _latin1(tmp_path)
    code, captured = _evaluate(_eval_args(tiny, tmp_path, path), capsys)
    assert code == 2
    _one_line_error(captured.err, "evaluate.py: error: --bioasq: ", "not UTF-8", "convert it to UTF-8")
    assert captured.err.count(str(path)) == 1


@pytest.mark.parametrize("content", ["{not json", None])
def test_evaluate_cli_prints_the_bioasq_path_once(tiny, tmp_path, capsys, content):
    path = tmp_path / "set.json"
    if content is not None:
        path.write_text(content)
    code, captured = _evaluate(_eval_args(tiny, tmp_path, path), capsys)
    assert code == 2
    _one_line_error(captured.err, "evaluate.py: error: --bioasq")
    assert captured.err.count(str(path)) == 1


def test_missing_gold_answers_message_says_what_a_cli_user_can_do(tiny, tmp_path, capsys):
    def drop_answers(document):
        for question in document["questions"]:
            question.pop("exact_answer", None)

    path = _bioasq_variant(tmp_path, "test_batch.json", drop_answers)
    code, captured = _evaluate(_eval_args(tiny, tmp_path, path), capsys)
    assert code == 2
    _one_line_error(captured.err, "has no exact_answer", "golden file")
    assert "require_answers" not in captured.err


def _long_question(document):
    document["questions"][0]["body"] = "Which gene " + "is really " * 40 + "mutated in cystic fibrosis?"


def test_evaluate_skips_and_reports_a_question_longer_than_max_tokens(tiny, tmp_path, capsys):
    path = _bioasq_variant(tmp_path, "long.json", _long_question)
    code, captured = _evaluate(_eval_args(tiny, tmp_path, path, "--no-factoid"), capsys)
    assert code == 0, captured.err
    assert "1 of 3 question(s) do not fit --max-tokens 96 even with no context (e.g. q-string" in captured.out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["sets"][0]["skipped_too_long"] == ["q-string"] and report["sets"][0]["items"] == 2
    assert "(1 skipped: question + answer longer than max_tokens 96)" in (tmp_path / "eval" / "report.md").read_text()


def test_evaluate_strict_length_fails_before_any_model_compute(tiny, tmp_path, capsys, monkeypatch):
    from biomamba_jax.evaluation import evaluate as evaluation

    def no_compute(*args, **kwargs):
        raise AssertionError("a scorer was built before the inputs were checked")

    monkeypatch.setattr(evaluation, "JaxScorer", no_compute)
    path = _bioasq_variant(tmp_path, "long.json", _long_question)
    code, captured = _evaluate(_eval_args(tiny, tmp_path, path, "--strict-length"), capsys)
    assert code == 2
    _one_line_error(captured.err, "bioasq:long: 1 of 3 question(s) do not fit --max-tokens 96", "raise --max-tokens")


def _finetune_task(tmp_path, train_file, *overrides):
    from biomamba_jax.training.config import load_run_config
    from biomamba_jax.training.finetune import BioASQTask

    config = load_run_config("finetune-smoke", overrides=[
        "model.init=random", "model.preset=tiny", "model.vocab_size=264", "data.tokenizer=offline-bytes",
        f"finetune.train_files=[{train_file}]", "finetune.eval_files=[]", "finetune.val_fraction=0",
        "finetune.max_tokens=96", "batch.global_batch_tokens=192", f"run.out_dir={tmp_path / 'run'}", *overrides])
    return BioASQTask(config), MambaConfig.preset("tiny", vocab_size=264)


def test_finetune_skips_a_question_longer_than_max_tokens_and_counts_it(tmp_path):
    path = _bioasq_variant(tmp_path, "long.json", _long_question)
    task, model_config = _finetune_task(tmp_path, path)
    logged = []
    task.prepare(model_config, True, logged.append)
    assert task.facts["skipped_too_long"] == {"train": 1, "val": 0}
    assert task.facts["train_questions"] == 2 and len(task.sets["train"]["tokens"]) == 2
    assert any("skipped      1 train question(s)" in line and "q-string" in line for line in logged)


def test_finetune_skip_too_long_false_stops_with_the_fix(tmp_path):
    from biomamba_jax.training.loop import RunError

    path = _bioasq_variant(tmp_path, "long.json", _long_question)
    task, model_config = _finetune_task(tmp_path, path, "finetune.skip_too_long=false")
    with pytest.raises(RunError, match="q-string.*finetune.skip_too_long=true"):
        task.prepare(model_config, True, lambda *_: None)


def test_finetune_cli_reports_a_non_utf8_file_in_one_line(tmp_path, capsys):
    path = _latin1(tmp_path)
    code = load_script("finetune").main([
        "--preset", "finetune-smoke", "model.init=random", "model.preset=tiny", "model.vocab_size=264",
        "data.tokenizer=offline-bytes", "finetune.eval_files=[]", "finetune.max_tokens=96",
        "batch.global_batch_tokens=192", "batch.micro_batch_per_device=2", "--out-dir", str(tmp_path / "run"),
        "--train", str(path)])
    assert code == 2
    _one_line_error(capsys.readouterr().err, "error: ", str(path), "not UTF-8", "convert it to UTF-8")


def test_finetune_cli_override_after_train_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        load_script("finetune").main(["--train", str(TINY_BIOASQ), "finetune.epochs=2"])
    assert caught.value.code == 2
    assert "'finetune.epochs=2' looks like an override: give overrides before --train" in capsys.readouterr().err


def test_run_config_override_yaml_cannot_parse_is_named():
    from biomamba_jax.training.config import RunConfigError, load_run_config

    with pytest.raises(RunConfigError, match=r"cannot parse override 'finetune.train_files=\[a.json,b=\[\]\]'"):
        load_run_config("finetune-smoke", overrides=["finetune.train_files=[a.json,b=[]]"])


def test_beam_candidates_are_distinct_as_the_metric_sees_them():
    from biomamba_jax.evaluation.scorers import _candidates

    assert _candidates(["BRCA1", "brca1\nis the gene", " Brca1 ", "TP53", "", "tp53"]) == ["BRCA1", "TP53"]
    assert _candidates([f"gene{i}" for i in range(8)]) == [f"gene{i}" for i in range(5)]


def test_factoid_match_is_the_official_evaluators_lowercased_exact_match():
    from biomamba_jax.evaluation.inputs import REPORT_NOTE
    from biomamba_jax.evaluation.metrics import first_match_rank

    assert first_match_rank(["cftr"], ["CFTR"]) == 1
    assert first_match_rank([" cftr", "cftr "], ["CFTR"]) is None  # the official evaluator does not trim
    assert "whitespace not stripped" in REPORT_NOTE
