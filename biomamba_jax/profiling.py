"""Where a jitted step spends its device time: per-kernel totals from a JAX profiler trace.

`profile_ops(fn, *args)` runs `fn` a few times under `jax.profiler.trace`, reads the
Perfetto trace JAX writes next to the TensorBoard one, and sums the duration of every
executed op (GPU kernels on a GPU; XLA thunks on a CPU) per call of `fn`. Knowing that
the backward scan kernel takes 40 ms of a 130 ms step, or that 30 ms go to XLA fusions
around it, is what decides the next optimisation; wall-clock timings alone do not.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
from typing import Callable

import jax

__all__ = ["profile_ops", "summarize_trace", "op_category"]


def op_category(name: str) -> str:
    """A coarse bucket for a kernel or op name: matmul, scan kernel, or other XLA work."""
    lowered = name.lower()
    if "_kernel" in lowered and any(k in lowered for k in ("forward", "backward", "adjoint")):
        return "scan kernel"
    if any(k in lowered for k in ("gemm", "cutlass", "nvjet", "cublas", "dot", "matmul", "xmma", "sm90_")):
        return "matmul"
    if any(k in lowered for k in ("memcpy", "memset", "copy")):
        return "copy"
    return "other XLA"


def summarize_trace(trace_file: str, calls: int, top: int = 25) -> dict:
    """Per-op device time from a Perfetto trace (`perfetto_trace.json.gz`) covering `calls`
    calls: ops sorted by time, with ms per call and share, plus totals per category.

    Device processes ("/device:GPU:0", ...) are used when the trace has them; a CPU-only
    trace falls back to the host's XLA op events (those that carry an `hlo_op`)."""
    opener = gzip.open if trace_file.endswith(".gz") else open
    with opener(trace_file, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process_names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in process_names.items() if name.startswith("/device:")}
    thread_names = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
                    if e.get("ph") == "M" and e.get("name") == "thread_name"}
    # A GPU's process has one line per CUDA stream (the kernels) beside "XLA Modules" and
    # "XLA Ops" lines that span the same time again: count the stream lines only.
    stream_lines = {key for key, name in thread_names.items() if key[0] in device_pids and name.startswith("Stream")}
    durations: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        if stream_lines:
            if (e.get("pid"), e.get("tid")) not in stream_lines:
                continue
        elif device_pids:
            if e.get("pid") not in device_pids:
                continue
        elif "hlo_op" not in e.get("args", {}):
            continue
        durations[e["name"]] += float(e.get("dur", 0.0))  # microseconds
        counts[e["name"]] += 1
    total_us = sum(durations.values())
    if not durations:
        raise RuntimeError(
            f"no device or XLA op events in {trace_file} (processes: {sorted(process_names.values())}); "
            "on a GPU the profiler needs CUPTI (the nvidia-cuda-cupti wheel that jax[cuda] installs)"
        )
    ops = sorted(durations, key=durations.get, reverse=True)
    by_category: dict[str, float] = collections.defaultdict(float)
    for name in ops:
        by_category[op_category(name)] += durations[name]
    per_call = lambda us: round(us / 1e3 / calls, 3)
    return dict(
        device_ms_per_call=per_call(total_us),
        categories={k: per_call(v) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        ops=[dict(name=name[:160], category=op_category(name), ms_per_call=per_call(durations[name]),
                  launches_per_call=round(counts[name] / calls, 2), share=round(durations[name] / total_us, 4))
             for name in ops[:top]],
    )


def profile_ops(fn: Callable, *args, calls: int = 3, top: int = 25, log_dir: str | None = None) -> dict:
    """Run `fn(*args)` `calls` times under the JAX profiler (after one untraced call, so
    compilation stays out of the trace) and summarise the ops it ran, per call."""
    jax.block_until_ready(fn(*args))
    log_dir = log_dir or tempfile.mkdtemp(prefix="biomamba-profile-")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    traces = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json*"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {log_dir}")
    summary = summarize_trace(traces[-1], calls, top)
    summary["trace"] = traces[-1]
    return summary
