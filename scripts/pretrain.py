#!/usr/bin/env python
"""BioMamba continued pretraining of Mamba on PubMed: one GPU, a GPU node, or a cluster.

Examples:
  python scripts/pretrain.py --preset smoke                      # offline CPU smoke run (< 2 min)
  python scripts/pretrain.py                                     # biomamba-130m on all local GPUs (pmap)
  python scripts/pretrain.py data.dir=data/pubmed batch.micro_batch_per_device=16
  python scripts/pretrain.py --parallel sharding --fsdp          # jit over a Mesh, FSDP params
  python scripts/pretrain.py --resume run.out_dir=runs/biomamba-130m
  srun python scripts/pretrain.py --parallel sharding            # SLURM multi-node (auto-detected)

Overrides are `section.key=value` pairs on top of the preset (biomamba_jax/configs/*.yaml);
an unknown key stops the run before anything is compiled.
"""
import argparse
import sys

from biomamba_jax.training.config import list_presets, load_run_config
from biomamba_jax.training.loop import USER_ERRORS
from biomamba_jax.training.pretrain import pretrain


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--preset", default="biomamba-130m", choices=list_presets(),
                        help="run preset (default: %(default)s)")
    parser.add_argument("--config", help="a YAML file merged on top of the preset")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in run.out_dir (error if there is none)")
    parser.add_argument("--resume-or-start", action="store_true",
                        help="as --resume, but start a fresh run when run.out_dir holds no checkpoint")
    parser.add_argument("--init", help="'random', a checkpoint dir or a Hub id (model.init)")
    parser.add_argument("--parallel", choices=["auto", "pmap", "sharding"], help="parallel.mode")
    parser.add_argument("--fsdp", action="store_true", help="shard params/optimizer state (sharding mode)")
    parser.add_argument("--data-dir", help="prepared PubMed dir (data.dir); real data, so it also sets "
                                           "data.synthetic_files=0 unless that is given too")
    parser.add_argument("--out-dir", help="run output dir (run.out_dir)")
    parser.add_argument("--steps", type=int, help="optimizer steps (run.steps)")
    parser.add_argument("--coordinator-address", help="multi-host: host:port of process 0")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    # Intermixed: `key=value` overrides may come before, between or after the flags.
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    flag_overrides = {
        "model.init": args.init, "parallel.mode": args.parallel, "data.dir": args.data_dir,
        "run.out_dir": args.out_dir, "run.steps": args.steps,
        "parallel.coordinator_address": args.coordinator_address,
        "parallel.num_processes": args.num_processes, "parallel.process_id": args.process_id,
        "parallel.fsdp": True if args.fsdp else None,
    }
    if args.data_dir is not None and not any(o.startswith("data.synthetic_files=") for o in args.overrides):
        # A dir named on the command line holds real data: a preset's synthetic corpus
        # must neither be generated into it nor stand in for it when it is missing.
        flag_overrides["data.synthetic_files"] = 0
    overrides = [f"{k}={v}" for k, v in flag_overrides.items() if v is not None] + args.overrides
    try:
        config = load_run_config(args.preset, args.config, overrides)
        pretrain(config, resume=args.resume or args.resume_or_start, start_if_missing=args.resume_or_start)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # A stop by signal or run.stop_at has saved a checkpoint: that is a clean exit.
    return 0


if __name__ == "__main__":
    sys.exit(main())
