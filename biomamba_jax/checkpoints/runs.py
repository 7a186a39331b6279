"""Training run directories as model sources: load the weights and the tokenizer of a run.

A run directory (what `Trainer.run` writes) holds `config.yaml`, `model_config.json`,
`checkpoints/<step>/` (orbax) and, once finished, `hf/` (a transformers export that
carries the tokenizer files). Everything that takes a model (`model.init` of a run,
`scripts/evaluate.py`, `scripts/generate.py`, the exporter) goes through `load_model`, so
each accepts the same sources:

- a run directory: its `hf/` export when the run finished, else its latest checkpoint;
- `RUN/checkpoints/STEP`: that checkpoint;
- any checkpoint directory `load.read_checkpoint_dir` reads (native JAX, transformers
  or mamba_ssm), or a Hub id.

`load.load_checkpoint` and `from_pretrained` go through `load_source` too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from biomamba_jax.model.config import MambaConfig
from biomamba_jax.checkpoints.load import read_checkpoint_dir, read_json

__all__ = ["is_run_dir", "load_model", "load_source", "find_tokenizer", "restore_params", "run_dir_of"]

PathLike = Union[str, Path]
TOKENIZER_DIR = "tokenizer"  # where a run keeps the files of the tokenizer it trained with


def is_run_dir(path: PathLike) -> bool:
    path = Path(path)
    return (path / "model_config.json").is_file() and ((path / "checkpoints").is_dir() or (path / "hf").is_dir())


def _checkpoint_step_dir(path: Path) -> Optional[tuple[Path, int]]:
    """(run dir, step) when `path` is RUN/checkpoints/STEP."""
    if path.name.isdigit() and path.parent.name == "checkpoints" and is_run_dir(path.parent.parent):
        return path.parent.parent, int(path.name)
    return None


def run_dir_of(source: PathLike) -> Optional[Path]:
    """The run directory a source belongs to (the run itself, one of its checkpoints or
    its hf export), or None for a plain checkpoint."""
    path = Path(source)
    if is_run_dir(path):
        return path
    step_dir = _checkpoint_step_dir(path)
    if step_dir:
        return step_dir[0]
    if path.name == "hf" and is_run_dir(path.parent):
        return path.parent
    return None


def restore_params(run_dir: PathLike, step: Optional[int] = None) -> tuple[dict, int]:
    """The parameters of checkpoint `step` (default: latest complete) as numpy arrays."""
    import orbax.checkpoint as ocp

    directory = (Path(run_dir) / "checkpoints").resolve()
    manager = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"{directory} holds no complete checkpoint"
                                    + ("" if step is None else f" for step {step}"))
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(None)))
    finally:
        manager.close()
    return restored["state"]["params"], step


RUN_CHECKPOINT = "run"  # the format load_source reports for an orbax checkpoint of a run


def load_source(source: PathLike, **runtime) -> tuple[MambaConfig, dict, str, str]:
    """(config, params, format, description) from any model source: the one reader behind
    `load_model`, `load.load_checkpoint` and `from_pretrained`."""
    path = Path(source)
    step_dir = _checkpoint_step_dir(path)
    if step_dir is None and is_run_dir(path):
        if (path / "hf" / "config.json").is_file():
            config, params, fmt = read_checkpoint_dir(path / "hf", **runtime)
            return config, params, fmt, f"run {path} (final export hf/)"
        step_dir = (path, None)
    if step_dir is not None:
        run_dir, step = step_dir
        params, step = restore_params(run_dir, step)
        model_config = run_dir / "model_config.json"
        config = MambaConfig.from_dict(read_json(model_config), source=str(model_config), **runtime)
        return config, params, RUN_CHECKPOINT, f"run {run_dir} (checkpoint step {step})"
    config, params, fmt = read_checkpoint_dir(source, **runtime)
    return config, params, fmt, f"{fmt} checkpoint {source}"


def load_model(source: PathLike, **runtime) -> tuple[MambaConfig, dict, str]:
    """(config, params, description) from a run dir, a run checkpoint or a checkpoint dir."""
    config, params, _, description = load_source(source, **runtime)
    return config, params, description


def find_tokenizer(source: PathLike) -> Optional[Path]:
    """The tokenizer that belongs with a model source, or None when it carries none."""
    path = Path(source)
    candidates = [path]
    run_dir = run_dir_of(path)
    if run_dir is not None:
        candidates += [run_dir / "hf", run_dir / TOKENIZER_DIR]
    for directory in candidates:
        if (directory / "tokenizer.json").is_file():
            return directory / "tokenizer.json"
    if run_dir is not None:
        return _pretraining_data_tokenizer(run_dir)
    return None


def _pretraining_data_tokenizer(run_dir: Path) -> Optional[Path]:
    """The tokenizer file named by the manifest of the data a pretraining run read."""
    from omegaconf import OmegaConf

    try:
        data_dir = Path(OmegaConf.load(run_dir / "config.yaml").data.dir)
        name = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]["name"]
    except (OSError, KeyError, ValueError, AttributeError):
        return None
    path = Path(name)
    return path if path.is_file() else None
