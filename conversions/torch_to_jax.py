"""Convert a PyTorch Mamba-1 checkpoint (transformers or mamba_ssm) to the native JAX format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python conversions/torch_to_jax.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biomamba_jax.model.config import COMPUTE_DTYPES
from biomamba_jax.checkpoints.load import detect_format, load_checkpoint, resolve_source
from biomamba_jax.checkpoints.export import save_pretrained
from conversions import (check_tokenizer_fits, parameter_count, print_summary, run_command, tensor_count,
                         tokenizer_files_in)

PROGRAM = "torch_to_jax.py"
EPILOG = """\
SRC is one of:
  a transformers MambaForCausalLM directory (config.json with hidden_size, and
    model.safetensors, sharded safetensors with model.safetensors.index.json, or
    pytorch_model.bin);
  a mamba_ssm directory (config.json with d_model/n_layer, and pytorch_model.bin);
  a Hugging Face Hub id such as state-spaces/mamba-130m-hf (needs network access).
Tokenizer files in SRC (tokenizer.json, tokenizer_config.json, special_tokens_map.json)
are copied into DST. DST is written atomically: on any error nothing is left behind.

examples:
  python conversions/torch_to_jax.py state-spaces/mamba-130m-hf checkpoints/mamba-130m
  python conversions/torch_to_jax.py ~/mamba-130m checkpoints/mamba-130m --overwrite
  python conversions/torch_to_jax.py hf_dir jax_dir --dtype bfloat16
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Convert a PyTorch Mamba-1 checkpoint to a native JAX checkpoint directory "
                    "(biomamba_config.json + model.safetensors).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="transformers or mamba_ssm directory, or a Hub id")
    parser.add_argument("dst", metavar="DST", type=Path, help="native JAX checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                        help="compute dtype recorded in the config (weights stay float32; "
                             "default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def convert() -> None:
        if args.dst.exists() and not args.overwrite:  # fail before a possibly long download
            raise FileExistsError(f"{args.dst} exists; pass --overwrite to replace it")
        directory = resolve_source(args.src)
        print(f"reading {directory} ({detect_format(directory)} checkpoint)")
        config, params, fmt = load_checkpoint(directory, dtype=args.dtype)
        tensors = tensor_count(params, config)
        print(f"converting {tensors} tensors ({fmt} layout -> JAX layout)")
        extra = tokenizer_files_in(directory)
        check_tokenizer_fits(extra, config, str(directory / "tokenizer.json"))
        print(f"writing {args.dst}" + (f" (with {', '.join(extra)})" if extra else ""))
        save_pretrained(params, config, args.dst, overwrite=args.overwrite, extra_files=extra)
        print_summary(args.dst, "native JAX checkpoint", config, tensors, parameter_count(params))

    return run_command(convert, PROGRAM)


if __name__ == "__main__":
    sys.exit(main())
