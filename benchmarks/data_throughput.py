"""Throughput of the data pipeline on this machine: prepare_pubmed and the LM loader.

    python benchmarks/data_throughput.py            # writes benchmarks/data_throughput.json

prepare: a synthetic PubMed corpus (same XML shape as the baseline) is tokenized from
scratch with 1 and with N worker processes; documents/s and tokens/s are end to end
(parse + tokenize + merge + shard writing), and per worker.
loader: batches of (devices, batch_per_device, seq_len + 1) tokens + segment ids from the
prepared shards, timed over `--batches` batches after a short warm-up, compared with the
rate a training run needs (`--needed-per-gpu` tokens/s per GPU x devices).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# One tokenizer thread per worker, so "1 worker" means one core and per-worker numbers
# compare (prepare_pubmed's in-process path would otherwise use every core via Rust threads).
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from biomamba_jax.data.loader import make_lm_loader
from biomamba_jax.data.pubmed import prepare_pubmed
from biomamba_jax.data.synthetic import write_synthetic_pubmed
from biomamba_jax.data.tokenizer import DEFAULT_TOKENIZER

REPO = Path(__file__).resolve().parents[1]


def measure_prepare(corpus: list[Path], out_dir: Path, tokenizer: Path, workers: int) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    result = prepare_pubmed(corpus, out_dir, tokenizer=tokenizer, workers=workers, val_fraction=0.005,
                            shard_tokens=50_000_000, progress=False, command="benchmark")
    seconds = time.perf_counter() - started
    splits = result.manifest["splits"].values()
    documents = sum(split["documents"] for split in splits)
    tokens = sum(split["tokens"] for split in splits)
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "documents": documents,
        "tokens": tokens,
        "documents_per_s": round(documents / seconds),
        "tokens_per_s": round(tokens / seconds),
        "tokens_per_s_per_worker": round(tokens / seconds / workers),
    }


def measure_loader(data_dir: Path, seq_len: int, batch_per_device: int, devices: int, batches: int, warmup: int) -> dict:
    iterator = make_lm_loader(data_dir, "train", seq_len, batch_per_device * devices, seed=0,
                              process_index=0, process_count=1, local_devices=devices)
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - started
    assert batch["tokens"].shape == (devices, batch_per_device, seq_len + 1)
    tokens = batches * devices * batch_per_device * seq_len  # training positions, as the trainer counts
    return {
        "seq_len": seq_len,
        "batch_shape": list(batch["tokens"].shape),
        "batches": batches,
        "seconds": round(seconds, 3),
        "batches_per_s": round(batches / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
    }


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            # Other jobs on a shared machine skew every number here; the load says how much.
            "load_average_1_5_15": [round(load, 2) for load in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer.json path or Hub id")
    parser.add_argument("--files", type=int, default=16, help="synthetic XML files")
    parser.add_argument("--docs-per-file", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the parallel run's worker count")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-per-device", type=int, default=8)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--needed-per-gpu", type=int, default=150_000, help="tokens/s one GPU trains at")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "data_throughput.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = write_synthetic_pubmed(scratch / "xml", n_files=args.files, docs_per_file=args.docs_per_file, seed=0)
        corpus_bytes = sum(path.stat().st_size for path in corpus)
        prepare_runs = [measure_prepare(corpus, scratch / f"out{w}", args.tokenizer, w) for w in sorted({1, args.workers})]
        for run in prepare_runs:
            print(f"prepare, {run['workers']} worker(s): {run['documents_per_s']:,} documents/s, "
                  f"{run['tokens_per_s']:,} tokens/s ({run['tokens_per_s_per_worker']:,} per worker), {run['seconds']} s")
        loader = measure_loader(scratch / f"out{args.workers}", args.seq_len, args.batch_per_device, args.devices,
                                args.batches, args.warmup)
    needed = args.needed_per_gpu * args.devices
    loader["needed_tokens_per_s"] = needed
    loader["margin"] = round(loader["tokens_per_s"] / needed, 1)
    print(f"loader {loader['batch_shape']}: {loader['tokens_per_s']:,} tokens/s, {loader['batches_per_s']} batches/s; "
          f"needed {needed:,} tokens/s for {args.devices} GPUs -> {loader['margin']}x margin")

    results = {
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "command": "python benchmarks/data_throughput.py " + " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key not in ("out", "tokenizer")),
        "machine": machine(),
        "corpus": {"files": args.files, "documents": args.files * args.docs_per_file, "xml_bytes": corpus_bytes},
        "prepare": prepare_runs,
        "loader": loader,
    }
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
