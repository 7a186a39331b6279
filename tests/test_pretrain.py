"""End-to-end runs of scripts/pretrain.py on CPU: smoke, resume, preemption, kill -9,
multi-process start-up, and the early errors."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from biomamba_jax.training.config import RunConfigError, load_run_config
from biomamba_jax.training.loop import RunError
from biomamba_jax.training.pretrain import pretrain
from helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pretrain.py"

# A run small enough for CPU tests: tiny model, 32-token rows, 8 rows per step.
FAST = ["data.seq_len=32", "batch.global_batch_tokens=256", "batch.micro_batch_per_device=4",
        "run.log_every=1", "run.eval_every=1000", "run.export_hf=false", "optim.warmup_steps=2"]


def env(devices: int = 1) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One synthetic corpus, prepared through the real pipeline, shared by the runs here."""
    root = tmp_path_factory.mktemp("pretrain")
    config = load_run_config("smoke", overrides=[f"data.dir={root / 'data'}", f"run.out_dir={root / 'run'}",
                                                 "data.synthetic_docs_per_file=40", *FAST, "run.steps=1"])
    pretrain(config, log=lambda *_: None)
    return root / "data"


def run_config(data_dir, out_dir, *extra):
    return load_run_config("smoke", overrides=[f"data.dir={data_dir}", f"run.out_dir={out_dir}",
                                               "data.synthetic_files=0", *FAST, *extra])


def logged_losses(out_dir) -> dict[int, float]:
    text = (Path(out_dir) / "metrics.jsonl").read_text()
    # The file may be read while a run is writing (or was killed writing) its last line.
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_cli_smoke_run_writes_every_output(tmp_path, capsys):
    """The script's smoke preset, shortened: a synthetic corpus generated and prepared, a
    few steps, an evaluation, and every output a run leaves behind."""
    fast = [option for option in FAST if not option.startswith("run.export_hf")]
    argv = ["--preset", "smoke", f"run.out_dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}",
            "data.synthetic_docs_per_file=40", *fast, "run.steps=3", "run.eval_every=3", "run.eval_batches=1"]
    assert load_script("pretrain").main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [step for step, _ in summary["losses"]] == [1, 2, 3]
    assert all(np.isfinite(loss) for _, loss in summary["losses"]) and np.isfinite(summary["eval"]["val_loss"])
    assert (tmp_path / "data" / "manifest.json").exists()
    assert (tmp_path / "run" / "hf" / "model.safetensors").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert "== smoke: plan ==" in out and "== done: step 3/3" in out
    assert "loss chunked (1024 tokens per chunk)" in out  # loss_impl "auto" on a CPU


@pytest.mark.slow  # the whole preset in a fresh process; test_cli_smoke_run_writes_every_output is its short form
def test_smoke_preset_runs_and_loss_decreases(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", f"run.out_dir={tmp_path / 'run'}",
                          f"data.dir={tmp_path / 'data'}"], env=env(), capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    losses = [loss for _, loss in summary["losses"]]
    assert losses[-1] < 0.6 * losses[0]
    assert summary["eval"]["val_loss"] < losses[0]
    assert (tmp_path / "run" / "hf" / "model.safetensors").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert "== smoke: plan ==" in out.stdout and "== done" in out.stdout


def test_resumed_run_reproduces_uninterrupted_losses(data_dir, tmp_path):
    pretrain(run_config(data_dir, tmp_path / "a", "run.steps=8"), log=lambda *_: None)
    first = pretrain(run_config(data_dir, tmp_path / "b", "run.steps=8", "run.stop_at=4"), log=lambda *_: None)
    assert first["final_step"] == 4 and first["stopped_by"] == "run.stop_at=4"
    resumed = pretrain(run_config(data_dir, tmp_path / "b", "run.steps=8"), resume=True, log=lambda *_: None)
    assert resumed["start_step"] == 4 and resumed["final_step"] == 8
    a, b = logged_losses(tmp_path / "a"), logged_losses(tmp_path / "b")
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]


def test_existing_run_needs_resume_and_resume_or_start_starts_fresh(data_dir, tmp_path):
    summary = pretrain(run_config(data_dir, tmp_path / "c", "run.steps=2"), resume=True, start_if_missing=True,
                       log=lambda *_: None)
    assert summary["start_step"] == 0 and summary["final_step"] == 2
    with pytest.raises(RunError, match="pass --resume"):
        pretrain(run_config(data_dir, tmp_path / "c", "run.steps=2"), log=lambda *_: None)


def _start(data_dir, out_dir, *extra):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "smoke", f"data.dir={data_dir}",
                             f"run.out_dir={out_dir}", "data.synthetic_files=0", *FAST, *extra],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process, what, timeout=300):
    """Poll `condition` until it holds, failing early (with its stderr) if the run dies."""
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        if time.time() > deadline:
            raise TimeoutError(f"run never reached {what}")
        time.sleep(0.2)


def _wait_for_step(out_dir, step, process):
    metrics = Path(out_dir) / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and max(logged_losses(out_dir), default=0) >= step, process, f"step {step}")


def test_sigterm_saves_and_exits_zero(data_dir, tmp_path):
    process = _start(data_dir, tmp_path / "run", "run.steps=100000", "run.checkpoint_every=100000")
    _wait_for_step(tmp_path / "run", 3, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved step" in stdout
    from biomamba_jax.training.checkpointing import Checkpointer

    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() >= 3


def test_kill_during_saves_leaves_a_loadable_latest_checkpoint(data_dir, tmp_path):
    """Checkpoint every step and SIGKILL at staggered moments: whatever was cut off, the
    latest complete checkpoint must restore and resuming must work."""
    from biomamba_jax.training.checkpointing import Checkpointer

    out_dir = tmp_path / "run"
    for attempt, delay in enumerate((0.0, 0.15, 0.35)):
        process = _start(data_dir, out_dir, "run.steps=100000", "run.checkpoint_every=1",
                         *(["--resume"] if attempt else []))
        _wait_for_step(out_dir, 2 + 3 * attempt, process)
        # Saves are asynchronous: on a loaded machine step 2 can be logged before step 1's
        # save completes, and "no checkpoint yet" is not what this test is about. Orbax
        # renames a finished save to its bare step number; a Checkpointer here would clean
        # up the running save's temporary directory, so only the names are read.
        _wait_for(lambda: any(p.name.isdigit() for p in (out_dir / "checkpoints").glob("*")), process,
                  "a complete checkpoint")
        time.sleep(delay)
        process.kill()
        process.wait()
        latest = Checkpointer(out_dir / "checkpoints").latest_step()
        assert latest is not None and latest >= 1
    resumed = pretrain(run_config(data_dir, out_dir, "run.steps=100000", f"run.stop_at={latest + 1}"),
                       resume=True, log=lambda *_: None)
    assert resumed["start_step"] == latest and resumed["final_step"] == latest + 1


def kill_and_resume_until_done(data_dir, out_dir, kills: int, seed: int, *settings) -> list[str]:
    """Start the run with --resume-or-start and `kill -9` it at random moments (during
    start-up and compilation, or just after some step is logged, sometimes mid-save) until
    `kills` kills are done, then let the last start finish. Returns where each kill landed."""
    def furthest_step() -> int:
        return max(logged_losses(out_dir), default=0) if (Path(out_dir) / "metrics.jsonl").exists() else 0

    rng, landed = random.Random(seed), []
    while True:
        seen = furthest_step()
        process = _start(data_dir, out_dir, "--resume-or-start", *settings)
        if len(landed) == kills:
            _, stderr = process.communicate(timeout=600)
            assert process.returncode == 0, stderr[-3000:]
            return landed
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0.0, 6.0))
            moment = "start-up"
        else:  # a step past the last start's furthest, so every start makes progress
            while process.poll() is None and furthest_step() <= seen:
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 0.5))
            moment = f"after step {furthest_step()}"
        if process.poll() is not None:  # finished before the kill: the trial still counts as a resume
            assert process.returncode == 0, process.communicate()[1][-3000:]
            return landed
        process.kill()
        process.wait()
        landed.append(moment)


@pytest.mark.slow  # about two minutes: several start-ups of scripts/pretrain.py
def test_random_kill_9s_then_resumes_reproduce_the_uninterrupted_run(data_dir, tmp_path):
    settings = ("run.steps=16", "run.checkpoint_every=2")
    pretrain(run_config(data_dir, tmp_path / "straight", *settings), log=lambda *_: None)
    landed = kill_and_resume_until_done(data_dir, tmp_path / "killed", 4, 0, *settings)
    assert len(landed) >= 2, landed
    killed = logged_losses(tmp_path / "killed")
    assert sorted(killed) == list(range(1, 17))  # every step logged once, none twice
    assert killed == logged_losses(tmp_path / "straight")  # bitwise, step by step
    from biomamba_jax.checkpoints.runs import restore_params

    ours, theirs = restore_params(tmp_path / "killed", 16)[0], restore_params(tmp_path / "straight", 16)[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)  # bitwise: the resumed run is the same run


def test_early_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(RunConfigError, match="Key 'lr' not in"):
        load_run_config("smoke", overrides=["optim.lr=1e-3"])
    with pytest.raises(RunError, match="does not exist: run scripts/prepare_pubmed.py"):
        pretrain(load_run_config("smoke", overrides=[f"data.dir={tmp_path / 'missing'}", "data.synthetic_files=0",
                                                     f"run.out_dir={tmp_path / 'o'}"]), log=lambda *_: None)
    capsys.readouterr()
    assert load_script("pretrain").main(["--preset", "smoke", "batch.micro_batch_per_device=3", f"run.out_dir={tmp_path / 'o'}",
                               f"data.dir={tmp_path / 'd'}"]) == 2
    assert "micro_batch_per_device to one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()  # rejected before anything was written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # three fresh processes, each compiling for 8 or 4 CPU devices
def test_two_processes_match_one_process(data_dir, tmp_path):
    """2 processes x 4 CPU devices through jax.distributed on localhost == 1 x 8 devices."""
    common = [f"data.dir={data_dir}", "data.synthetic_files=0", *FAST, "run.steps=3",
              "run.checkpoint_every=1000", "batch.micro_batch_per_device=1", "--parallel", "sharding"]
    single = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", *common,
                             f"run.out_dir={tmp_path / 'single'}"], env=env(8), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    workers = [subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "smoke", *common,
                                 f"run.out_dir={tmp_path / 'multi'}", "--coordinator-address",
                                 f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(rank)],
                                env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for rank in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert "2 process(es)" in outputs[0][0]
    a, b = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "multi")
    np.testing.assert_allclose([b[s] for s in (1, 2, 3)], [a[s] for s in (1, 2, 3)], rtol=1e-5)


def test_consecutive_nonfinite_steps_stop_the_run_with_good_checkpoints(data_dir, tmp_path):
    """An absurd learning rate makes every loss after the first update non-finite: those
    updates are skipped, K in a row stop the run, and what is on disk stays finite."""
    import jax

    from biomamba_jax.training.checkpointing import Checkpointer
    from biomamba_jax.training.loop import Trainer
    from biomamba_jax.training.pretrain import PubmedTask

    config = run_config(data_dir, tmp_path / "run", "run.steps=50", "run.checkpoint_every=1",
                        "optim.peak_lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=1e30",
                        "run.max_consecutive_nonfinite=3")
    with pytest.raises(RunError, match="3 consecutive steps had a non-finite loss"):
        pretrain(config, log=lambda *_: None)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints")
    latest = checkpointer.latest_step()
    assert latest is not None and latest < 50
    trainer = Trainer.build(config, PubmedTask(config), log=lambda *_: None)
    restored = checkpointer.restore(trainer.layout.abstract_checkpoint(trainer.initial_state()))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(restored.state.params))
    assert restored.meta["skipped_steps"] >= 1


def test_metrics_log_drops_a_torn_last_line(tmp_path):
    """After a kill mid-write, the resumed run's records stay one JSON object per line."""
    from biomamba_jax.training.loop import MetricsLog

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    log = MetricsLog(tmp_path, enabled=True, start_step=1)  # resuming from step 1
    log.write(2, {"loss": 1.5})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_profiled_steps_report_device_time_and_busy_fraction(data_dir, tmp_path):
    """run.profile_steps traces steps 3.. with the JAX profiler and writes profile.json."""
    logged = []
    pretrain(run_config(data_dir, tmp_path / "p", "run.steps=6", "run.profile_steps=2"), log=logged.append)
    profile = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert profile["first_step"] == 3 and profile["steps"] == 2 and profile["ops"]
    assert profile["device_ms_per_call"] > 0 and profile["wall_ms_per_step"] > 0
    assert profile["source"] == "host XLA ops" and profile["device_busy"] is None  # CPU: op times overlap
    assert any(line.startswith("profile of steps 3-4:") for line in logged)
    with pytest.raises(RunConfigError, match="run.profile_steps=-1"):
        run_config(data_dir, tmp_path / "q", "run.profile_steps=-1")
