"""scripts/benchmark.py: the library's train step under a run preset, every workload's row, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from biomamba_jax import benchmark
from biomamba_jax.training.config import load_run_config

REPO = Path(__file__).resolve().parents[1]


def test_train_row_uses_the_presets_settings_and_the_library_step():
    config = load_run_config("smoke", overrides=["model.remat=full"])
    model_config = benchmark.model_for(config)
    row = benchmark.time_train(config, model_config, batch=2, length=16, warmup=1, repeats=1)
    assert (row["remat"], row["dtype"], row["scan_impl"]) == ("full", "float32", "reference")
    assert row["tokens_per_s"] > 0 and row["loss"] > 0
    # Compile time in its two parts (lowering builds Mosaic GPU kernels; then XLA).
    assert row["lower_s"] >= 0 and row["xla_compile_s"] > 0
    assert abs(row["lower_s"] + row["xla_compile_s"] - row["compile_s"]) <= 0.151  # each rounded to 0.1
    assert "lowering" in benchmark.summary_line(row)


def test_size_overrides_the_presets_model():
    config = load_run_config("smoke")
    assert benchmark.model_for(config, "mamba-370m").d_model == 1024
    assert benchmark.model_for(config).d_model == 64


@pytest.mark.slow  # three interpreter start-ups with JAX
def test_cli_writes_json_rows_and_rejects_bad_input(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--preset", "smoke", "--workloads",
               "prefill,scan", "--prefill-length", "32", "--scan-impls", "reference", "--scan-shape", "1,16,8,4",
               "--repeats", "1", "--warmup", "0", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["workload"] for r in results] == ["prefill", "scan"]
    bad = subprocess.run(command[:4] + ["--workloads", "train", "model.dtpye=float32"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "dtpye" in bad.stderr
    bad = subprocess.run(command[:2] + ["--workloads", "trian"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "trian" in bad.stderr


def test_torch_reference_row_times_the_same_model_and_work(tmp_path):
    """`--torch transformers` on the CPU: the reference's step on the smoke model, with the
    run's optimizer; mamba_ssm takes the same path on a GPU."""
    pytest.importorskip("torch")
    from helpers import load_script

    out = tmp_path / "torch.json"
    script = load_script("benchmark")
    assert script.main(["--preset", "smoke", "--workloads", "train", "--torch", "transformers", "--batch", "2",
                        "--length", "16", "--warmup", "1", "--repeats", "2", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    row = saved["results"][0]
    config = load_run_config("smoke")
    model_config = benchmark.model_for(config)
    assert (row["framework"], row["d_model"], row["layers"]) == ("transformers", model_config.d_model,
                                                                 model_config.n_layer)
    assert row["tokens_per_s"] > 0 and len(row["times_s"]) == 2 and row["loss"] > 0
    assert "torch" in saved["meta"] and "jax" not in saved["meta"]
    assert "(transformers)" in benchmark.summary_line(row)
    with pytest.raises(SystemExit):
        script.parse_args(["--workloads", "train,prefill", "--torch", "mamba_ssm"])


def test_loop_row_times_pretrains_own_loop_beside_the_bare_step(tmp_path):
    """`--workloads train,loop`: the loop row comes from `scripts/pretrain.py`'s run loop (its
    metrics windows), on the same model and shapes, with its ratio to the step row."""
    from helpers import load_script

    out = tmp_path / "loop.json"
    script = load_script("benchmark")
    assert script.main(["--preset", "smoke", "--workloads", "train,loop", "--batch", "2", "--length", "32",
                        "--loop-steps", "20", "--warmup", "1", "--repeats", "2", "--out", str(out)]) == 0
    step_row, loop_row = json.loads(out.read_text())["results"]
    assert loop_row["workload"] == "loop" and (loop_row["batch"], loop_row["length"]) == (2, 32)
    assert (loop_row["d_model"], loop_row["scan_impl"]) == (step_row["d_model"], step_row["scan_impl"])
    # Windows of 5 steps ending at 15 and 20: the run's own metrics, after compilation.
    assert len(loop_row["windows_tokens_per_s"]) == 2 and loop_row["tokens_per_s"] > 0
    assert loop_row["loop_over_step"] == round(loop_row["tokens_per_s"] / step_row["tokens_per_s"], 3)
    assert "x the bare step" in benchmark.summary_line(loop_row)
    with pytest.raises(SystemExit):
        script.parse_args(["--workloads", "loop", "--loop-steps", "10"])
