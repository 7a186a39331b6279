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
import time
from typing import Any, Callable, Optional

import jax

__all__ = ["profile_ops", "summarize_trace", "op_category", "StepProfiler"]


def op_category(name: str) -> str:
    """A coarse bucket for a kernel or op name: matmul, scan kernel, or other XLA work."""
    lowered = name.lower()
    if "_kernel" in lowered and any(k in lowered for k in ("forward", "backward", "adjoint", "segment")):
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
    trace falls back to the host's XLA op events (those that carry an `hlo_op`). Those
    nest (a while loop and the ops of its body), so CPU totals overcount; GPU kernels on
    a stream do not overlap."""
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
        # Only device streams give a time that the wall clock bounds (see above).
        source="device streams" if stream_lines or device_pids else "host XLA ops",
        device_ms_per_call=per_call(total_us),
        categories={k: per_call(v) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        ops=[dict(name=name[:160], category=op_category(name), ms_per_call=per_call(durations[name]),
                  launches_per_call=round(counts[name] / calls, 2), share=round(durations[name] / total_us, 4))
             for name in ops[:top]],
    )


def _latest_trace(log_dir: str) -> str:
    traces = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json*"), recursive=True),
                    key=os.path.getmtime)
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {log_dir}")
    return traces[-1]


class StepProfiler:
    """Traces `steps` consecutive steps of a training loop, host work included, and
    summarises them: device time per step by op, and the wall time per step, so that
    `device_busy` (their ratio) shows what the loop around the step costs (logging,
    loading the next batch, dispatch).

    Call `before(step, state)` with the number of the step about to run and
    `after(step, state)` once it is dispatched; `after` returns the summary when the
    window closes, else None."""

    def __init__(self, log_dir: str, first_step: int, steps: int, top: int = 25):
        self.log_dir, self.first, self.last, self.top = log_dir, first_step, first_step + steps - 1, top
        self._started: Optional[float] = None

    def before(self, step: int, state: Any) -> None:
        if step == self.first:
            jax.block_until_ready(state)  # earlier steps stay out of the window
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self._started = time.perf_counter()

    def after(self, step: int, state: Any) -> Optional[dict]:
        if step != self.last or self._started is None:
            return None
        jax.block_until_ready(state)
        wall = time.perf_counter() - self._started
        self.close()
        steps = self.last - self.first + 1
        summary = summarize_trace(_latest_trace(self.log_dir), steps, self.top)
        busy = summary["device_ms_per_call"] * steps / (wall * 1e3)
        summary.update(first_step=self.first, steps=steps, wall_ms_per_step=round(wall * 1e3 / steps, 3),
                       device_busy=round(busy, 4) if summary["source"] == "device streams" else None)
        return summary

    def close(self) -> None:
        """Stop a trace still running (a run that ended or failed inside the window)."""
        if self._started is not None:
            self._started = None
            jax.profiler.stop_trace()


def profile_ops(fn: Callable, *args, calls: int = 3, top: int = 25, log_dir: str | None = None) -> dict:
    """Run `fn(*args)` `calls` times under the JAX profiler (after one untraced call, so
    compilation stays out of the trace) and summarise the ops it ran, per call."""
    jax.block_until_ready(fn(*args))
    log_dir = log_dir or tempfile.mkdtemp(prefix="biomamba-profile-")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    trace = _latest_trace(log_dir)
    summary = summarize_trace(trace, calls, top)
    summary["trace"] = trace
    return summary
