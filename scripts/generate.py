#!/usr/bin/env python
"""Complete prompts with a Mamba model through the cached recurrent decoder.

Examples:
  python scripts/generate.py --model runs/finetune-smoke --prompt "Question: What is the target of Rozustat?"
  python scripts/generate.py --model runs/smoke --prompts-file prompts.txt --temperature 0.8 --top-p 0.9
  python scripts/generate.py --model export/hf --prompts-file prompts.jsonl --max-new-tokens 64 --seed 1

One --prompt streams its completion token by token (a jitted `model.step` per token);
--prompts-file (one prompt per line, or .jsonl with a "prompt" or "text" field) is decoded
as one left-padded batch by the jitted `generate` loop, one completion per line (jsonl
in, jsonl out). temperature 0 is greedy.
"""
import argparse
import json
import sys
from pathlib import Path

from biomamba_jax.generation import GenerateError, batch_complete, load_generator, stream_complete


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run dir, checkpoint dir or Hub id")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt")
    prompts.add_argument("--prompts-file", type=Path)
    parser.add_argument("--tokenizer", help="when the model carries none")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    try:
        generator = load_generator(args.model, args.tokenizer)
        if args.prompt is not None:
            for piece in stream_complete(generator, args.prompt, **sampling):
                print(piece, end="", flush=True)
            print()
            return 0
        lines = [line for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        is_jsonl = args.prompts_file.suffix == ".jsonl"
        prompts = [(lambda r: r.get("prompt", r.get("text")))(json.loads(line)) if is_jsonl else line for line in lines]
        for prompt, completion in zip(prompts, batch_complete(generator, prompts, **sampling)):
            print(json.dumps({"prompt": prompt, "completion": completion}) if is_jsonl else completion.replace("\n", "\\n"))
    except (GenerateError, OSError, ValueError) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
