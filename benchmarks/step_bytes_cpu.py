"""XLA's cost analysis of two training steps on CPU: `scripts/benchmark.py`'s bare AdamW
step and the trainer's (clipping, gradient norm, token-count division, non-finite guard).
A lead for the pretrain.py gap (benchmarks/NOTES.md, section 9), not a GPU measurement.
Usage: JAX_PLATFORMS=cpu python benchmarks/step_bytes_cpu.py"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from biomamba_jax.config import MambaConfig
from biomamba_jax.model import MambaLM
from biomamba_jax.run_config import load_run_config
from biomamba_jax.training import TrainState, make_optimizer, make_train_step


def bytes_accessed(compiled) -> float:
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["bytes accessed"]


def main():
    cfg = MambaConfig.preset("mamba-130m", n_layer=2, scan_impl="chunked", dtype="bfloat16", remat="scan",
                             scan_layers=False)
    model = MambaLM(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 257), 0, cfg.vocab_size - 8)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    adamw = optax.adamw(6e-4, weight_decay=0.1)

    def bare_step(params, opt_state, ids):  # as scripts/benchmark.py's train workload
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(ids[:, :-1]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = adamw.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    bare = jax.jit(bare_step, donate_argnums=(0, 1)).lower(params, adamw.init(params), ids).compile()

    optimizer = make_optimizer(load_run_config("biomamba-130m").optim, total_steps=1000)
    state = nnx.state(model)
    trainer_state = TrainState(state, optimizer.init(state), jnp.int32(0), jnp.zeros((2,), jnp.uint32))
    step = make_train_step(nnx.graphdef(model), optimizer)
    trainer = jax.jit(step, donate_argnums=(0,)).lower(trainer_state, {"tokens": ids[None]}).compile()

    n = sum(x.size for x in jax.tree.leaves(params))
    a, b = bytes_accessed(bare), bytes_accessed(trainer)
    print(f"parameters {n:,}; bytes accessed: benchmark.py step {a:.4g}, trainer step {b:.4g}; "
          f"difference {(b - a) / n:.1f} bytes per parameter")


if __name__ == "__main__":
    main()
