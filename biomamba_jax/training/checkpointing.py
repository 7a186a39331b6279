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

import contextlib
import errno
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

__all__ = ["Checkpointer", "RestoredCheckpoint", "CheckpointWriteError"]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, say): what failed, where, what to do."""


class _OrbaxSaveErrorsFilter(logging.Filter):
    """orbax logs a failed background save with a full traceback from each thread it passes
    through (hundreds of lines for one full disk) and then re-raises it to the caller.
    `Checkpointer` turns that re-raised error into one line, so the log copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        # Only a new best checkpoint carries a val_loss (see `Checkpointer.save`); orbax warns at
        # every other save that it got none, which is by design here.
        return record.levelno < logging.ERROR and "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_OrbaxSaveErrorsFilter())


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
        """Start saving `step` (async); the previous save is finished first. Give `val_loss`
        only for a new best: retention keeps the lowest of the losses given, and among equal
        losses orbax's pick may not be the step the caller calls its best."""
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        with self._write_errors():
            self._save(step, state, data_state, meta, metrics)

    def _save(self, step, state, data_state, meta, metrics) -> None:
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

    def raise_if_failed(self) -> None:
        """Raise CheckpointWriteError if a save running in the background has failed.

        Cheap (it looks at finished saves only), so the loop calls it every step: a full
        disk then stops the run at the next step, not at the next save."""
        with self._write_errors():
            self.manager.check_for_errors()
            # A failed write ends orbax's finalize thread, which keeps the error for
            # `wait_until_finished` (check_for_errors alone never sees it); once that thread
            # is done, waiting costs nothing and re-raises it.
            if not self.manager.is_saving_in_progress():
                self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _write_errors(self):
        try:
            yield
        except Exception as err:  # orbax re-raises the writer thread's error, whatever its type
            with contextlib.suppress(Exception):  # let the save's other writes end before cleaning up
                self.manager.wait_until_finished()
            for partial in self.directory.glob("*orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            # The manager lists a step from the moment its save starts, so the failed one
            # can still be on its list: name the latest step that is on disk.
            with contextlib.suppress(Exception):
                self.manager.reload()
            latest = self.manager.latest_step()
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if "No space left on device" in reason or getattr(err, "errno", None) == errno.ENOSPC:
                reason = "no space left on device"
            raise CheckpointWriteError(
                f"could not write a checkpoint in {self.directory}: {reason}. Free space there or set "
                f"run.out_dir to a disk with room, then --resume (last complete checkpoint: "
                f"{'none' if latest is None else f'step {latest}'})") from err

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
        with self._write_errors():
            self.manager.wait_until_finished()

    def close(self, raise_errors: bool = True) -> None:
        """Finish pending saves and release the manager; with `raise_errors=False` (a run
        already failing) a failed save does not hide the first error."""
        try:
            self.wait()
        except CheckpointWriteError:
            if raise_errors:
                raise
        finally:
            self.manager.close()


def _as_restore_target(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return np.asarray(leaf)
