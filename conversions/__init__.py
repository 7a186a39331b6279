"""Command-line converters between PyTorch Mamba-1 checkpoints and the native JAX format.

`torch_to_jax.main(argv)` and `jax_to_torch.main(argv)` hold the command-line logic so
tests call them in-process; the conversion itself lives in `biomamba_jax.checkpoints.load`.
This module holds what both commands share: the progress and summary lines, the
tokenizer files that travel with a checkpoint, and the error-to-exit-code rule.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from biomamba_jax.model.config import ConfigError, ConfigWarning, MambaConfig
from biomamba_jax.checkpoints.convert import CONVERSION_TABLE, ConversionError

# Files of a Hugging Face tokenizer that make a checkpoint directory self-contained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Bad input, reported as one line and exit code 2. OSError covers a missing path, an
# existing destination (FileExistsError) and an unreadable tokenizer.
USER_ERRORS = (ConversionError, ConfigError, OSError)
EXIT_BAD_INPUT = 2


def run_command(body: Callable[[], None], program: str) -> int:
    """Run a command body; bad input becomes `program: error: ...` on stderr and exit code 2,
    and a config warning (an unknown key) `program: warning: ...`, one line each."""
    show = warnings.showwarning

    def show_config_warnings_in_one_line(message, category, *args, **kwargs):
        if issubclass(category, ConfigWarning):
            print(f"{program}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        warnings.showwarning = show_config_warnings_in_one_line
        try:
            body()
        except USER_ERRORS as err:
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"{program}: error: {message}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0


def tokenizer_files_in(directory: Path) -> dict[str, Path]:
    """The tokenizer files present in `directory`, by name."""
    return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}


def check_tokenizer_fits(extra: dict[str, Path], config: MambaConfig, label: str) -> None:
    """Refuse to ship a tokenizer with ids the model has no embedding row for: the export
    would load, then fail (or index out of range) on the first such token."""
    path = extra.get("tokenizer.json")
    if path is None:
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # the tokenizers library raises its own Exception types
        raise ConversionError(f"cannot read tokenizer {label}: {err}") from err
    if size > config.vocab_size:
        raise ConversionError(
            f"tokenizer {label} has {size} ids but the model has {config.vocab_size} embedding rows: "
            "pass --tokenizer with the tokenizer the model was trained with"
        )


def tensor_count(params: dict, config: MambaConfig) -> int:
    """PyTorch tensors the params correspond to: one per table rule, per layer if stacked."""
    count = 0
    for rule in CONVERSION_TABLE:
        node = params
        try:
            for name in rule.jax_path:
                node = node[name]
        except KeyError:
            continue
        count += config.n_layer if rule.per_layer else 1
    return count


def parameter_count(params: dict) -> int:
    return sum(parameter_count(v) if isinstance(v, dict) else int(np.size(v)) for v in params.values())


def config_summary(config: MambaConfig) -> str:
    fields = ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "dt_rank",
              "tie_embeddings", "dtype")
    return " ".join(f"{name}={getattr(config, name)}" for name in fields)


def print_summary(destination: Path, kind: str, config: MambaConfig, tensors: int, params: int,
                  tensors_note: str = "") -> None:
    files = sorted(p for p in Path(destination).iterdir() if p.is_file())
    listing = ", ".join(f"{p.name} ({_size(p.stat().st_size)})" for p in files)
    print(f"wrote {destination} ({kind})")
    print(f"  files: {listing}")
    print(f"  tensors: {tensors}{tensors_note}, parameters: {params:,}")
    print(f"  config: {config_summary(config)}")


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")
