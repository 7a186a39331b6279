"""The per-op profile summary that `scripts/benchmark.py --profile` and `run.profile_steps` print."""
import gzip
import json
import time

import jax
import jax.numpy as jnp
import pytest

from biomamba_jax.training.profiling import op_category, profile_ops, summarize_trace


def _gpu_like_trace(path):
    """A GPU trace as JAX writes it: one stream line with the kernels, plus an "XLA Modules"
    line whose event spans the whole step and must not be counted again."""
    meta = lambda pid, tid, kind, name: dict(ph="M", pid=pid, tid=tid, name=kind, args=dict(name=name))
    kernel = lambda name, dur: dict(ph="X", pid=2, tid=7, name=name, ts=0, dur=dur)
    events = [
        meta(1, 0, "process_name", "/host:CPU"), meta(2, 0, "process_name", "/device:GPU:0"),
        meta(2, 7, "thread_name", "Stream #13(compute)"), meta(2, 3, "thread_name", "XLA Modules"),
        dict(ph="X", pid=2, tid=3, name="jit_train_step", ts=0, dur=9000.0),
        dict(ph="X", pid=1, tid=1, name="PjitFunction(train_step)", ts=0, dur=9500.0),
        kernel("backward_kernel", 3000.0), kernel("backward_kernel", 3000.0),
        kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", 1500.0),
        kernel("loop_multiply_fusion_3", 450.0), kernel("forward_kernel", 1050.0),
    ]
    with gzip.open(path, "wt") as f:
        json.dump(dict(displayTimeUnit="ns", traceEvents=events), f)


def test_summary_counts_stream_kernels_once_per_call(tmp_path):
    path = str(tmp_path / "perfetto_trace.json.gz")
    _gpu_like_trace(path)
    summary = summarize_trace(path, calls=2, top=2)
    assert summary["device_ms_per_call"] == pytest.approx(4.5)  # 9 ms of kernels over 2 calls
    assert summary["source"] == "device streams"
    assert summary["categories"] == {"scan kernel": 3.525, "matmul": 0.75, "other XLA": 0.225}
    assert [op["name"] for op in summary["ops"]] == ["backward_kernel", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT"]
    assert summary["ops"][0]["launches_per_call"] == 1.0 and summary["ops"][0]["share"] == pytest.approx(6 / 9, abs=1e-4)


def test_profile_of_a_jitted_function_on_this_backend():
    step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    summary = profile_ops(step, jnp.ones((128, 128)), calls=2)
    assert summary["device_ms_per_call"] > 0 and summary["ops"]
    assert sum(summary["categories"].values()) == pytest.approx(summary["device_ms_per_call"], rel=1e-2)


def test_trace_without_op_events_says_what_is_missing(tmp_path):
    path = str(tmp_path / "perfetto_trace.json")
    with open(path, "w") as f:
        json.dump([dict(ph="X", pid=1, tid=1, name="python", ts=0, dur=5.0)], f)
    with pytest.raises(RuntimeError, match="CUPTI"):
        summarize_trace(path, calls=1)


def test_categories():
    assert op_category("adjoint_kernel") == "scan kernel"
    assert op_category("segment_end_kernel") == "scan kernel"
    assert op_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert op_category("input_reduce_fusion_12") == "other XLA"


def test_step_profiler_window_and_busy_fraction(monkeypatch, tmp_path):
    """The window opens before step `first` and closes after step `first + steps - 1`;
    device_busy is device time over wall time, given for device traces only."""
    import biomamba_jax.training.profiling as profiling

    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: calls.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
    monkeypatch.setattr(profiling, "_latest_trace", lambda log_dir: "trace")
    monkeypatch.setattr(profiling, "summarize_trace", lambda trace, steps, top: dict(
        source="device streams", device_ms_per_call=1.0, categories={}, ops=[]))
    profiler = profiling.StepProfiler(str(tmp_path), first_step=3, steps=2)
    state = jnp.zeros(())
    for step in range(1, 7):
        profiler.before(step, state)
        time.sleep(0.01)  # a step's worth of wall time
        summary = profiler.after(step, state)
        assert (summary is not None) == (step == 4)
        if summary:
            assert calls == ["start", "stop"] and summary["first_step"] == 3 and summary["steps"] == 2
            assert summary["device_busy"] == pytest.approx(1.0 / summary["wall_ms_per_step"], rel=1e-2)
    profiler.close()
    assert calls == ["start", "stop"]  # nothing left to stop

    # A run that ends inside the window: close() stops the trace it started.
    cut_short = profiling.StepProfiler(str(tmp_path), first_step=2, steps=5)
    cut_short.before(2, state)
    cut_short.close()
    assert calls == ["start", "stop", "start", "stop"]
