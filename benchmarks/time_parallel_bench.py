"""Time the time-parallel forward against the library's Pallas forward (one layer's scan,
fp32 inputs as `pallas_scan` takes them, B=1), after checking it against `reference`.
Usage: python benchmarks/time_parallel_bench.py [--lengths 8192,16384,65536] [--variants 64x8x4,...]"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from biomamba_jax.scan import _reference_scan  # noqa: E402
from biomamba_jax.scan_pallas import pallas_scan  # noqa: E402
from time_parallel_forward import time_parallel_scan  # noqa: E402


def inputs(batch, length, channels=1536, d_state=16):
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    return (jax.random.normal(k[0], (batch, length, channels)),
            jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels)) - 1.0),
            -jnp.exp(jax.random.normal(k[2], (channels, d_state)) * 0.5),
            jax.random.normal(k[3], (batch, length, d_state)), jax.random.normal(k[4], (batch, length, d_state)),
            jax.random.normal(k[5], (batch, channels, d_state)))


def timed(fn, x, repeats=10):
    jax.block_until_ready(fn(*x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*x))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="8192,16384,65536")
    p.add_argument("--variants", default="64x8x4,32x8x4,64x16x4,128x8x8,32x4x2", help="tile x block_e x num_warps")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    x = inputs(1, 1024, 256)
    y_ref, h_ref = jax.jit(_reference_scan)(*x)
    for v in args.variants.split(","):
        tile, block_e, warps = map(int, v.split("x"))
        try:
            y, h = jax.jit(lambda *a: time_parallel_scan(*a, tile=tile, block_e=block_e, num_warps=warps))(*x)
            err = max(float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)),
                      float(np.linalg.norm(h - h_ref) / np.linalg.norm(h_ref)))
            rows.append(dict(check=v, rel_err=err, passed=err < 1e-4))
        except Exception as e:
            rows.append(dict(check=v, error=f"{type(e).__name__}: {str(e)[:400]}"))
        print(json.dumps(rows[-1]), flush=True)
    for length in map(int, args.lengths.split(",")):
        x = inputs(1, length)
        rows.append(dict(impl="pallas", length=length, ms=timed(jax.jit(pallas_scan), x)))
        print(json.dumps(rows[-1]), flush=True)
        for v in args.variants.split(","):
            tile, block_e, warps = map(int, v.split("x"))
            fn = jax.jit(lambda *a: time_parallel_scan(*a, tile=tile, block_e=block_e, num_warps=warps))
            try:
                rows.append(dict(impl=f"time_parallel:{v}", length=length, ms=timed(fn, x)))
            except Exception as e:
                rows.append(dict(impl=f"time_parallel:{v}", length=length, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                                  command=" ".join(sys.argv), results=rows), indent=1))


if __name__ == "__main__":
    main()
