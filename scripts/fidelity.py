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
import sys
import tempfile
from pathlib import Path

import jax
from tqdm import tqdm

from biomamba_jax import fidelity
from biomamba_jax.files import write_text_atomic
from biomamba_jax.model.config import ConfigError, PRESETS
from biomamba_jax.training.config import RunConfigError, list_presets, load_run_config


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
        batches = fidelity.random_token_batches(args.steps, args.batch, args.length, config.vocab_size, args.seed)
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
        bar, on_step = progress("jax")
        jax_curves = fidelity.jax_losses(config, params, batches, optim, on_step=on_step)
        bar.close()
        bar, on_step = progress(torch_impl)
        torch_curves = fidelity.torch_losses(start_dir, batches, optim, torch_impl=torch_impl, dtype=args.dtype,
                                             device=args.torch_device, on_step=on_step)
        bar.close()
    comparison = fidelity.compare_curves(torch_curves["loss"], jax_curves["loss"], args.skip_steps)
    print(f"{args.steps} steps, {args.dtype}, jax vs {torch_impl}: loss max rel diff "
          f"{comparison['max_rel_diff']:.3g}, mean {comparison['mean_rel_diff']:.3g}; final loss "
          f"jax {comparison['final_candidate']:.5f}, torch {comparison['final_reference']:.5f}")
    if out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        results = {"meta": {"command": " ".join(["python"] + sys.argv),
                            "date": datetime.datetime.now().isoformat(timespec="seconds"),
                            "jax_backend": jax.default_backend(), "torch_impl": torch_impl},
                   "settings": settings, "optim": dataclasses.asdict(optim), "model": config.to_dict(),
                   "jax": jax_curves, "torch": torch_curves,
                   "comparison": {"reference": "torch", **comparison}}
        write_text_atomic(out / "results.json", json.dumps(results, indent=1))
        fidelity.plot_curves({f"torch ({torch_impl})": torch_curves["loss"], "jax": jax_curves["loss"]},
                             out / "curves.png", title=f"{args.size}, {args.dtype}, batch {args.batch} x {args.length}")
        print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
