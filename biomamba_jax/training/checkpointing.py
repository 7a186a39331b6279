"""Training checkpoints with orbax: params, optimizer state, step, RNG and data position.

Each checkpoint is one orbax step directory with three items:
- `state`: the `TrainState` pytree (params, optimizer state, step, RNG);
- `data`: the data iterator's state as JSON, so a resumed run reads exactly the next batch;
- `meta`: JSON facts about the run (consumed tokens, skipped steps, config name).

orbax writes each step under a temporary name and renames it when complete (also with
async saves, and across hosts), so a run killed at any moment, even mid-save, leaves the
previous step as the latest loadable one. Retention keeps the last `keep` steps plus the
best by validation loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

__all__ = ["Checkpointer", "RestoredCheckpoint"]


class RestoredCheckpoint:
    def __init__(self, step: int, state: Any, data_state: dict, meta: dict):
        self.step, self.state, self.data_state, self.meta = step, state, data_state, meta


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        directory = Path(directory).resolve()
        preservation = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics["val_loss"], reverse=True, n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            # With best_fn orbax writes each step's metrics beside it, so a resumed run still
            # knows which earlier checkpoint is the best; without it the best of a previous
            # process looks metric-less and the policy above deletes it.
            best_fn=lambda metrics: metrics["val_loss"],
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # a save killed midway leaves a tmp dir: drop it
        )
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "data", "meta")
        )

    def save(self, step: int, state, data_state: dict, meta: dict,
             val_loss: Optional[float] = None) -> None:
        """Start saving `step` (async); the previous save is finished first."""
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: Optional[int] = None) -> Optional[RestoredCheckpoint]:
        """Restore `step` (default: the latest complete one) into the structure, dtypes
        and shardings of `abstract_state`; None when there is no checkpoint yet."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        target = jax.tree.map(_as_restore_target, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return RestoredCheckpoint(step, restored["state"], restored["data"], restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _as_restore_target(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return np.asarray(leaf)
