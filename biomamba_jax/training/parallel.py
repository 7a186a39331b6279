"""Where the train state and batches live: `pmap` data parallelism or `jit` over a Mesh.

Both layouts wrap the same `training.make_train_step` function and give device `d` the
same rows of each batch, so they compute the same update. They differ in how arrays are
placed:

- `PmapLayout`: state replicated on every local device (leading device axis), host
  batches (local_devices, micro_steps, rows, L + 1), gradients summed with `lax.psum`.
- `ShardingLayout`: one `Mesh` over every device of every host with a `data` axis; the
  batch is a global array sharded over it; parameters and optimizer state replicated, or
  sharded over the same axis with `fsdp=True` (each leaf along its largest divisible dim).

`BatchPlan` turns the run's global batch into micro-batches per device, and rejects an
impossible split before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from biomamba_jax.training.step import make_eval_step, make_gradient_fn, make_train_step

__all__ = ["BatchPlan", "PmapLayout", "ShardingLayout", "make_layout", "initialize_distributed"]

DATA_AXIS = "data"


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run as configured, with the fix named."""


class BatchSplitError(ParallelConfigError):
    """The global batch cannot be divided over the devices as configured."""


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    seq_len: int
    global_rows: int  # sequences per optimizer step, over all devices
    micro_batch: int  # rows per device per forward/backward
    num_devices: int
    num_processes: int

    @classmethod
    def from_tokens(cls, global_batch_tokens: int, seq_len: int, micro_batch: int,
                    num_devices: int, num_processes: int) -> "BatchPlan":
        if global_batch_tokens % seq_len:
            raise BatchSplitError(
                f"global batch of {global_batch_tokens} tokens is not a whole number of "
                f"{seq_len}-token rows; use a multiple of {seq_len}"
            )
        plan = cls(seq_len, global_batch_tokens // seq_len, micro_batch, num_devices, num_processes)
        per_round = micro_batch * num_devices
        if plan.global_rows % per_round:
            valid = [m for m in range(1, plan.global_rows + 1)
                     if plan.global_rows % (m * num_devices) == 0]
            if valid:
                fix = f"Set batch.micro_batch_per_device to one of {valid[:8]} or change batch.global_batch_tokens"
            else:  # no micro-batch works: the rows do not divide over the devices at all
                unit = seq_len * per_round
                below, above = max(unit, global_batch_tokens // unit * unit), -(-global_batch_tokens // unit) * unit
                fix = (f"Set batch.global_batch_tokens to a multiple of {unit:,} ({seq_len} tokens x "
                       f"{num_devices} devices x micro-batch {micro_batch}), e.g. {below:,} or {above:,}")
            raise BatchSplitError(
                f"cannot split {plan.global_rows} rows per step ({global_batch_tokens} tokens / "
                f"{seq_len}) over {num_devices} devices x micro-batch {micro_batch}: "
                f"{plan.global_rows} is not a multiple of {per_round}. {fix}"
            )
        return plan

    @property
    def micro_steps(self) -> int:
        """Gradient-accumulation steps per optimizer step."""
        return self.global_rows // (self.micro_batch * self.num_devices)

    @property
    def rows_per_process(self) -> int:
        return self.global_rows // self.num_processes

    @property
    def local_devices(self) -> int:
        return self.num_devices // self.num_processes

    @property
    def tokens_per_step(self) -> int:
        return self.global_rows * self.seq_len

    def device_major(self, rows: np.ndarray) -> np.ndarray:
        """(rows_per_process, ...) -> (local_devices, micro_steps, micro_batch, ...).

        Device d gets rows [d * micro_steps * micro_batch, (d + 1) * ...) of the host batch.
        """
        return rows.reshape(self.local_devices, self.micro_steps, self.micro_batch, *rows.shape[1:])


def _host_arrays(batch: dict) -> dict:
    return {key: np.asarray(value) for key, value in batch.items()}


class PmapLayout:
    name = "pmap"

    def __init__(self, plan: BatchPlan):
        self.plan = plan
        self.devices = jax.local_devices()
        # Same axis name as the train step, so its outputs and our inputs share one sharding
        # and the step compiles once.
        self._replicate = jax.pmap(lambda x: x, axis_name=DATA_AXIS)

    def place_state(self, state):
        count = len(self.devices)
        return self._replicate(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count, *np.shape(x))), state))

    def place_batch(self, batch: dict) -> dict:
        return {k: self.plan.device_major(v) for k, v in _host_arrays(batch).items()}

    def compile_train_step(self, graphdef, optimizer) -> Callable:
        step = make_train_step(graphdef, optimizer, DATA_AXIS)
        return jax.pmap(step, axis_name=DATA_AXIS, donate_argnums=(0,))

    def compile_eval_step(self, graphdef) -> Callable:
        step = jax.pmap(make_eval_step(graphdef, DATA_AXIS), axis_name=DATA_AXIS)
        rows = self.plan.local_devices

        def evaluate(params, batch):
            host = _host_arrays(batch)
            shaped = {k: v.reshape(rows, v.shape[0] // rows, *v.shape[1:]) for k, v in host.items()}
            loss_sum, count = step(params, shaped)
            return float(loss_sum[0]), float(count[0])

        return evaluate

    def metrics(self, metrics) -> dict:
        return {k: float(np.asarray(v)[0]) for k, v in metrics.items()}

    def gather_state(self, state):
        """The state as one copy (device 0's replica), for export."""
        return jax.tree.map(lambda x: x[0], state)

    def checkpoint_view(self, state):
        return jax.tree.map(lambda x: np.asarray(x[0]), state)

    def from_checkpoint(self, restored):
        return self.place_state(restored)

    def abstract_checkpoint(self, host_state):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), host_state)


class ShardingLayout:
    name = "sharding"

    def __init__(self, plan: BatchPlan, fsdp: bool = False):
        self.plan = plan
        self.fsdp = fsdp
        self.mesh = Mesh(np.array(jax.devices()), (DATA_AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        # (micro_steps, rows, L + 1): rows split over the data axis.
        self.batch_sharding = NamedSharding(self.mesh, P(None, DATA_AXIS))
        self._state_shardings = None

    def _leaf_sharding(self, leaf):
        shape = np.shape(leaf)
        if not self.fsdp or not shape:
            return self.replicated
        count = self.mesh.shape[DATA_AXIS]
        dims = sorted(range(len(shape)), key=lambda d: -shape[d])
        for dim in dims:
            if shape[dim] % count == 0:
                spec = [None] * len(shape)
                spec[dim] = DATA_AXIS
                return NamedSharding(self.mesh, P(*spec))
        return self.replicated

    def state_shardings(self, state):
        return jax.tree.map(self._leaf_sharding, state)

    def place_state(self, state):
        self._state_shardings = self.state_shardings(state)
        return jax.tree.map(
            lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
            state, self._state_shardings,
        )

    def place_batch(self, batch: dict) -> dict:
        placed = {}
        for key, value in _host_arrays(batch).items():
            local = self.plan.device_major(value)  # (local_dev, micro, mb, ...)
            local = np.swapaxes(local, 0, 1).reshape(
                self.plan.micro_steps, self.plan.local_devices * self.plan.micro_batch, *value.shape[1:]
            )
            placed[key] = jax.make_array_from_process_local_data(self.batch_sharding, local)
        return placed

    def per_device(self, fn: Callable, batch_spec=P(None, DATA_AXIS)) -> Callable:
        """`fn(params, batch)` run on each device's rows, with replicated params and outputs.

        `fn` must reduce its outputs over DATA_AXIS itself (psum). With FSDP, XLA gathers
        the parameters at this boundary.
        """
        return jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), batch_spec), out_specs=P(),
                             check_vma=False)

    def compile_train_step(self, graphdef, optimizer) -> Callable:
        gradient_fn = self.per_device(make_gradient_fn(graphdef, DATA_AXIS))
        step = make_train_step(graphdef, optimizer, gradient_fn=gradient_fn)
        return jax.jit(step, out_shardings=(self._state_shardings, self.replicated), donate_argnums=(0,))

    def compile_eval_step(self, graphdef) -> Callable:
        step = jax.jit(self.per_device(make_eval_step(graphdef, DATA_AXIS), P(DATA_AXIS)),
                       out_shardings=self.replicated)
        rows_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

        def evaluate(params, batch):
            placed = {k: jax.make_array_from_process_local_data(rows_sharding, v)
                      for k, v in _host_arrays(batch).items()}
            loss_sum, count = step(params, placed)
            return float(loss_sum), float(count)

        return evaluate

    def metrics(self, metrics) -> dict:
        return {k: float(v) for k, v in metrics.items()}

    def gather_state(self, state):
        return jax.tree.map(lambda x: jax.device_put(x, self.replicated), state)

    def checkpoint_view(self, state):
        return state  # global arrays: orbax writes each host's shards itself

    def from_checkpoint(self, restored):
        return restored

    def abstract_checkpoint(self, host_state):
        shardings = self.state_shardings(host_state)
        self._state_shardings = shardings
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
            host_state, shardings,
        )


def make_layout(mode: str, plan: BatchPlan, fsdp: bool = False):
    if mode == "auto":
        mode = "pmap" if jax.process_count() == 1 else "sharding"
    if mode == "pmap":
        if jax.process_count() > 1:
            raise ParallelConfigError("parallel.mode=pmap runs on one host; across hosts use "
                             "--parallel sharding (jit over a Mesh of every host's devices)")
        if fsdp:
            raise ParallelConfigError("parallel.fsdp needs parallel.mode=sharding (pmap replicates parameters)")
        return PmapLayout(plan)
    if mode == "sharding":
        return ShardingLayout(plan, fsdp)
    raise ParallelConfigError(f"unknown parallel mode {mode!r}; choose auto, pmap or sharding")


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Start JAX's multi-host runtime when this is one process of several.

    Explicit flags win. Otherwise `jax.distributed.initialize()` detects SLURM, Open MPI
    and TPU pod environments itself; on a plain single machine nothing is started.
    Returns whether the runtime was initialised.
    """
    if coordinator_address or num_processes:
        if not (coordinator_address and num_processes is not None and process_id is not None):
            raise ParallelConfigError("multi-host start-up needs all of --coordinator-address, "
                             "--num-processes and --process-id (or none, to auto-detect)")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            # CPU devices of different processes talk through gloo. (Asking JAX for its
            # backend here would start it, which must not happen before initialize.)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    cluster = ("SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1) \
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1 \
        or "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    if cluster:
        jax.distributed.initialize()
        return True
    return False
