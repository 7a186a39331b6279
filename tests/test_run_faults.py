"""Runs that stop, resume or meet bad settings keep what they wrote and say what to do."""
from pathlib import Path

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
