"""Run configuration: typed dataclasses, YAML presets in `configs/`, `key=value` overrides.

The mechanism is OmegaConf's structured configs: a preset file is merged onto the
dataclass schema, then command-line `section.key=value` overrides onto that. A key that
is not in the schema (a typo) or a value of the wrong type fails at once, before any
device work, with the key named. The fully resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from biomamba_jax.model.config import MambaConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

__all__ = ["RunConfig", "row_length", "load_run_config", "list_presets", "RunConfigError", "CONFIG_DIR"]


class RunConfigError(ValueError):
    """A run config that cannot be used, with the key and the fix named."""


def _model_default(field: str):
    """MambaConfig's default for a run-time model setting: the one place it is written."""
    return MambaConfig.__dataclass_fields__[field].default


@dataclasses.dataclass
class ModelSection:
    preset: str = "mamba-130m"  # architecture when init == "random"
    vocab_size: Optional[int] = None  # with init == "random": None keeps the preset's
    init: str = "state-spaces/mamba-130m-hf"  # "random", a checkpoint dir, or a Hub id
    # Run-time settings, documented on MambaConfig.
    dtype: str = _model_default("dtype")
    scan_impl: str = _model_default("scan_impl")
    remat: str = _model_default("remat")
    scan_layers: bool = _model_default("scan_layers")
    loss_impl: str = _model_default("loss_impl")
    loss_chunk_tokens: int = _model_default("loss_chunk_tokens")
    reset_at_documents: bool = _model_default("reset_at_documents")


@dataclasses.dataclass
class DataSection:
    dir: str = "data/pubmed"  # output of scripts/prepare_pubmed.py
    seq_len: int = 2048
    seed: int = 0
    # When set, `dir` is built from this many synthetic PubMed files before training (the
    # offline smoke run goes through the same prepare and load path as real data), but only
    # when it is missing, empty or such a corpus already; a non-empty folder of anything
    # else is refused. scripts/pretrain.py --data-dir sets this to 0: a named dir is real data.
    synthetic_files: int = 0
    synthetic_docs_per_file: int = 200
    val_fraction: float = 0.005  # used when this run prepares the data itself
    tokenizer: str = "EleutherAI/gpt-neox-20b"
    # Check every shard's sha256 against the manifest before training (reads all the data
    # once); shard sizes are always checked.
    verify: bool = False


@dataclasses.dataclass
class OptimSection:
    peak_lr: float = 6e-4
    final_lr_fraction: float = 0.1
    warmup_steps: int = 200
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass
class BatchSection:
    global_batch_tokens: int = 524_288  # 0.5M tokens per optimizer step, as BioMamba
    micro_batch_per_device: int = 8  # rows per device per forward/backward


@dataclasses.dataclass
class RunSection:
    out_dir: str = "runs/biomamba-130m"
    steps: int = 2000  # optimizer steps of the whole run (the lr schedule spans them)
    # Stop with a checkpoint after this step and exit cleanly, e.g. to fit a job's time
    # limit; a later --resume continues towards run.steps. None runs to the end.
    stop_at: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    max_consecutive_nonfinite: int = 5
    export_hf: bool = True  # write a transformers-loadable copy of the final weights
    # Trace this many steps, from this run's third, with the JAX profiler: device time per
    # op and how busy the device was (profile.json, and the trace under profile/). 0: off.
    profile_steps: int = 0
    # JAX's persistent compilation cache, so that a resumed or repeated run loads its
    # compiled step instead of compiling it again (14-30 s on an H200). "auto":
    # $XDG_CACHE_HOME (else ~/.cache) /biomamba-jax/xla; "off"; or a directory. A cache
    # that JAX_COMPILATION_CACHE_DIR or the calling code already set wins: JAX's is one
    # per process.
    compile_cache: str = "auto"


@dataclasses.dataclass
class ParallelSection:
    mode: str = "auto"  # auto | pmap | sharding
    fsdp: bool = False  # shard parameters and optimizer state over the data axis (sharding)
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


@dataclasses.dataclass
class FinetuneSection:
    """Supervised fine-tuning on BioASQ factoid questions (scripts/finetune.py)."""

    train_files: List[str] = dataclasses.field(default_factory=list)  # BioASQ Task B JSON files
    eval_files: List[str] = dataclasses.field(default_factory=list)  # scored as test_loss, never trained on
    # Held-out slice of the training questions (by a hash of the question id, so the same
    # questions whatever the file order): validation loss for early stopping and "best".
    val_fraction: float = 0.1
    epochs: int = 5
    max_tokens: int = 512  # per example (prompt + answer + EOS); only the context is cut
    # A question whose question + answer exceed max_tokens even with no context is skipped
    # (counted in the log and summary.json); false stops the run instead.
    skip_too_long: bool = True
    patience: Optional[int] = 2  # evaluations (one per epoch) without a better val_loss; None: off
    tokenizer: Optional[str] = None  # None: the one that comes with model.init, else data.tokenizer


@dataclasses.dataclass
class RunConfig:
    name: str = MISSING
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    batch: BatchSection = dataclasses.field(default_factory=BatchSection)
    run: RunSection = dataclasses.field(default_factory=RunSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    finetune: FinetuneSection = dataclasses.field(default_factory=FinetuneSection)


def row_length(config: RunConfig) -> int:
    """Training positions per row: finetune.max_tokens when fine-tuning, else data.seq_len."""
    return config.finetune.max_tokens if config.finetune.train_files else config.data.seq_len


def list_presets() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def load_run_config(
    preset: Optional[str] = None,
    config_file: Optional[str | Path] = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Schema <- preset (configs/NAME.yaml) <- config file <- `key=value` overrides."""
    layers = [OmegaConf.structured(RunConfig)]
    try:
        if preset is not None:
            path = CONFIG_DIR / f"{preset}.yaml"
            if not path.exists():
                raise RunConfigError(f"unknown preset {preset!r}; choose one of {list_presets()}")
            layers.append(OmegaConf.load(path))
        if config_file is not None:
            if not Path(config_file).exists():
                raise RunConfigError(f"config file {config_file} does not exist")
            layers.append(OmegaConf.load(config_file))
        bad = [item for item in overrides if "=" not in item]
        if bad:
            raise RunConfigError(f"overrides must look like section.key=value, got {bad}")
        for item in overrides:  # one at a time, so a value YAML cannot parse is named
            try:
                layers.append(OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as err:
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise RunConfigError(f"bad run config: cannot parse override {item!r} ({problem}); a list is "
                                     "written section.key=[a,b]") from None
        merged = OmegaConf.merge(*layers)
        if OmegaConf.is_missing(merged, "name"):
            merged.name = preset or Path(config_file or "run").stem
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        # OmegaConf's first line says what is wrong ("Key 'lr' not in 'OptimSection'"); its
        # full_key says where, which a type error's message leaves out.
        message = str(err).splitlines()[0]
        where = getattr(err, "full_key", None)
        if where and where not in message:
            message = f"{where}: {message}"
        raise RunConfigError(f"bad run config: {message}. See biomamba_jax/configs/*.yaml and RunConfig for "
                             "the valid keys and types.") from None
    _check(config)
    return config


_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_CLOSED_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
# What each numeric setting may be (None, where a field allows it, is always fine).
_NUMERIC_RULES = {
    "data.seq_len": _POSITIVE, "data.seed": _NON_NEGATIVE, "data.synthetic_files": _NON_NEGATIVE,
    "data.synthetic_docs_per_file": _POSITIVE, "data.val_fraction": _FRACTION,
    "optim.peak_lr": _NON_NEGATIVE, "optim.final_lr_fraction": _CLOSED_FRACTION, "optim.warmup_steps": _NON_NEGATIVE,
    "optim.beta1": _FRACTION, "optim.beta2": _FRACTION, "optim.eps": _POSITIVE, "optim.weight_decay": _NON_NEGATIVE,
    "optim.clip_norm": _POSITIVE,
    "batch.global_batch_tokens": _POSITIVE, "batch.micro_batch_per_device": _POSITIVE,
    "run.steps": _POSITIVE, "run.stop_at": _POSITIVE, "run.seed": _NON_NEGATIVE, "run.log_every": _POSITIVE,
    "run.eval_every": _POSITIVE, "run.eval_batches": _POSITIVE, "run.checkpoint_every": _POSITIVE,
    "run.keep_checkpoints": _POSITIVE, "run.max_consecutive_nonfinite": _POSITIVE, "run.profile_steps": _NON_NEGATIVE,
    "parallel.num_processes": _POSITIVE, "parallel.process_id": _NON_NEGATIVE,
    "finetune.val_fraction": _FRACTION, "finetune.epochs": _POSITIVE, "finetune.max_tokens": _POSITIVE,
    "finetune.patience": _POSITIVE,
}


def _check(config: RunConfig) -> None:
    """Every setting checked before anything compiles; all problems reported at once."""
    problems = []
    if config.parallel.mode not in ("auto", "pmap", "sharding"):
        problems.append(f"parallel.mode={config.parallel.mode!r}: choose auto, pmap or sharding")
    for name, (allowed, wanted) in _NUMERIC_RULES.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if value is not None and not allowed(value):
            problems.append(f"{name}={value}: must be {wanted}")
    if config.run.stop_at is not None and config.run.stop_at > config.run.steps:
        problems.append(f"run.stop_at={config.run.stop_at} is past run.steps={config.run.steps}: "
                        "lower it, or leave it unset to run to the end")
    length_key = "finetune.max_tokens" if config.finetune.train_files else "data.seq_len"
    if row_length(config) > 0 and config.batch.global_batch_tokens % row_length(config):
        problems.append(
            f"batch.global_batch_tokens={config.batch.global_batch_tokens} is not a multiple of "
            f"{length_key}={row_length(config)}: pick a multiple so every row is a full sequence"
        )
    if problems:
        raise RunConfigError("bad run config:\n  " + "\n  ".join(problems))


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
