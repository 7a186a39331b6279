"""Runs that stop, resume or meet bad settings keep what they wrote and say what to do."""
from pathlib import Path

import jax
import numpy as np
import pytest

from biomamba_jax.training.checkpointing import Checkpointer


def steps_on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_best_checkpoint_survives_a_resume(tmp_path):
    """Keep 2 plus the best: the best of the first process must outlive the second's saves."""
    state = {"x": np.ones(3, np.float32)}
    first = Checkpointer(tmp_path, keep=2)
    for step, val_loss in [(30, 1.0), (33, None), (36, 3.0)]:
        first.save(step, state, {}, {}, val_loss)
    first.close()
    second = Checkpointer(tmp_path, keep=2)
    for step, val_loss in [(39, 4.0), (42, None)]:
        second.save(step, state, {}, {}, val_loss)
    second.close()
    assert steps_on_disk(tmp_path) == [30, 39, 42]


def test_a_failed_background_save_is_seen_by_the_next_check_in_one_line(tmp_path, monkeypatch):
    """What the loop does each step: `raise_if_failed` after an async save whose write failed
    raises one line naming the folder, the cause and the fix; the last good checkpoint stays
    and no temporary folder is left. (test_a_failed_checkpoint_write_stops_the_run_at_once
    does the same through a whole run.)"""
    import time

    from orbax.checkpoint._src.serialization import type_handlers

    from biomamba_jax.training.checkpointing import CheckpointWriteError

    state = {"x": np.ones(3, np.float32)}
    checkpointer = Checkpointer(tmp_path, keep=3)
    checkpointer.save(1, state, {}, {})
    checkpointer.wait()

    async def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type_handlers.NumpyHandler, "_open_and_write", disk_full)
    with pytest.raises(CheckpointWriteError) as caught:
        checkpointer.save(2, state, {}, {})
        deadline = time.time() + 60
        while time.time() < deadline:  # the loop's per-step check, until the save has ended
            checkpointer.raise_if_failed()
            time.sleep(0.05)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "no space left on device" in message and "--resume (last complete checkpoint: step 1)" in message
    assert steps_on_disk(tmp_path) == [1] and not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    checkpointer.close(raise_errors=False)


def test_every_numeric_setting_is_checked_when_the_config_loads():
    from biomamba_jax.training.config import RunConfigError, list_presets, load_run_config

    for preset in list_presets():  # the shipped presets are valid
        load_run_config(preset)
    with pytest.raises(RunConfigError) as caught:
        load_run_config("smoke", overrides=["run.checkpoint_every=0", "run.log_every=0", "run.eval_every=0",
                                            "optim.peak_lr=-1e-3", "data.val_fraction=1.0"])
    lines = str(caught.value).splitlines()[1:]
    assert sorted(line.strip().split("=")[0] for line in lines) == [
        "data.val_fraction", "optim.peak_lr", "run.checkpoint_every", "run.eval_every", "run.log_every"]
    with pytest.raises(RunConfigError, match="run.steps: Value 'abc'"):
        load_run_config("smoke", overrides=["run.steps=abc"])
    with pytest.raises(RunConfigError, match="run.stop_at=99 is past run.steps=60"):
        load_run_config("smoke", overrides=["run.stop_at=99"])


def test_an_impossible_batch_split_suggests_values_that_work():
    from biomamba_jax.training.parallel import BatchPlan, BatchSplitError

    with pytest.raises(BatchSplitError) as caught:
        BatchPlan.from_tokens(524_288, 2048, 8, num_devices=3, num_processes=1)
    message = str(caught.value)
    assert "[]" not in message
    suggested = [int(n.replace(",", "")) for n in message.split("e.g. ")[1].split(" or ")]
    for tokens in suggested:  # each suggestion gives a plan with the same micro-batch
        assert BatchPlan.from_tokens(tokens, 2048, 8, num_devices=3, num_processes=1).micro_batch == 8


# ------------------------------------------------------------------ whole runs (smoke preset)
import json  # noqa: E402

from biomamba_jax.training.checkpointing import CheckpointWriteError  # noqa: E402
from biomamba_jax.training.config import load_run_config  # noqa: E402
from biomamba_jax.training.loop import RunError  # noqa: E402
from biomamba_jax.training.pretrain import pretrain  # noqa: E402

QUIET = dict(log=lambda *_: None)
FAST = ["run.eval_batches=1", "run.eval_every=100", "run.export_hf=false", "data.seq_len=32",
        "batch.global_batch_tokens=256"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    pretrain(load_run_config("smoke", overrides=[f"data.dir={root / 'data'}", f"run.out_dir={root / 'run'}",
                                                 "data.synthetic_files=1", "data.synthetic_docs_per_file=40",
                                                 *FAST, "run.steps=1"]), **QUIET)
    return root / "data"


def config_for(data_dir, out_dir, *extra):
    return load_run_config("smoke", overrides=[f"data.dir={data_dir}", f"run.out_dir={out_dir}",
                                               "data.synthetic_files=0", *FAST, *extra])


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_drops_records_logged_after_the_checkpoint_and_writes_strict_json(data_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(config_for(data_dir, out, "run.steps=8", "run.stop_at=4", "run.log_every=1"), **QUIET)
    # What a run killed after logging steps 5 and 6 but before its next checkpoint leaves behind,
    # torn last line and a non-finite value included.
    with open(out / "metrics.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 1.0}\n{"step": 6, "loss": NaN}\n{"step": 7, "lo')
    pretrain(config_for(data_dir, out, "run.steps=8", "run.log_every=1"), resume=True, **QUIET)
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == list(range(1, 9))  # each step once
    # TensorBoard is told the same: the resumed writer's file starts with a purge of step 5 on,
    # which makes TensorBoard drop what the earlier files hold from there.
    resumed_events = tensorboard_events(max((out / "tensorboard").glob("events.out.tfevents.*"),
                                            key=lambda path: path.stat().st_mtime))
    assert [(e.step, e.session_log.status) for e in resumed_events if e.HasField("session_log")] == [(5, 1)]
    json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]",
               parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))

    from biomamba_jax.training.loop import MetricsLog

    (tmp_path / "nan").mkdir()
    log = MetricsLog(tmp_path / "nan", True)
    log.write(1, {"loss": float("nan"), "grad_norm": float("inf")})
    log.close()
    assert records(tmp_path / "nan") == [{"step": 1, "loss": None, "grad_norm": None}]


def tensorboard_events(path: Path) -> list:
    """The events of one TensorBoard file (TFRecord framing: length, its CRC, data, CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, events, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
        at += 12 + length + 4
    return events


def test_resume_needs_a_checkpoint_unless_asked_to_start(data_dir, tmp_path):
    with pytest.raises(RunError, match="--resume: no checkpoint in .*--resume-or-start"):
        pretrain(config_for(data_dir, tmp_path / "typo", "run.steps=2"), resume=True, **QUIET)
    assert not (tmp_path / "typo" / "metrics.jsonl").exists()
    summary = pretrain(config_for(data_dir, tmp_path / "typo", "run.steps=2"), resume=True,
                       start_if_missing=True, **QUIET)
    assert summary["final_step"] == 2


def test_resuming_a_finished_run_changes_nothing(data_dir, tmp_path):
    out = tmp_path / "done"
    pretrain(config_for(data_dir, out, "run.steps=3"), **QUIET)
    before = (out / "summary.json").read_text()
    again = pretrain(config_for(data_dir, out, "run.steps=3"), resume=True, **QUIET)
    assert (out / "summary.json").read_text() == before
    assert again["final_step"] == 3 and again["losses"]


@pytest.mark.slow  # about a minute: a whole run until its injected write error
def test_a_failed_checkpoint_write_stops_the_run_at_once(data_dir, tmp_path, monkeypatch):
    """A write error in the background save (here injected where orbax writes array data)
    stops the run at the first step after the save has failed, and no later than the next
    save, with one message; the last good checkpoint stays and no temporary folder is left."""
    from orbax.checkpoint._src.serialization import type_handlers

    real_write, calls = type_handlers.NumpyHandler._open_and_write, []

    async def failing_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1000 or _saving_step(tmp_path) == 6:
            raise OSError(28, "No space left on device")
        return await real_write(self, *args, **kwargs)

    monkeypatch.setattr(type_handlers.NumpyHandler, "_open_and_write", failing_write)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="no space left on device.*--resume .*step 3") as caught:
        pretrain(config_for(data_dir, out, "run.steps=12", "run.checkpoint_every=3", "run.log_every=1"), **QUIET)
    assert str(out / "checkpoints") in str(caught.value) and "\n" not in str(caught.value)
    assert steps_on_disk(out / "checkpoints") == [3]
    assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]
    assert max(r["step"] for r in records(out)) < 12  # never reached the next save


def _saving_step(tmp_path) -> int:
    partial = [p.name for p in (tmp_path / "run" / "checkpoints").glob("*orbax-checkpoint-tmp*")]
    return int(partial[0].split(".")[0]) if partial else -1


def test_the_plan_names_the_scan_that_runs_the_steps_memory_and_the_compile_cache(data_dir, tmp_path):
    logged = []
    pretrain(config_for(data_dir, tmp_path / "plan", "run.steps=1", "model.scan_impl=auto"), log=logged.append)
    plan = "\n".join(str(line) for line in logged)
    assert "scan chunked:chunk=128:inner=associative" in plan  # "auto" on a CPU, every option spelt out
    memory = next(line for line in plan.splitlines() if line.startswith("memory"))
    assert "GiB per device for the compiled step" in memory or "not reported" in memory
    # The compilation cache in use (the test session's own, see conftest).
    assert f"compile      cache {jax.config.jax_compilation_cache_dir}" in plan
