"""Checkpoint conversion: round trips through every format, the CLI, and bad input."""
import json
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from biomamba_jax.model.config import ConfigError
from biomamba_jax.checkpoints.convert import ConversionError
from biomamba_jax.checkpoints.load import from_pretrained, load_checkpoint, model_params
from biomamba_jax.checkpoints.export import export_hf, save_pretrained
from torch_models import random_hf_mamba

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conversions/ is not installed
from conversions import jax_to_torch, torch_to_jax  # noqa: E402
from helpers import rel_err

MAMBA_SSM_CONFIG_KEYS = {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm",
                         "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple"}
HF_MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel",
                   "expand", "intermediate_size", "time_step_rank", "layer_norm_epsilon", "use_bias",
                   "use_conv_bias", "hidden_act", "residual_in_fp32", "tie_word_embeddings",
                   "time_step_min", "time_step_max", "time_step_floor", "time_step_scale",
                   "time_step_init_scheme", "pad_token_id", "eos_token_id", "bos_token_id")


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def assert_bitwise_equal(a: dict, b: dict):
    a, b = flat(a), flat(b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key



def run_cli(module, *args) -> None:
    assert module.main([str(a) for a in args]) == 0


def assert_nothing_written(dst: Path):
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.tmp-*"))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(torch model, transformers directory written by transformers itself, its JAX params)."""
    torch_model = random_hf_mamba(seed=0)
    directory = tmp_path_factory.mktemp("hf") / "tiny"
    torch_model.save_pretrained(directory)
    _, params, fmt = load_checkpoint(directory)
    assert fmt == "hf"
    return torch_model, directory, params


# ----------------------------------------------------------------------- round trips
def test_hf_to_jax_to_hf_is_bitwise_identical(hf_model, tmp_path):
    _, hf_dir, _ = hf_model
    run_cli(torch_to_jax, hf_dir, tmp_path / "jax")
    run_cli(jax_to_torch, tmp_path / "jax", tmp_path / "hf", "--format", "hf")
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for key in original:
        assert original[key].dtype == exported[key].dtype == np.float32, key
        assert original[key].shape == exported[key].shape, key
        assert original[key].tobytes() == exported[key].tobytes(), key
    config_in = json.loads((hf_dir / "config.json").read_text())
    config_out = json.loads((tmp_path / "hf" / "config.json").read_text())
    for field in HF_MODEL_FIELDS:
        assert config_out[field] == config_in[field], field


def test_jax_to_mamba_ssm_to_jax_is_bitwise_identical(hf_model, tmp_path):
    _, _, params = hf_model
    config, _, _ = load_checkpoint(hf_model[1])
    save_pretrained(params, config, tmp_path / "jax")
    run_cli(jax_to_torch, tmp_path / "jax", tmp_path / "ssm", "--format", "mamba_ssm")

    ms_config = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert set(ms_config) == MAMBA_SSM_CONFIG_KEYS
    state = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    embedding, head = state["backbone.embedding.weight"], state["lm_head.weight"]
    assert embedding.data_ptr() == head.data_ptr()
    assert embedding.shape[0] % 8 == 0 and ms_config["vocab_size"] == embedding.shape[0]

    config_back, params_back, fmt = load_checkpoint(tmp_path / "ssm")
    assert fmt == "mamba_ssm"
    assert_bitwise_equal(params_back, params)
    for field in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank"):
        assert getattr(config_back, field) == getattr(config, field), field


def test_mamba_ssm_export_pads_vocab_to_multiple_of_8(tmp_path):
    torch_model = random_hf_mamba(seed=3, vocab_size=250)
    torch_model.save_pretrained(tmp_path / "hf")
    run_cli(jax_to_torch, tmp_path / "hf", tmp_path / "ssm", "--format", "mamba_ssm")
    state = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    embedding = state["backbone.embedding.weight"]
    assert embedding.shape == (256, 64)
    assert torch.equal(embedding[:250], torch_model.backbone.embeddings.weight.detach())
    assert not embedding[250:].any()


def test_untied_head_survives_mamba_ssm_round_trip(tmp_path):
    random_hf_mamba(seed=4, tie_word_embeddings=False).save_pretrained(tmp_path / "hf")
    config, params, _ = load_checkpoint(tmp_path / "hf")
    assert not config.tie_embeddings and "lm_head" in params
    run_cli(jax_to_torch, tmp_path / "hf", tmp_path / "ssm", "--format", "mamba_ssm")
    assert json.loads((tmp_path / "ssm" / "config.json").read_text())["tie_embeddings"] is False
    config_back, params_back, _ = load_checkpoint(tmp_path / "ssm")
    assert not config_back.tie_embeddings
    assert_bitwise_equal(params_back, params)


def test_exported_hf_dir_reproduces_jax_logits_in_transformers(hf_model, tmp_path):
    from transformers import MambaForCausalLM

    _, hf_dir, _ = hf_model
    model = from_pretrained(hf_dir, dtype="float32")
    export_hf(model, model.config, tmp_path / "hf")
    torch_model = MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = np.random.RandomState(0).randint(0, 256, (2, 17))
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    assert rel_err(model(jnp.asarray(ids)), expected) < 1e-4


def test_pytorch_bin_and_sharded_safetensors_load_and_match(hf_model, tmp_path):
    torch_model, _, params = hf_model
    bin_dir = tmp_path / "bin"
    torch_model.config.save_pretrained(bin_dir)
    torch.save(torch_model.state_dict(), bin_dir / "pytorch_model.bin")  # keeps the tied lm_head
    _, bin_params, fmt = load_checkpoint(bin_dir)
    assert fmt == "hf"
    assert_bitwise_equal(bin_params, params)

    shard_dir = tmp_path / "sharded"
    torch_model.save_pretrained(shard_dir, max_shard_size="50KB")
    assert (shard_dir / "model.safetensors.index.json").exists()
    assert len(list(shard_dir.glob("model-*-of-*.safetensors"))) > 1
    _, shard_params, _ = load_checkpoint(shard_dir)
    assert_bitwise_equal(shard_params, params)


def test_native_round_trip_and_from_pretrained_accepts_every_format(hf_model, tmp_path):
    _, hf_dir, params = hf_model
    model = from_pretrained(hf_dir, dtype="float32")
    save_pretrained(model, model.config, tmp_path / "native")
    assert_bitwise_equal(model_params(from_pretrained(tmp_path / "native", dtype="float32")), model_params(model))
    run_cli(jax_to_torch, tmp_path / "native", tmp_path / "ssm", "--format", "mamba_ssm")
    for directory in (tmp_path / "native", hf_dir, tmp_path / "ssm"):
        assert_bitwise_equal(model_params(from_pretrained(directory, dtype="float32")), params)


# ------------------------------------------------------------------------- bad input
def _copy(hf_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_dir, tmp_path / "src"))


def _edit_tensors(src: Path, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"))


def _missing_key(src):
    _edit_tensors(src, lambda t: t.pop("backbone.layers.1.mixer.D"))


def _wrong_shape(src):
    _edit_tensors(src, lambda t: t.update({"backbone.layers.1.mixer.dt_proj.bias": np.zeros(100, np.float32)}))


def _unknown_native_field(src):
    save_pretrained(load_checkpoint(src)[1], load_checkpoint(src)[0], src, overwrite=True)
    path = src / "biomamba_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "d_modle": 64}))


def _unexpected_native_tensor(src):
    save_pretrained(load_checkpoint(src)[1], load_checkpoint(src)[0], src, overwrite=True)
    tensors = load_file(src / "model.safetensors")
    tensors["layers.mixer.extra_gate"] = np.zeros(3, np.float32)
    save_file(tensors, str(src / "model.safetensors"))


def _garbage_safetensors(src):
    (src / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def _garbage_torch_bin(src):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 50)


def _config_disagrees_with_weights(src):
    path = src / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_size": 32, "intermediate_size": 64}))


BAD_INPUTS = {
    "missing key": (_missing_key, ConversionError, ["missing tensor", "backbone.layers.1.mixer.D"]),
    "wrong shape": (_wrong_shape, ConversionError, ["backbone.layers.1.mixer.dt_proj.bias", "(100,)", "(128,)"]),
    "unknown native field": (_unknown_native_field, ConfigError, ["unknown MambaConfig field", "d_modle"]),
    "unexpected native tensor": (_unexpected_native_tensor, ConversionError,
                                 ["1 tensor(s) this config does not use", "layers.mixer.extra_gate"]),
    "garbage safetensors": (_garbage_safetensors, ConversionError, ["cannot read safetensors", "model.safetensors"]),
    "garbage torch bin": (_garbage_torch_bin, ConversionError, ["cannot read PyTorch checkpoint", "pytorch_model.bin"]),
    "config vs weights": (_config_disagrees_with_weights, ConversionError,
                          ["backbone.embeddings.weight", "(256, 64)", "(256, 32)", "disagree"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_checkpoint_gives_clear_error_and_no_output(hf_model, tmp_path, capsys, case):
    breaker, error_type, fragments = BAD_INPUTS[case]
    src = _copy(hf_model[1], tmp_path)
    breaker(src)
    with pytest.raises(error_type) as caught:
        load_checkpoint(src)
    for fragment in fragments:
        assert fragment in str(caught.value)

    capsys.readouterr()
    dst = tmp_path / "out"
    module = jax_to_torch if "native" in case else torch_to_jax
    extra = ["--format", "hf"] if module is jax_to_torch else []
    assert module.main([str(src), str(dst), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "error:" in err
    for fragment in fragments:
        assert fragment in err
    assert_nothing_written(dst)


def test_missing_source_path(tmp_path, capsys):
    with pytest.raises(ConversionError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    dst = tmp_path / "out"
    assert torch_to_jax.main([str(tmp_path / "nowhere"), str(dst)]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert_nothing_written(dst)


def test_existing_destination_needs_overwrite(hf_model, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert torch_to_jax.main([str(hf_model[1]), str(dst)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError):
        save_pretrained(hf_model[2], load_checkpoint(hf_model[1])[0], dst)
    assert torch_to_jax.main([str(hf_model[1]), str(dst), "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["biomamba_config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_failure_while_writing_removes_staging_dir(hf_model, tmp_path):
    config, params, _ = load_checkpoint(hf_model[1])
    dst = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        export_hf(params, config, dst, extra_files={"tokenizer.json": tmp_path / "missing.json"})
    assert_nothing_written(dst)


# -------------------------------------------------------------------- CLI, tokenizer
def test_cli_round_trip_with_tokenizer(tmp_path, tokenizer_path, capsys):
    from transformers import AutoTokenizer

    from biomamba_jax.data.tokenizer import load_tokenizer

    source = load_tokenizer(tokenizer_path)
    # An embedding that holds every id of the tokenizer: the export refuses a smaller one.
    rows = -(-len(source) // 8) * 8
    model = random_hf_mamba(seed=0, vocab_size=rows)
    model.save_pretrained(tmp_path / "src")
    parameters = sum(p.numel() for p in model.parameters())

    run_cli(torch_to_jax, tmp_path / "src", tmp_path / "jax", "--dtype", "bfloat16")
    out = capsys.readouterr().out
    for fragment in ("reading", "converting 22 tensors", "writing", "model.safetensors",
                     f"parameters: {parameters:,}", "d_model=64"):
        assert fragment in out
    assert json.loads((tmp_path / "jax" / "biomamba_config.json").read_text())["dtype"] == "bfloat16"

    run_cli(jax_to_torch, tmp_path / "jax", tmp_path / "hf", "--format", "hf", "--tokenizer", tokenizer_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode("Hey how are you doing?") == source.encode("Hey how are you doing?")

    # Tokenizer files in a PyTorch source travel into the JAX dir and back out.
    run_cli(torch_to_jax, tmp_path / "hf", tmp_path / "jax2")
    assert (tmp_path / "jax2" / "tokenizer.json").is_file()
    run_cli(jax_to_torch, tmp_path / "jax2", tmp_path / "ssm", "--format", "mamba_ssm")
    assert AutoTokenizer.from_pretrained(tmp_path / "ssm").encode("Hey") == source.encode("Hey")


def test_cli_bad_tokenizer_writes_nothing(hf_model, tmp_path, capsys):
    dst = tmp_path / "hf"
    code = jax_to_torch.main([str(hf_model[1]), str(dst), "--format", "hf",
                              "--tokenizer", str(tmp_path / "no_such_tokenizer.json")])
    assert code == 2
    assert "no_such_tokenizer.json" in capsys.readouterr().err
    assert_nothing_written(dst)


# ----------------------------------------------------------------------------- Hub
HUB_ID = "state-spaces/mamba-130m-hf"


def test_hub_id_goes_through_snapshot_download(hf_model, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(hf_model[1])

    monkeypatch.chdir(tmp_path)  # no local directory named like the id
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert_bitwise_equal(model_params(from_pretrained(HUB_ID, dtype="float32")), hf_model[2])
    assert calls == [HUB_ID]
    run_cli(torch_to_jax, HUB_ID, tmp_path / "jax")
    assert calls == [HUB_ID, HUB_ID]


def test_hub_download_failure_says_download_elsewhere(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConversionError, match="Download it elsewhere and pass the local directory"):
        from_pretrained(HUB_ID, dtype="float32")
    assert torch_to_jax.main([HUB_ID, str(tmp_path / "jax")]) == 2
    err = capsys.readouterr().err
    assert HUB_ID in err and "Download it elsewhere" in err
    assert_nothing_written(tmp_path / "jax")
