"""Run in a subprocess with 8 fake CPU devices: one optimizer step computed four ways.

Prints JSON: for each way, the loss, the grad norm, the first AdamW moment (0.1 x the
clipped gradient after one step, so it compares gradients) and the updated params.
"""
import json
import sys

import jax
import numpy as np
from flax import nnx

jax.config.update("jax_default_matmul_precision", "highest")

from biomamba_jax.model.config import MambaConfig
from biomamba_jax.model.mamba import MambaLM
from biomamba_jax.training.parallel import BatchPlan, PmapLayout, ShardingLayout
from biomamba_jax.checkpoints.load import model_params
from biomamba_jax.training.config import OptimSection
from biomamba_jax.training.step import TrainState, make_optimizer, make_train_step

SEQ_LEN, GLOBAL_ROWS = 16, 16
# The sequential scan without remat compiles fastest; the layouts, not the model, are under test.
config = MambaConfig.preset("tiny", n_layer=1, vocab_size=64, scan_impl="reference", remat="none", dtype="float32")
model = MambaLM(config, rngs=nnx.Rngs(0))
graphdef = nnx.graphdef(model)
params = jax.tree.map(np.asarray, model_params(model))
optimizer = make_optimizer(OptimSection(warmup_steps=0, peak_lr=1e-3), total_steps=10)
host_state = TrainState(params, jax.tree.map(np.asarray, optimizer.init(params)), np.int32(0))
rng = np.random.RandomState(0)
tokens = rng.randint(0, 64, (GLOBAL_ROWS, SEQ_LEN + 1)).astype(np.int32)
loss_mask = (rng.rand(GLOBAL_ROWS, SEQ_LEN) > 0.2).astype(np.float32)
batch = {"tokens": tokens, "loss_mask": loss_mask}


def summary(state, metrics):
    state = jax.tree.map(np.asarray, state)
    return {
        "loss": float(np.asarray(metrics["loss"]).reshape(-1)[0]),
        "grad_norm": float(np.asarray(metrics["grad_norm"]).reshape(-1)[0]),
        "mu": [x.tolist() for x in jax.tree.leaves(state.opt_state[1][0].mu)],
        "params": [x.tolist() for x in jax.tree.leaves(state.params)],
    }


def one_device(micro_batch):
    plan = BatchPlan.from_tokens(GLOBAL_ROWS * SEQ_LEN, SEQ_LEN, micro_batch, 1, 1)
    step = jax.jit(make_train_step(graphdef, optimizer))
    shaped = {k: plan.device_major(v)[0] for k, v in batch.items()}
    return summary(*step(host_state, shaped))


def pmapped():
    plan = BatchPlan.from_tokens(GLOBAL_ROWS * SEQ_LEN, SEQ_LEN, 1, 8, 1)
    layout = PmapLayout(plan)
    step = layout.compile_train_step(graphdef, optimizer)
    state, metrics = step(layout.place_state(host_state), layout.place_batch(batch))
    return summary(layout.gather_state(state), metrics)


def sharded(fsdp):
    plan = BatchPlan.from_tokens(GLOBAL_ROWS * SEQ_LEN, SEQ_LEN, 1, 8, 1)
    layout = ShardingLayout(plan, fsdp=fsdp)
    placed = layout.place_state(host_state)
    step = layout.compile_train_step(graphdef, optimizer)
    return summary(*step(placed, layout.place_batch(batch)))


assert jax.device_count() == 8, jax.devices()
results = {
    "single_big_batch": one_device(micro_batch=GLOBAL_ROWS),
    "single_accumulated": one_device(micro_batch=2),
    "pmap": pmapped(),
    "sharding": sharded(fsdp=False),
    "sharding_fsdp": sharded(fsdp=True),
}
json.dump(results, sys.stdout)
