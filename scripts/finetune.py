#!/usr/bin/env python
"""BioMamba supervised fine-tuning on BioASQ factoid questions (answer tokens + EOS in the loss).

Examples:
  python scripts/finetune.py --preset finetune-smoke              # offline CPU run from runs/smoke
  python scripts/finetune.py --preset bioasq-finetune --init runs/biomamba-130m \\
      --train data/bioasq/training6b.json --eval data/bioasq/6B_golden.json
  python scripts/finetune.py --preset bioasq-finetune finetune.epochs=3 optim.peak_lr=1e-4
  python scripts/finetune.py --preset bioasq-finetune --resume

The model comes from `model.init` (--init): a pretraining run dir, a run checkpoint
(RUN/checkpoints/STEP), a native JAX / transformers / mamba_ssm dir or a Hub id. Overrides
are `section.key=value` pairs on top of the preset (biomamba_jax/configs/*.yaml).
"""
import argparse
import sys
from pathlib import Path

from biomamba_jax.training.finetune import finetune
from biomamba_jax.training.config import list_presets, load_run_config
from biomamba_jax.training.loop import USER_ERRORS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--preset", default="bioasq-finetune", choices=list_presets(),
                        help="run preset (default: %(default)s)")
    parser.add_argument("--config", help="a YAML file merged on top of the preset")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in run.out_dir (error if there is none)")
    parser.add_argument("--resume-or-start", action="store_true",
                        help="as --resume, but start a fresh run when run.out_dir holds no checkpoint")
    parser.add_argument("--init", help="model to start from (model.init)")
    parser.add_argument("--train", nargs="+", metavar="FILE", help="BioASQ training JSON file(s) (finetune.train_files)")
    parser.add_argument("--eval", nargs="+", metavar="FILE", help="BioASQ test file(s) scored as test_loss")
    parser.add_argument("--tokenizer", help="tokenizer.json, a dir or a Hub id (finetune.tokenizer)")
    parser.add_argument("--out-dir", help="run output dir (run.out_dir)")
    parser.add_argument("--epochs", type=int, help="finetune.epochs")
    args = parser.parse_intermixed_args(argv)
    for flag, files in (("--train", args.train), ("--eval", args.eval)):
        overrides = [name for name in files or () if "=" in name and not Path(name).exists()]
        if overrides:
            # nargs="+" takes every word after the flag, overrides included
            parser.error(f"{flag} takes files; {overrides[0]!r} looks like an override: give overrides before {flag}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = {"model.init": args.init, "finetune.tokenizer": args.tokenizer, "run.out_dir": args.out_dir,
             "finetune.epochs": args.epochs,
             "finetune.train_files": args.train and "[" + ",".join(args.train) + "]",
             "finetune.eval_files": args.eval and "[" + ",".join(args.eval) + "]"}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    try:
        config = load_run_config(args.preset, args.config, overrides)
        finetune(config, resume=args.resume or args.resume_or_start, start_if_missing=args.resume_or_start)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
