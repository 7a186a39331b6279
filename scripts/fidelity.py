"""Train one random Mamba init in JAX and in PyTorch on the same batches; compare the losses.

    python scripts/fidelity.py --size tiny --vocab-size 64 --steps 8 --scan-impl reference   # CPU, fp32: must agree
    python scripts/fidelity.py --size mamba-130m --steps 300 --batch 8 --length 2048 --data-dir DATA \\
        --dtype bfloat16 --torch-impl mamba_ssm --torch-device cuda --spread float32,repeat --skip-steps 10 \\
        --detail-rows 2 --variants mosaic,pallas --decode-prompts 32 --out runs/fidelity-130m

--spread runs the torch side again in equivalent settings, one run per comma-separated
kind (float32: no autocast, its fp32 kernels; order: the same batches in another order;
repeat: the same run again, which differs only where its kernels are nondeterministic);
the largest distance of any of them from the first run is the tolerance the JAX curve is
judged by, step by step after --skip-steps. --detail-rows N then compares one step of the
trained weights on N fresh rows in detail: logits and per-parameter gradients of torch in
bf16 and of JAX with each --variants scan impl, all against torch in float32.
--decode-prompts N compares greedy decoding of the trained weights (N prompts of
--prompt-length tokens, --decode-tokens new ones), JAX's generate against the torch
implementation's own, in bf16 and in float32.

Both sides run the pretraining recipe of a run preset (`--preset`; --lr/--warmup replace
its peak lr and warmup): AdamW with the project's weight-decay mask, warmup + cosine lr
over exactly --steps steps, global-norm clip. The JAX side is the library's own train
step; the torch side is transformers' MambaForCausalLM or mamba_ssm's MambaLMHeadModel,
loaded from the project's export of the same init. Tokens are random, or rows of a
prepared PubMed dir (--data-dir) in the order pretraining reads them.

--out DIR gets results.json (the curves, the comparisons, the settings) and curves.png,
written after each curve, again after the detailed step and after the decoding, so a run
cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import math
import tempfile
import time
from pathlib import Path

import numpy as np

# Both frameworks share one GPU here: JAX must not take 75% of its memory at start-up,
# which it does by default, or torch runs out.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from biomamba_jax import fidelity  # noqa: E402
from biomamba_jax.files import write_text_atomic  # noqa: E402
from biomamba_jax.model.config import ConfigError, PRESETS  # noqa: E402
from biomamba_jax.training.config import RunConfigError, list_presets, load_run_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="biomamba-130m", choices=list_presets(),
                   help="run preset whose optim section is the recipe (default: %(default)s)")
    p.add_argument("--size", choices=sorted(PRESETS), default="tiny", help="model preset (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary rows instead of the preset's")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps; the lr schedule spans them (default: 8)")
    p.add_argument("--batch", type=int, default=2, help="rows per step (default: 2)")
    p.add_argument("--length", type=int, default=32, help="tokens per row (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and of the batches (default: 0)")
    p.add_argument("--lr", type=float, default=None, help="peak lr instead of the preset's")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps instead of the preset's")
    p.add_argument("--data-dir", default=None, help="prepared PubMed dir to take rows from (default: random tokens)")
    p.add_argument("--distinct-batches", type=int, default=None, metavar="N",
                   help="random tokens only: cycle through N batches (1 = memorise one; uniform tokens are "
                        "otherwise unlearnable and the curve is flat). Default: every batch fresh")
    p.add_argument("--torch-impl", choices=fidelity.TORCH_IMPLS, default="auto",
                   help="PyTorch model: transformers, mamba_ssm, or auto = mamba_ssm where it imports "
                        "(default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype: JAX model dtype, torch autocast (default: %(default)s)")
    p.add_argument("--scan-impl", default=None, help="JAX scan implementation (default: the model config's)")
    p.add_argument("--torch-device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    p.add_argument("--skip-steps", type=int, default=0, help="leave the first steps out of the comparison")
    p.add_argument("--spread", type=spread_kinds, default=[], metavar="KINDS",
                   help="more torch runs whose largest distance from the first is the tolerance, comma-separated: "
                        f"{', '.join(SPREADS)}: float32 compute, the same batches in another order, the same run "
                        "again (default: none)")
    p.add_argument("--detail-rows", type=int, default=0, metavar="N",
                   help="compare one step of the trained weights on N fresh rows in detail (default: skip)")
    p.add_argument("--variants", default=None,
                   help="comma-separated JAX scan impls for --detail-rows, e.g. mosaic,pallas:fuse=true "
                        "(default: the model config's)")
    p.add_argument("--decode-prompts", type=int, default=0, metavar="N",
                   help="compare greedy decoding of the trained weights from N prompts (default: skip)")
    p.add_argument("--prompt-length", type=int, default=64, help="tokens per decoding prompt (default: 64)")
    p.add_argument("--decode-tokens", type=int, default=128, help="new tokens per prompt (default: 128)")
    p.add_argument("--out", default=None, help="output folder for results.json and curves.png, rewritten "
                                              "after each stage so a cut run keeps what it finished")
    return p.parse_args(argv)


def release_torch_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SPREADS = ("float32", "order", "repeat")


def spread_kinds(text: str) -> list[str]:
    """`--spread`'s value: "none" or a comma-separated list of distinct SPREADS."""
    kinds = [] if text == "none" else [kind.strip() for kind in text.split(",")]
    unknown = [kind for kind in kinds if kind not in SPREADS]
    if unknown or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct kinds from {', '.join(SPREADS)}, comma-separated, "
                                         f"or none")
    return kinds


def check_args(args) -> None:
    for name in ("steps", "batch", "length", "prompt_length", "decode_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("detail_rows", "decode_prompts", "skip_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if "float32" in args.spread and args.dtype == "float32":
        raise ValueError("--spread float32 compares with the float32 run itself; use it with --dtype bfloat16, "
                         "or take --spread order")
    if args.decode_prompts and args.prompt_length > args.length:
        raise ValueError(f"--prompt-length {args.prompt_length} is longer than the rows (--length {args.length})")


def token_batches(args, config, count: int) -> np.ndarray:
    if args.data_dir:
        return fidelity.pubmed_token_batches(args.data_dir, count, args.batch, args.length, args.seed)
    distinct = args.distinct_batches
    return fidelity.random_token_batches(count, args.batch, args.length, config.vocab_size, args.seed,
                                         distinct=distinct if distinct is None else min(distinct, count))


def progress(name: str, total: int):
    bar = tqdm(total=total, desc=name, unit="step")

    def on_step(_, row):
        bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        bar.update()

    return bar, on_step


def timed(seconds: dict, name: str, total: int, run):
    bar, on_step = progress(name, total)
    began = time.perf_counter()
    result = run(on_step)
    seconds[name] = round(time.perf_counter() - began, 1)
    bar.close()
    release_torch_memory()
    return result


def spread_verdict(comparison: dict, spreads: dict[str, dict]) -> dict:
    """The JAX curve is within the reference's own spread when, at every compared step,
    its distance from the reference is at most the largest distance any other reference
    run had over the compared steps (one number: a per-step spread is itself noisy, and
    so is one run's maximum, which is why several runs can set it)."""
    widest = max(spreads, key=lambda name: spreads[name]["max_abs_diff"])
    tolerance = spreads[widest]["max_abs_diff"]
    within = np.asarray(comparison["abs_diff"]) <= tolerance
    return {"tolerance_abs": tolerance, "tolerance_from": widest, "steps_within": int(within.sum()),
            "steps_compared": int(within.size), "all_within": bool(within.all()),
            "jax_max_abs_diff": comparison["max_abs_diff"], "jax_mean_abs_diff": comparison["mean_abs_diff"],
            "spread_mean_abs_diff": {name: spread["mean_abs_diff"] for name, spread in spreads.items()}}


def detailed_step(args, config, trained, trained_dir, rows, torch_impl) -> dict:
    torch_kwargs = {"torch_impl": torch_impl, "device": args.torch_device}
    reference = fidelity.torch_step(trained_dir, config, rows, dtype="float32", **torch_kwargs)
    baseline = f"{torch_impl} bfloat16"
    runs = {baseline: fidelity.torch_step(trained_dir, config, rows, dtype="bfloat16", **torch_kwargs)}
    release_torch_memory()
    runs["jax float32"] = fidelity.jax_step(config.replace(dtype="float32"), trained, rows, matmul_precision="highest")
    for variant in (args.variants.split(",") if args.variants else [str(config.scan_impl)]):
        runs[f"jax bfloat16 {variant}"] = fidelity.jax_step(config.replace(dtype="bfloat16", scan_impl=variant),
                                                            trained, rows)
    report = fidelity.step_detail(reference, runs, baseline)
    for name, entry in report.items():
        print(f"one step vs {torch_impl} float32, {name}: logits {entry['logits']:.3g} (x{entry['logits_ratio']:.2f} "
              f"of {baseline}), grads worst x{entry['grads_ratio_max']:.2f} ({entry['worst_grad']}), "
              f"median x{entry['grads_ratio_median']:.2f}")
    return {"reference": f"{torch_impl} float32", "baseline": baseline, "rows": int(rows.shape[0]), "runs": report}


def decoding(args, config, trained, trained_dir, prompts, torch_impl, keep=lambda partial: None) -> dict:
    """Greedy decoding of `prompts` by torch and JAX, bf16 and fp32. Each pair is compared as
    soon as both sides have decoded, and `keep` gets what is done after every decoder, so a
    run cut short keeps the pairs it finished."""
    torch_kwargs = {"torch_impl": torch_impl, "device": args.torch_device}
    tokens, logits, report = {}, {}, {}
    pairs = [("jax bfloat16", f"{torch_impl} bfloat16"), (f"{torch_impl} bfloat16", f"{torch_impl} float32"),
             ("jax float32", f"{torch_impl} float32")]
    began = time.perf_counter()

    def torch_decoder(dtype):
        def decode():
            tokens[f"{torch_impl} {dtype}"], logits[f"{torch_impl} {dtype}"] = fidelity.torch_greedy(
                trained_dir, prompts, args.decode_tokens, dtype=dtype, **torch_kwargs)
            release_torch_memory()
        return f"{torch_impl} {dtype}", decode

    def jax_decoder(dtype, precision):
        def decode():
            with jax.default_matmul_precision(precision):
                tokens[f"jax {dtype}"] = fidelity.jax_greedy(config.replace(dtype=dtype), trained, prompts,
                                                             args.decode_tokens)
        return f"jax {dtype}", decode

    def summary():
        return {"prompts": int(prompts.shape[0]), "prompt_length": args.prompt_length, "new_tokens": args.decode_tokens,
                "pairs": dict(report), "tokens": {name: value.tolist() for name, value in tokens.items()}}

    # In the order the pairs complete: the bf16 comparison first, the slow fp32 JAX last.
    for name, decode in (torch_decoder("bfloat16"), jax_decoder("bfloat16", None), torch_decoder("float32"),
                         jax_decoder("float32", "highest")):  # highest: no TF32 in fp32
        decode()
        print(f"greedy {name}: done at {time.perf_counter() - began:.0f} s")
        for candidate, reference in pairs:
            key = f"{candidate} vs {reference}"
            if key in report or candidate not in tokens or reference not in tokens:
                continue
            entry = fidelity.prefix_agreement(tokens[reference], tokens[candidate])
            entry["divergences"] = fidelity.divergence_gaps(tokens[reference], tokens[candidate], logits[reference])
            report[key] = entry
            steps = [round(d["gap_in_bf16_steps"], 1) for d in entry["divergences"]]
            print(f"greedy {key}: {entry['fraction']:.3f} of tokens before the first divergence, "
                  f"{entry['rows_identical']}/{entry['rows']} rows identical; gaps at divergence in bf16 steps {steps}")
        keep(summary())
    return summary()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        optim = load_run_config(args.preset).optim
        optim = dataclasses.replace(optim, **{k: v for k, v in (("peak_lr", args.lr), ("warmup_steps", args.warmup))
                                              if v is not None})
        overrides = {"dtype": args.dtype, "reset_at_documents": False}  # mamba_ssm never resets
        if args.vocab_size:
            overrides["vocab_size"] = args.vocab_size
        if args.scan_impl:
            overrides["scan_impl"] = args.scan_impl
        config, params = fidelity.random_start(args.size, args.seed, **overrides)
        torch_impl = fidelity.resolve_torch_impl(args.torch_impl)
    except (RunConfigError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Rows for the detailed step and the prompts come after the training batches: unseen.
    held_out_rows = max(args.detail_rows, args.decode_prompts)
    extra = math.ceil(held_out_rows / args.batch)
    every = token_batches(args, config, args.steps + extra)
    batches, held_out = every[:args.steps], every[args.steps:].reshape(-1, args.length + 1)
    if every.max() >= config.vocab_size:
        print(f"error: token id {every.max()} of {args.data_dir} is outside the model's vocabulary "
              f"({config.vocab_size}); pass a larger --vocab-size or --size", file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else None
    seconds: dict = {}
    results: dict = {}
    curves: dict = {}

    def save():
        if not out:
            return
        meta = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "jax_backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
                "torch_impl": torch_impl, "seconds_with_compilation": seconds}
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        write_text_atomic(out / "results.json", json.dumps(
            {"meta": meta, "settings": settings, "optim": dataclasses.asdict(optim), "model": config.to_dict(),
             "curves": curves, **results}, indent=1))
        fidelity.plot_curves({f"torch ({name})": run["loss"] for name, run in curves.items() if name != "jax"}
                             | ({"jax": curves["jax"]["loss"]} if "jax" in curves else {}),
                             out / "curves.png", title=f"{args.size}, {args.dtype}, batch {args.batch} x {args.length}")
        print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")

    with tempfile.TemporaryDirectory(prefix="biomamba-fidelity-") as scratch:
        start_dir = fidelity.export_start(config, params, Path(scratch) / f"start-{torch_impl}", torch_impl)

        def torch_run(dtype, order):
            return lambda on_step: fidelity.torch_losses(start_dir, order, optim, torch_impl=torch_impl, dtype=dtype,
                                                         device=args.torch_device, on_step=on_step)

        # Torch first: its cached GPU memory is handed back before JAX's step needs it.
        curves[torch_impl] = timed(seconds, torch_impl, args.steps, torch_run(args.dtype, batches))
        save()  # each finished curve is kept, should a long run be cut short later
        for kind in args.spread:
            dtype, order = args.dtype, batches
            if kind == "float32":
                dtype = "float32"
            elif kind == "order":
                # Rotated by half a run: every step sees another batch than the first run did.
                order = np.roll(batches, max(1, args.steps // 2), axis=0)
            curves[f"{torch_impl} {kind}"] = timed(seconds, f"{torch_impl} {kind}", args.steps, torch_run(dtype, order))
            save()
        jax_curves, trained = timed(seconds, "jax", args.steps,
                                    lambda on_step: fidelity.jax_losses(config, params, batches, optim, on_step))
        curves["jax"] = jax_curves
        reference = curves[torch_impl]["loss"]
        comparison = fidelity.compare_curves(reference, jax_curves["loss"], args.skip_steps)
        print(f"{args.steps} steps, {args.dtype}, jax vs {torch_impl}: loss max rel diff "
              f"{comparison['max_rel_diff']:.3g}, mean {comparison['mean_rel_diff']:.3g}; final loss "
              f"jax {comparison['final_candidate']:.5f}, torch {comparison['final_reference']:.5f}; mean of the last "
              f"{comparison['tail_steps']} jax {comparison['tail_mean_candidate']:.5f}, torch "
              f"{comparison['tail_mean_reference']:.5f}")
        results["comparison"] = {"reference": torch_impl, **comparison}
        results["grad_norm_comparison"] = fidelity.compare_curves(curves[torch_impl]["grad_norm"],
                                                                  jax_curves["grad_norm"], args.skip_steps)
        if args.spread:
            spreads = {f"{torch_impl} {kind}": fidelity.compare_curves(reference, curves[f"{torch_impl} {kind}"]["loss"],
                                                                       args.skip_steps) for kind in args.spread}
            verdict = spread_verdict(comparison, spreads)
            results["spreads"] = spreads
            results["verdict"] = verdict
            means = ", ".join(f"{name} {mean:.4g}" for name, mean in verdict["spread_mean_abs_diff"].items())
            print(f"tolerance from {torch_impl} against itself ({verdict['tolerance_from']}): "
                  f"{verdict['tolerance_abs']:.4g}; jax within it at {verdict['steps_within']}/"
                  f"{verdict['steps_compared']} steps (jax max {verdict['jax_max_abs_diff']:.4g}, mean "
                  f"{verdict['jax_mean_abs_diff']:.4g}; spread means {means})")
        save()
        if held_out_rows:
            trained_dir = fidelity.export_start(config, trained, Path(scratch) / f"trained-{torch_impl}", torch_impl)
            if args.detail_rows:
                results["one_step"] = detailed_step(args, config, trained, trained_dir,
                                                    held_out[:args.detail_rows], torch_impl)
                save()
            if args.decode_prompts:

                def keep_greedy(partial):
                    results["greedy"] = partial
                    save()

                decoding(args, config, trained, trained_dir, held_out[:args.decode_prompts, :args.prompt_length],
                         torch_impl, keep=keep_greedy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
