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
