"""Export a Mamba-1 checkpoint to transformers (`MambaForCausalLM`) or mamba_ssm format."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as `python conversions/jax_to_torch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biomamba_jax.checkpoints.convert import ConversionError
from biomamba_jax.checkpoints.model_card import model_card
from biomamba_jax.checkpoints.load import detect_format, load_checkpoint, resolve_source
from biomamba_jax.checkpoints.export import export_hf, export_mamba_ssm
from biomamba_jax.checkpoints.runs import find_tokenizer, load_model, run_dir_of
from biomamba_jax.data.tokenizer import load_tokenizer
from conversions import (check_tokenizer_fits, parameter_count, print_summary, run_command, tensor_count,
                         tokenizer_files_in)

PROGRAM = "jax_to_torch.py"
EXPORTERS = {"hf": export_hf, "mamba_ssm": export_mamba_ssm}
EPILOG = """\
SRC is any checkpoint the project loads: a pretraining or fine-tuning run dir (its hf/
export, else its latest checkpoint), RUN/checkpoints/STEP, a native JAX directory, a
transformers or mamba_ssm directory, or a Hub id. Formats written:
  hf         config.json + model.safetensors, for transformers' MambaForCausalLM.from_pretrained
  mamba_ssm  config.json + pytorch_model.bin, for mamba_ssm's MambaLMHeadModel.from_pretrained
             (tied embedding and lm_head share storage; vocab padded to a multiple of 8)
Tokenizer files come from --tokenizer when given, else from SRC (or its run) if it has
them. A README.md model card records the run's training data and steps (from its
config.yaml / summary.json) and, with --eval-report, the evaluation table. DST is
written atomically: on any error nothing is left behind.

examples:
  python conversions/jax_to_torch.py checkpoints/biomamba export/biomamba-hf --format hf \\
      --tokenizer ../shared/data/tokenizers/gpt-neox-20b/tokenizer.json
  python conversions/jax_to_torch.py checkpoints/biomamba export/biomamba-ssm --format mamba_ssm
  python conversions/jax_to_torch.py checkpoints/biomamba export/hf --format hf \\
      --tokenizer EleutherAI/gpt-neox-20b --overwrite
  python conversions/jax_to_torch.py runs/bioasq-finetune export/biomamba-bioasq --format hf \\
      --eval-report eval/bioasq/report.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Export a Mamba-1 checkpoint to a PyTorch directory (transformers or mamba_ssm).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="native JAX, transformers or mamba_ssm directory, or a Hub id")
    parser.add_argument("dst", metavar="DST", type=Path, help="directory to write")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS), dest="fmt",
                        help="checkpoint format to write")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json path, a directory holding it, or a Hub id; saved into DST")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--eval-report", type=Path, metavar="REPORT",
                        help="report.md or report.json of scripts/evaluate.py, copied into the model card")
    parser.add_argument("--no-model-card", action="store_true", help="do not write README.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def export() -> None:
        if args.dst.exists() and not args.overwrite:
            raise FileExistsError(f"{args.dst} exists; pass --overwrite to replace it")
        if args.eval_report is not None and not args.eval_report.is_file():
            raise FileNotFoundError(f"--eval-report {args.eval_report} does not exist")
        run_dir = run_dir_of(args.src) if Path(args.src).exists() else None
        if run_dir is not None:
            config, params, description = load_model(args.src)
            print(f"reading {description}")
            directory = Path(args.src)
        else:
            directory = resolve_source(args.src)
            print(f"reading {directory} ({detect_format(directory)} checkpoint)")
            config, params, _ = load_checkpoint(directory)
            description = f"{detect_format(directory)} checkpoint {args.src}"
        with tempfile.TemporaryDirectory(prefix="biomamba-tokenizer-") as tokenizer_dir:
            if args.tokenizer:
                print(f"loading tokenizer {args.tokenizer}")
                extra = _saved_tokenizer_files(args.tokenizer, Path(tokenizer_dir))
                label = args.tokenizer
            elif tokenizer_files_in(directory) or run_dir is None:
                extra = tokenizer_files_in(directory)
                label = str(directory / "tokenizer.json")
            else:
                found = find_tokenizer(args.src)
                extra = _saved_tokenizer_files(str(found), Path(tokenizer_dir)) if found else {}
                label = str(found)
            check_tokenizer_fits(extra, config, label)
            if not args.no_model_card:
                card = Path(tokenizer_dir) / "README.md"
                card.write_text(model_card(description, config, args.fmt, run_dir, args.eval_report))
                extra = {**extra, "README.md": card}
            tensors = tensor_count(params, config)
            print(f"converting {tensors} tensors (JAX layout -> {args.fmt} layout)")
            print(f"writing {args.dst}" + (f" (with {', '.join(sorted(extra))})" if extra else ""))
            EXPORTERS[args.fmt](params, config, args.dst, overwrite=args.overwrite, extra_files=extra)
        tied_note = " (+ lm_head.weight sharing the embedding's storage)" if (
            args.fmt == "mamba_ssm" and config.tie_embeddings) else ""
        print_summary(args.dst, f"{args.fmt} checkpoint", config, tensors, parameter_count(params), tied_note)

    return run_command(export, PROGRAM)


def _saved_tokenizer_files(source: str, directory: Path) -> dict[str, Path]:
    """Load the tokenizer as the project does and save its files into `directory`, so they
    can be copied inside the checkpoint's atomic write."""
    try:
        saved = load_tokenizer(source).save_pretrained(str(directory))
    except (ValueError, TypeError) as err:  # OSError passes through as bad input already
        raise ConversionError(f"cannot use tokenizer {source}: {err}") from err
    return {Path(path).name: Path(path) for path in saved if Path(path).is_file()}


if __name__ == "__main__":
    sys.exit(main())
