#!/usr/bin/env python
"""Score models on BioASQ / PubMed / text sets in one run; write report.md, report.json and plots.

Examples:
  python scripts/evaluate.py --model base=runs/base --model biomamba=runs/smoke \\
      --model finetuned=runs/finetune-smoke --bioasq tests/fixtures/bioasq/synthetic_test.json \\
      --pubmed-dir runs/smoke/data --run-dir runs/smoke --run-dir runs/finetune-smoke --out eval/smoke
  python scripts/evaluate.py --model mamba=export/mamba-130m-hf --model gpt2=hf/gpt2 \\
      --bioasq data/bioasq/6B_golden.json --tokenizer ../shared/data/tokenizers/gpt-neox-20b/tokenizer.json

PATH is a run dir (its hf/ export, else its latest checkpoint), RUN/checkpoints/STEP, a
native JAX / transformers / mamba_ssm Mamba dir, or any transformers causal LM dir
(scored with torch; a transformers Mamba dir is scored with both JAX and torch). Results
are cached per (model, set) in OUT/cache: re-running reuses what is finished.
"""
import argparse
import sys

from biomamba_jax.evaluation.evaluate import (EvalInputError, EvalSettings, evaluate, fit_sets, load_sets, resolve_models,
                                             write_report)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", required=True)
    parser.add_argument("--bioasq", action="append", default=[], metavar="FILE", help="BioASQ Task B JSON")
    parser.add_argument("--pubmed-dir", action="append", default=[], metavar="DIR",
                        help="prepared PubMed dir (its validation split)")
    parser.add_argument("--text", action="append", default=[], metavar="FILE", help=".txt (a document per line) or .jsonl")
    parser.add_argument("--run-dir", action="append", default=[], metavar="DIR", help="training run: plot its loss curves")
    parser.add_argument("--tokenizer", help="tokenizer for models that carry none")
    parser.add_argument("--out", default="eval", help="output dir (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-answer-tokens", type=int, default=24)
    parser.add_argument("--max-docs", type=int, default=200, help="documents from a PubMed validation split")
    parser.add_argument("--no-factoid", action="store_true", help="skip beam search and the factoid metrics")
    parser.add_argument("--strict-length", action="store_true",
                        help="stop when a BioASQ question does not fit --max-tokens even with no context "
                             "(default: skip it and report the count)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = EvalSettings(max_tokens=args.max_tokens, batch_size=args.batch_size, num_beams=args.num_beams,
                            max_answer_tokens=args.max_answer_tokens, max_docs=args.max_docs,
                            factoid=not args.no_factoid)
    try:
        models = resolve_models(args.model, args.tokenizer)
        sets = load_sets(args.bioasq, args.pubmed_dir, args.text, max_docs=args.max_docs)
        sets = fit_sets(models, sets, settings, strict=args.strict_length)
        results = evaluate(models, sets, args.out, settings)
        written = write_report(results, args.out, models, sets, args.run_dir, settings)
    except EvalInputError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    print(open(written["markdown"]).read())
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
