"""Write checkpoint directories: the native JAX layout, transformers `MambaForCausalLM` and
original mamba_ssm. Every writer builds its output under a temporary name and renames it
into place, so a failure leaves no partial directory behind."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors.numpy import save_file as save_safetensors

from biomamba_jax.files import apply_default_modes
from biomamba_jax.model.config import MambaConfig
from biomamba_jax.checkpoints.convert import (HF, MAMBA_SSM, jax_to_torch_state)
from biomamba_jax.model.mamba import MambaLM
from biomamba_jax.checkpoints.load import NATIVE_CONFIG, TORCH_BIN, WEIGHTS, PathLike, model_params

__all__ = ["save_pretrained", "export_hf", "export_mamba_ssm"]


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _atomic_directory(destination: PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `destination` on success only."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} exists; pass overwrite=True (--overwrite) to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 would end up on the published directory.
    staging = destination.parent / f".{destination.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        apply_default_modes(staging)
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _params_of(model_or_params) -> dict:
    if isinstance(model_or_params, MambaLM):
        return model_params(model_or_params)
    return model_or_params


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = np.ascontiguousarray(np.asarray(value, np.float32))
    return flat


def _copy_extra_files(staging: Path, extra_files: dict[str, Path] | None) -> None:
    """Copy files that travel with the weights (tokenizer files) into the staging dir."""
    for name, source in (extra_files or {}).items():
        if Path(name).name != name or (staging / name).exists():
            raise ValueError(f"extra file name {name!r} must be a bare name not already written")
        shutil.copyfile(source, staging / name)


def save_pretrained(model_or_params, config: MambaConfig, destination: PathLike, *, overwrite=False,
                    extra_files: dict[str, Path] | None = None) -> Path:
    """Write the native JAX directory: biomamba_config.json + model.safetensors.

    `extra_files` maps a file name in the directory to a source path (e.g. tokenizer files),
    copied inside the same atomic write.
    """
    params = _params_of(model_or_params)
    jax_to_torch_state(params, config, HF)  # validates shapes before anything is written
    with _atomic_directory(destination, overwrite) as staging:
        _write_json(staging / NATIVE_CONFIG, config.to_dict())
        save_safetensors(_flatten(params), str(staging / WEIGHTS), metadata={"format": "flax"})
        _copy_extra_files(staging, extra_files)
    return Path(destination)


def export_hf(model_or_params, config: MambaConfig, destination: PathLike, *, overwrite=False,
              extra_files: dict[str, Path] | None = None) -> Path:
    """Write a `MambaForCausalLM.from_pretrained`-loadable directory (safetensors, fp32)."""
    tensors = jax_to_torch_state(_params_of(model_or_params), config, HF)
    with _atomic_directory(destination, overwrite) as staging:
        _write_json(staging / "config.json", {**config.to_hf_dict(), "torch_dtype": "float32"})
        save_safetensors(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        _copy_extra_files(staging, extra_files)
    return Path(destination)


def export_mamba_ssm(model_or_params, config: MambaConfig, destination: PathLike, *, overwrite=False,
                     extra_files: dict[str, Path] | None = None) -> Path:
    """Write a `MambaLMHeadModel.from_pretrained`-loadable directory (pytorch_model.bin).

    Both tied keys are present and share storage, as mamba_ssm saves them; the vocabulary
    is padded to `pad_vocab_size_multiple` rows.
    """
    import torch

    tensors = jax_to_torch_state(_params_of(model_or_params), config, MAMBA_SSM)
    multiple = config.pad_vocab_size_multiple
    embedding = tensors["backbone.embedding.weight"]
    pad_rows = (-embedding.shape[0]) % multiple if multiple > 1 else 0
    state = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k != "lm_head.weight"}
    if pad_rows:
        state["backbone.embedding.weight"] = torch.nn.functional.pad(
            state["backbone.embedding.weight"], (0, 0, 0, pad_rows)
        )
    if config.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    else:
        state["lm_head.weight"] = torch.nn.functional.pad(
            torch.from_numpy(np.array(tensors["lm_head.weight"])), (0, 0, 0, pad_rows)
        )
    ms_config = {**config.to_mamba_ssm_dict(), "vocab_size": embedding.shape[0] + pad_rows}
    if not config.tie_embeddings:
        # Only mamba_ssm 2.x knows this key, but without it the head would be read as tied.
        ms_config["tie_embeddings"] = False
    with _atomic_directory(destination, overwrite) as staging:
        _write_json(staging / "config.json", ms_config)
        torch.save(state, staging / TORCH_BIN)
        _copy_extra_files(staging, extra_files)
    return Path(destination)

