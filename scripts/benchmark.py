"""Time training, prefill, decode and the selective scan on this machine's first device.

    python scripts/benchmark.py                                   # Mamba-130m, the pretraining preset
    python scripts/benchmark.py --size mamba-1.4b --workloads train
    python scripts/benchmark.py --workloads scan --scan-impls pallas,chunked --scan-shape 8,2048,1536,16
    python scripts/benchmark.py --workloads train model.remat=full model.scan_layers=true
    python scripts/benchmark.py --workloads train --torch mamba_ssm  # the reference, same model and shapes
    python scripts/benchmark.py --workloads train,loop            # pretrain.py's loop against the bare step

The training step and the model's run-time settings (dtype, scan impl, remat, layer scan)
come from a run preset (`--preset`, default biomamba-130m) and `section.key=value`
overrides, exactly as `scripts/pretrain.py` reads them. Weights and tokens are random.
Results print one line each and, with `--out`, go to a JSON file rewritten after every
row, so a run cut short keeps what it measured. `loop` runs `scripts/pretrain.py`'s own loop
(data, metrics, guards) on a synthetic corpus around the same step and, after `train` in
the same command, gives its ratio to the bare step. `--torch` times the PyTorch reference's own
training step instead (train only; JAX never touches the GPU in that process, so run it as
its own command, interleaved with ours: torch, jax, torch, jax).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import jax

from biomamba_jax import benchmark
from biomamba_jax.files import write_text_atomic
from biomamba_jax.model.config import PRESETS
from biomamba_jax.training.config import RunConfigError, list_presets, load_run_config

WORKLOADS = ("train", "loop", "prefill", "decode", "scan")


def parse_args(argv=None):
    ints = lambda text: [int(v) for v in text.split(",")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="biomamba-130m", choices=list_presets(), help="run preset (default: %(default)s)")
    p.add_argument("--size", choices=sorted(PRESETS), default=None,
                   help="model size instead of the preset's model.preset, e.g. mamba-1.4b")
    p.add_argument("--workloads", default="train,prefill,decode",
                   help=f"comma-separated, from {', '.join(WORKLOADS)} (default: %(default)s)")
    p.add_argument("--batch", type=ints, default=[8], help="training rows per step (default: 8)")
    p.add_argument("--length", type=ints, default=[2048], help="training sequence lengths (default: 2048)")
    p.add_argument("--prefill-length", type=ints, default=[8192, 65536], help="prefill lengths at batch 1")
    p.add_argument("--decode-batch", type=ints, default=[1, 32], help="decode batch sizes (prompt 128, 128 new)")
    p.add_argument("--scan-impls", default="auto",
                   help="impl strings for the scan workload (default: auto, what training runs here)")
    p.add_argument("--scan-shape", type=ints, action="append", default=None, metavar="B,L,E,N",
                   help="scan shape, repeatable (default: 8,2048,1536,16)")
    p.add_argument("--loop-steps", type=int, default=30,
                   help="optimizer steps of the loop workload, timed in windows of 5 after the first 10 (default: 30)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, metavar="TOP",
                   help="trace 3 more calls of train, prefill and scan with the JAX profiler; print the TOP ops "
                        "by device time")
    p.add_argument("--torch", choices=benchmark.TORCH_IMPLS, default=None,
                   help="time this PyTorch implementation's training step instead of ours (train workload only)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("overrides", nargs="*", help="run config overrides, section.key=value")
    args = p.parse_args(argv)
    unknown = sorted(set(args.workloads.split(",")) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    if "loop" in args.workloads.split(",") and args.loop_steps < 20:
        p.error(f"--loop-steps must be at least 20 (two timed windows of 5 after the first 10); got {args.loop_steps}")
    if args.torch and args.workloads != "train":
        p.error(f"--torch times the training step only; pass --workloads train (got {args.workloads!r})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_run_config(args.preset, overrides=args.overrides)
        model_config = benchmark.model_for(config, args.size)
    except (RunConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if args.torch:  # JAX must not take the GPU's memory from torch
        import torch

        meta |= {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__}
    else:
        meta |= {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__}
    results = []

    def record(row: dict) -> None:
        results.append(row)
        print(benchmark.summary_line(row), flush=True)
        for op in row.get("profile", {}).get("ops", []):
            print(f"    {op['ms_per_call']:9.3f} ms {op['launches_per_call']:6.1f}x {op['category']:12s} {op['name'][:100]}")
        if args.out:
            write_text_atomic(args.out, json.dumps({"meta": meta, "results": results}, indent=1))

    timing = {"warmup": args.warmup, "repeats": args.repeats, "profile": args.profile}
    workloads = args.workloads.split(",")
    print(json.dumps(meta), flush=True)
    for length in args.length if "train" in workloads else ():
        for batch in args.batch:
            if args.torch:
                record(benchmark.time_torch_train(config, model_config, batch, length, torch_impl=args.torch,
                                                  warmup=args.warmup, repeats=args.repeats))
            else:
                record(benchmark.time_train(config, model_config, batch, length, **timing))
    for length in args.length if "loop" in workloads else ():
        for batch in args.batch:
            row = benchmark.time_pretrain_loop(config, args.size, batch, length, steps=args.loop_steps)
            step_rows = [r for r in results if r["workload"] == "train" and (r["batch"], r["length"]) == (batch, length)]
            if step_rows:
                row["loop_over_step"] = round(row["tokens_per_s"] / step_rows[0]["tokens_per_s"], 3)
            record(row)
    for length in args.prefill_length if "prefill" in workloads else ():
        record(benchmark.time_prefill(model_config, length, **timing))
    for batch in args.decode_batch if "decode" in workloads else ():
        record(benchmark.time_decode(model_config, batch, warmup=args.warmup, repeats=args.repeats))
    for shape in (args.scan_shape or [[8, 2048, 1536, 16]]) if "scan" in workloads else ():
        for impl in args.scan_impls.split(","):
            record(benchmark.time_scan(impl, *shape, warmup=args.warmup, repeats=max(args.repeats, 10),
                                          profile=args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
