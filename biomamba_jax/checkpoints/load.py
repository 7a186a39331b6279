"""Checkpoint directories: load any Mamba-1 checkpoint into JAX (`export` writes them).

Formats, recognised by their files:
- native (this project): `biomamba_config.json` + `model.safetensors` in the JAX layout;
- transformers `MambaForCausalLM`: `config.json` with `hidden_size` + `model.safetensors`,
  sharded safetensors (`model.safetensors.index.json`) or `pytorch_model.bin`;
- original mamba_ssm: `config.json` with `d_model`/`n_layer` + `pytorch_model.bin`;
- a Hugging Face Hub id such as `state-spaces/mamba-130m-hf`, fetched when online.

Safetensors are read with numpy. Torch is imported only for `.bin` files, which are
loaded with `weights_only=True`. Every writer builds its output under a temporary name and
renames it into place, so a failure leaves no partial directory behind.
"""


from __future__ import annotations

import difflib
import json
import re
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from flax import nnx
from safetensors.numpy import load_file as load_safetensors

from biomamba_jax.model.config import (HF_FORMAT, ConfigError, ConfigWarning, MambaConfig, config_format)
from biomamba_jax.checkpoints.convert import (HF, MAMBA_SSM, ConversionError, expected_param_shapes, jax_to_torch_state,
                      torch_to_jax_params)
from biomamba_jax.model.mamba import MambaLM

__all__ = ["from_pretrained", "load_checkpoint", "read_checkpoint_dir", "read_json", "model_params", "model_from_params",
           "detect_format", "resolve_source", "NATIVE"]

NATIVE = "native"
NATIVE_CONFIG = "biomamba_config.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PathLike = Union[str, Path]


# ------------------------------------------------------------------ params <-> model
def model_params(model: MambaLM) -> dict:
    """The model's parameters as a plain nested dict of arrays (the tree converters see)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(config: MambaConfig, params: dict) -> MambaLM:
    """Build a model from a nested params dict without running the random initialiser."""
    model = nnx.eval_shape(lambda: MambaLM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax_tree_from_numpy(params))
    nnx.update(model, state)
    return model


def jax_tree_from_numpy(params: dict) -> dict:
    import jax.numpy as jnp

    return {k: jax_tree_from_numpy(v) if isinstance(v, dict) else jnp.asarray(v, jnp.float32)
            for k, v in params.items()}


# --------------------------------------------------------------------------- reading
def read_json(path: Path):
    """A JSON file's value; a ConfigError naming the file when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{path} is a PyTorch pickle; install torch (pip install 'biomamba-jax[torch]') "
            "or convert it to safetensors"
        ) from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConversionError(f"cannot read PyTorch checkpoint {path}: {err}") from err
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_safetensors(str(path))
    except Exception as err:
        raise ConversionError(f"cannot read safetensors file {path}: {err}") from err


def _read_weights(directory: Path) -> dict[str, np.ndarray]:
    if (directory / SHARD_INDEX).exists():
        index = read_json(directory / SHARD_INDEX)
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            tensors.update(_read_safetensors(directory / shard))
        if not tensors:
            raise ConversionError(f"{directory / SHARD_INDEX} lists no weight shards")
        return tensors
    if (directory / WEIGHTS).exists():
        return _read_safetensors(directory / WEIGHTS)
    if (directory / TORCH_BIN).exists():
        return _read_torch_bin(directory / TORCH_BIN)
    raise ConversionError(
        f"no weights in {directory}: expected {WEIGHTS}, {SHARD_INDEX} or {TORCH_BIN}"
    )


def detect_format(directory: Path) -> str:
    """NATIVE, HF or MAMBA_SSM, from the config file's name and keys (`config_format`)."""
    if (directory / NATIVE_CONFIG).exists():
        return NATIVE
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ConversionError(
            f"{directory} is not a Mamba checkpoint: it has neither {NATIVE_CONFIG} nor config.json"
        )
    fmt = config_format(read_json(config_path), config_path, native=False)
    return HF if fmt == HF_FORMAT else MAMBA_SSM


def resolve_source(source: PathLike) -> Path:
    """A local directory as is; a Hub id downloaded (config, weights, tokenizer files).

    A string shaped like a Hub id ("owner/name") is fetched only when it cannot be a local
    path: if its first component exists here, it is a mistyped path and reported as one.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path} is a file; pass the checkpoint directory that holds it")
        return path
    if HUB_ID_PATTERN.match(str(source)) and not Path(path.parts[0]).exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(
                str(source),
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
            ))
        except Exception as err:
            raise ConversionError(
                f"could not fetch {source!r} from the Hugging Face Hub ({type(err).__name__}: "
                f"{err}). Offline? Download it elsewhere and pass the local directory."
            ) from err
    hint = _nearby_names(path)
    if not hint and HUB_ID_PATTERN.match(str(source)):
        hint = f" (read as a local path, not a Hub id, because {path.parts[0]} exists here)"
    raise ConversionError(f"no such checkpoint directory: {source}{hint}")


def _nearby_names(path: Path) -> str:
    """A hint for a missing path: the directories beside its first missing part whose
    names are close to it (" (runs exists; did you mean runs/smoke?)"), or ""."""
    parent, missing = path, None
    while not parent.exists():
        parent, missing = parent.parent, parent.name
        if parent == parent.parent and not parent.exists():
            return ""
    try:
        names = sorted(child.name for child in parent.iterdir() if child.is_dir())
    except OSError:
        return ""
    close = difflib.get_close_matches(missing or "", names, n=3, cutoff=0.6)
    if not close:
        return ""
    shown = [str(parent / name) if str(parent) != "." else name for name in close]
    return f" ({parent} exists; did you mean {' or '.join(shown)}?)"


def load_checkpoint(source: PathLike, **runtime) -> tuple[MambaConfig, dict, str]:
    """Read a checkpoint of any supported format: (config, nested numpy params, format).

    `source` is whatever the scripts accept (`checkpoints.runs.load_model`): a checkpoint
    directory of any format, a Hub id, a training run directory (its hf/ export, else its
    latest checkpoint) or RUN/checkpoints/STEP. `runtime` overrides run-time config fields
    (dtype, scan_impl, remat).
    """
    from biomamba_jax.checkpoints.runs import load_source  # runs builds on this module

    config, params, fmt, _ = load_source(source, **runtime)
    return config, params, fmt


def read_checkpoint_dir(source: PathLike, **runtime) -> tuple[MambaConfig, dict, str]:
    """`load_checkpoint` for a checkpoint directory (native, transformers, mamba_ssm) or a
    Hub id; run directories are `checkpoints.runs`' part."""
    directory = resolve_source(source)
    fmt = detect_format(directory)
    if fmt == NATIVE:
        native_config = directory / NATIVE_CONFIG
        config = MambaConfig.from_dict(read_json(native_config), source=str(native_config), **runtime)
        flat = _read_safetensors(directory / WEIGHTS)
        params: dict = {}
        for key, value in flat.items():
            node = params
            *parents, leaf = key.split(".")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = value
        # Missing tensors and wrong shapes are caught by the table the PyTorch formats use;
        # leftovers would be silently dropped by it, so name them here.
        expected = {".".join(path) for path in expected_param_shapes(config)}
        unexpected = sorted(set(flat) - expected)
        if unexpected:
            raise ConversionError(
                f"{directory / WEIGHTS} has {len(unexpected)} tensor(s) this config does not use: "
                f"{unexpected[:5]}; does {NATIVE_CONFIG} describe these weights?"
            )
        jax_to_torch_state(params, config, HF)
        return config, params, fmt
    # The config is read (and checked) before the weights, which may be large.
    config_path = directory / "config.json"
    values = read_json(config_path)
    if fmt == HF:
        config = MambaConfig.from_hf_dict(values, source=str(config_path), **runtime)
        tensors = _read_weights(directory)
    else:
        MambaConfig.from_mamba_ssm_dict(values, vocab_rows=1, source=str(config_path), **runtime)
        tensors = _read_weights(directory)
        embedding = tensors.get("backbone.embedding.weight")
        if embedding is None:
            raise ConversionError(f"mamba_ssm checkpoint {directory} lacks backbone.embedding.weight")
        with warnings.catch_warnings():  # the first read above has warned already
            warnings.simplefilter("ignore", ConfigWarning)
            config = MambaConfig.from_mamba_ssm_dict(values, vocab_rows=embedding.shape[0],
                                                     source=str(config_path), **runtime)
    return config, torch_to_jax_params(tensors, config, fmt), fmt


def from_pretrained(source: PathLike, **runtime) -> MambaLM:
    """Load a JAX `MambaLM` from any source `load_checkpoint` reads (checkpoint directory,
    Hub id, training run directory or run checkpoint)."""
    config, params, _ = load_checkpoint(source, **runtime)
    return model_from_params(config, params)


