"""Device driver for the pretraining measurements: prepare data once, then run
`pretrain` under several settings and record tokens/s, MFU and peak memory.

Usage (on the GPU machine, from the repo root):
  python benchmarks/pretrain_device.py prepare --out data/bench --tokenizer TOKENIZER --xml SAMPLE.xml
  python benchmarks/pretrain_device.py run --name NAME --json OUT.jsonl [section.key=value ...]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax


def prepare(args):
    from biomamba_jax.data import prepare_pubmed, write_synthetic_pubmed

    files = write_synthetic_pubmed(Path(args.out) / "xml", n_files=args.files, docs_per_file=args.docs, seed=0)
    result = prepare_pubmed([*files, *args.xml], args.out, tokenizer=args.tokenizer, workers=args.workers,
                            val_fraction=0.01, progress=False, command=" ".join(sys.argv))
    print(result.summary())


def run(args):
    from biomamba_jax.run_config import load_run_config
    from biomamba_jax.trainer import pretrain

    config = load_run_config(args.preset, overrides=args.overrides)
    started = time.time()
    summary = pretrain(config)
    wall = time.time() - started
    lines = [json.loads(l) for l in (Path(config.run.out_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "tokens_per_s" in l]
    steady = train[2:] or train  # the first log lines include compilation
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices()]
    row = {
        "name": args.name, "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
        "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "parallel": config.parallel.mode, "seq_len": config.data.seq_len,
        "global_batch_tokens": config.batch.global_batch_tokens,
        "micro_batch_per_device": config.batch.micro_batch_per_device, "scan_impl": config.model.scan_impl,
        "steps": summary["final_step"], "tokens_per_s": statistics.median(l["tokens_per_s"] for l in steady),
        "mfu": statistics.median(l.get("mfu", 0.0) for l in steady),
        "peak_gib_per_device": max(peaks) / 2**30, "wall_s": wall,
        "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
        "val_loss": summary["eval"].get("val_loss") if summary["eval"] else None,
    }
    row["tokens_per_s_per_device"] = row["tokens_per_s"] / row["devices"]
    with open(args.json, "a") as out:
        out.write(json.dumps(row) + "\n")
    print("RESULT", json.dumps(row))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--xml", nargs="*", default=[])
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--docs", type=int, default=2500)
    p.add_argument("--workers", type=int, default=8)
    r = sub.add_parser("run")
    r.add_argument("--name", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--preset", default="biomamba-130m")
    r.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
