"""Train one random Mamba init in JAX and in PyTorch on the same batches; compare the losses.

    python scripts/fidelity.py --size tiny --vocab-size 64 --steps 8 --scan-impl reference   # CPU, fp32: must agree
    python scripts/fidelity.py --size mamba-130m --steps 500 --batch 8 --length 2048 \\
        --dtype bfloat16 --torch-impl mamba_ssm --torch-device cuda --out runs/fidelity-130m

Both sides run the pretraining recipe of a run preset (`--preset`; --lr/--warmup replace
its peak lr and warmup): AdamW with the project's weight-decay mask, warmup + cosine lr
over exactly --steps steps, global-norm clip. The JAX side is the library's own train
step; the torch side is transformers' MambaForCausalLM or mamba_ssm's MambaLMHeadModel,
loaded from the project's export of the same init. Tokens are random, or rows of a
prepared PubMed dir (--data-dir) in the order pretraining reads them.

--out DIR gets results.json (both curves, the comparison from --skip-steps on, the
settings), curves.png and the exported start (start-<impl>/), for a rerun elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

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
    p.add_argument("--out", default=None, help="output folder for results.json, curves.png and the start")
    return p.parse_args(argv)


def release_torch_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
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
    if args.data_dir:
        batches = fidelity.pubmed_token_batches(args.data_dir, args.steps, args.batch, args.length, args.seed)
    else:
        batches = fidelity.random_token_batches(args.steps, args.batch, args.length, config.vocab_size, args.seed,
                                                distinct=args.distinct_batches)
    if batches.max() >= config.vocab_size:
        print(f"error: token id {batches.max()} of {args.data_dir} is outside the model's vocabulary "
              f"({config.vocab_size}); pass a larger --vocab-size or --size", file=sys.stderr)
        return 2

    def progress(name):
        bar = tqdm(total=args.steps, desc=name, unit="step")

        def on_step(_, row):
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            bar.update()

        return bar, on_step

    out = Path(args.out) if args.out else None
    with tempfile.TemporaryDirectory(prefix="biomamba-fidelity-") as scratch:
        start_dir = fidelity.export_start(config, params, (out or Path(scratch)) / f"start-{torch_impl}", torch_impl)
        # Torch first: its cached GPU memory can be handed back before JAX's step needs it.
        seconds = {}
        bar, on_step = progress(torch_impl)
        began = time.perf_counter()
        torch_curves = fidelity.torch_losses(start_dir, batches, optim, torch_impl=torch_impl, dtype=args.dtype,
                                             device=args.torch_device, on_step=on_step)
        seconds["torch"] = round(time.perf_counter() - began, 1)
        bar.close()
        release_torch_memory()
        bar, on_step = progress("jax")
        began = time.perf_counter()
        jax_curves = fidelity.jax_losses(config, params, batches, optim, on_step=on_step)
        seconds["jax"] = round(time.perf_counter() - began, 1)
        bar.close()
    comparison = fidelity.compare_curves(torch_curves["loss"], jax_curves["loss"], args.skip_steps)
    print(f"{args.steps} steps, {args.dtype}, jax vs {torch_impl}: loss max rel diff "
          f"{comparison['max_rel_diff']:.3g}, mean {comparison['mean_rel_diff']:.3g}; final loss "
          f"jax {comparison['final_candidate']:.5f}, torch {comparison['final_reference']:.5f}; mean of the last "
          f"{comparison['tail_steps']} jax {comparison['tail_mean_candidate']:.5f}, torch "
          f"{comparison['tail_mean_reference']:.5f}")
    if out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        results = {"meta": {"command": " ".join(["python"] + sys.argv),
                            "date": datetime.datetime.now().isoformat(timespec="seconds"),
                            "jax_backend": jax.default_backend(), "torch_impl": torch_impl,
                            "seconds_with_compilation": seconds},
                   "settings": settings, "optim": dataclasses.asdict(optim), "model": config.to_dict(),
                   "jax": jax_curves, "torch": torch_curves,
                   "comparison": {"reference": "torch", **comparison},
                   "grad_norm_comparison": fidelity.compare_curves(torch_curves["grad_norm"], jax_curves["grad_norm"],
                                                                   args.skip_steps)}
        write_text_atomic(out / "results.json", json.dumps(results, indent=1))
        fidelity.plot_curves({f"torch ({torch_impl})": torch_curves["loss"], "jax": jax_curves["loss"]},
                             out / "curves.png", title=f"{args.size}, {args.dtype}, batch {args.batch} x {args.length}")
        print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
