"""The optimizer, the loss and one train-step function that serves every parallel layout.

`train_step` takes a batch shaped (micro_steps, rows, L + 1): it runs the micro-batches
under `lax.scan`, summing per-token losses and gradients, and divides once by the number
of target tokens in the whole global batch. That makes gradient accumulation and data
parallelism exact rewrites of one big batch, not approximations of it.

The same function runs
- under `jax.pmap` (`axis_name` set): sums are `psum`-ed across devices, so every device
  applies the identical update, i.e. gradients averaged with a collective;
- under `jax.jit` over a `Mesh`: the batch is one global array sharded over the data
  axis. The gradient work runs per device under `shard_map` with the same `psum` (the
  Pallas scan is an opaque custom call that XLA's partitioner would otherwise run
  replicated on the whole batch), and the optimizer update runs under plain `jit`, where
  FSDP-sharded parameters and optimizer state stay sharded.

A step whose loss or gradients are not finite is skipped: parameters and optimizer state
stay as they were and the step reports `skipped = 1`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from biomamba_jax.model.config import MambaConfig
from biomamba_jax.training.cross_entropy import lm_head_cross_entropy, resolve_loss_impl

__all__ = [
    "TrainState",
    "make_optimizer",
    "global_norm",
    "clip_by_global_norm",
    "lr_schedule",
    "weight_decay_mask",
    "DECAYED_MIXER_WEIGHTS",
    "make_train_step",
    "make_gradient_fn",
    "make_eval_step",
    "model_flops_per_token",
    "peak_flops_per_device",
    "compiled_memory",
]


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar


# --------------------------------------------------------------------- optimizer
def lr_schedule(peak_lr: float, warmup_steps: int, total_steps: int, final_fraction: float):
    """Linear warmup from 0 to `peak_lr`, then cosine decay to `final_fraction * peak_lr`."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr * final_fraction,
    )


# Weight decay applies to the mixers' projection and conv kernels only: A_log, D, every
# bias, the norms and the (tied or untied) embeddings are excluded, as in BioMamba/mamba_ssm.
DECAYED_MIXER_WEIGHTS = {"in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"}


def weight_decay_mask(params) -> Any:
    def decays(path, _):
        names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
        return names[-1] == "kernel" and len(names) >= 2 and names[-2] in DECAYED_MIXER_WEIGHTS

    return jax.tree_util.tree_map_with_path(decays, params)


def global_norm(tree) -> jax.Array:
    """The L2 norm of every leaf together, as `optax.tree.norm`, in two stages: the sums
    of squares along each leaf's last axis first, then their total.

    Why: with the one-stage form (each leaf straight to a scalar, as optax does), the
    profile of a Mamba-130m step on an H100 showed one 4.4 ms reduction per step; with two
    stages it is gone and `pretrain.py` runs 3.3% faster (benchmarks/NOTES.md, section 10).
    The barrier is there so XLA cannot merge the stages back (not measured without it).
    """
    row_sums = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=-1) if x.ndim > 1
                else jnp.square(x.astype(jnp.float32)).reshape(-1) for x in jax.tree.leaves(tree)]
    row_sums = jax.lax.optimization_barrier(row_sums)
    return jnp.sqrt(sum(jnp.sum(r) for r in row_sums))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm`, with the same (empty) state, that takes the norm from
    the caller when given (`update(..., grad_norm=norm)`): the train step computes it
    anyway for its metrics, so the gradients are read once for it, not twice."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = global_norm(updates) if grad_norm is None else grad_norm
        keep = norm < max_norm
        return jax.tree.map(lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """AdamW with global-norm clipping; `optim` is a run config's OptimSection. Its state
    has the layout of `optax.chain(optax.clip_by_global_norm, optax.adamw)`, so older
    checkpoints resume."""
    schedule = lr_schedule(optim.peak_lr, optim.warmup_steps, total_steps, optim.final_lr_fraction)
    return optax.chain(
        clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.beta1, b2=optim.beta2, eps=optim.eps,
                    weight_decay=optim.weight_decay, mask=weight_decay_mask),
    )


# -------------------------------------------------------------------------- loss
def token_loss_sums(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross-entropy over target positions, and how many there are, with
    the LM head applied as `MambaConfig.loss_impl` says.

    batch: `tokens` (B, L + 1) int32; optional `loss_mask` (B, L) over targets,
    `attention_mask` (B, L) over inputs (0 = padding, which leaves the state untouched) and
    `segment_ids` (B, L) over inputs (packed documents, which the model keeps apart when
    its config's `reset_at_documents` says so).
    """
    model = nnx.merge(graphdef, params)
    c = model.config
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = batch.get("loss_mask")
    weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    loss_impl = resolve_loss_impl(c.loss_impl)
    if loss_impl == "full":
        logits = model(inputs, batch.get("attention_mask"), segment_ids=batch.get("segment_ids"))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        return jnp.sum(losses * weights), jnp.sum(weights)
    hidden = model(inputs, batch.get("attention_mask"), segment_ids=batch.get("segment_ids"), lm_head=False)
    loss_sum = lm_head_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), model.output_matrix(), targets.reshape(-1), weights.reshape(-1),
        impl=loss_impl, dtype=c.dtype, chunk_tokens=c.loss_chunk_tokens)
    return loss_sum, jnp.sum(weights)


def _accumulate(graphdef, params, batch):
    """Sum losses, token counts and gradients of the loss sum over the micro-batch axis."""

    def sums_and_grads(micro):
        (micro_loss, micro_count), micro_grads = jax.value_and_grad(
            lambda p: token_loss_sums(graphdef, p, micro), has_aux=True
        )(params)
        return micro_loss, micro_count, micro_grads

    if jax.tree.leaves(batch)[0].shape[0] == 1:
        # One micro-batch: no loop, so XLA schedules the step's buffers as one program
        # and no zero gradients are made to be added to.
        return sums_and_grads(jax.tree.map(lambda x: x[0], batch))

    def one_micro_batch(carry, micro):
        loss_sum, count, grads = carry
        micro_loss, micro_count, micro_grads = sums_and_grads(micro)
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        return (loss_sum + micro_loss, count + micro_count, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, count, grads), _ = jax.lax.scan(
        one_micro_batch, (jnp.float32(0), jnp.float32(0), zeros), batch
    )
    return loss_sum, count, grads


def make_gradient_fn(graphdef, axis_name: Optional[str] = None) -> Callable:
    """`(params, batch) -> (loss_sum, token_count, grads)`, summed over micro-batches and,
    with `axis_name`, over the devices of that axis."""

    def gradient_sums(params, batch):
        loss_sum, count, grads = _accumulate(graphdef, params, batch)
        if axis_name is not None:
            loss_sum, count, grads = jax.lax.psum((loss_sum, count, grads), axis_name)
        return loss_sum, count, grads

    return gradient_sums


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    axis_name: Optional[str] = None, gradient_fn: Optional[Callable] = None) -> Callable:
    """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted or pmapped).

    `gradient_fn` replaces the default `make_gradient_fn(graphdef, axis_name)`, e.g. with a
    `shard_map`-ped one, so the optimizer update stays outside it (and FSDP-sharded).
    """
    gradient_sums = gradient_fn or make_gradient_fn(graphdef, axis_name)
    # The step hands its gradient norm to the clip (grad_norm=); an optimizer that takes no
    # extra arguments is wrapped to ignore it.
    optimizer = optax.with_extra_args_support(optimizer)

    def train_step(state: TrainState, batch):
        loss_sum, count, grads = gradient_sums(state.params, batch)
        count = jnp.maximum(count, 1.0)
        loss = loss_sum / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            step=state.step + 1,
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
                   "skipped": (~finite).astype(jnp.int32)}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, axis_name: Optional[str] = None) -> Callable:
    """Returns `eval_step(params, batch) -> (loss_sum, token_count)` over a (B, L + 1) batch."""

    def eval_step(params, batch):
        loss_sum, count = token_loss_sums(graphdef, params, batch)
        if axis_name is not None:
            loss_sum, count = jax.lax.psum((loss_sum, count), axis_name)
        return loss_sum, count

    return eval_step


# ----------------------------------------------------------------------- FLOPs
def model_flops_per_token(config: MambaConfig, training: bool = True) -> float:
    """Model FLOPs per token of the Mamba forward (x3 with the backward).

    Counts the matmuls (in_proj, x_proj, dt_proj, out_proj, LM head), the depthwise conv
    and the selective scan (discretisation, state update and C contraction, ~9 E N per
    token). Remat recomputation is not counted: this is model FLOPs, for MFU. Unlike
    attention, none of it depends on the sequence length.
    """
    c = config
    per_layer = 2 * (c.d_model * 2 * c.d_inner  # in_proj
                     + c.d_inner * (c.dt_rank + 2 * c.d_state)  # x_proj
                     + c.dt_rank * c.d_inner  # dt_proj
                     + c.d_inner * c.d_model)  # out_proj
    per_layer += 2 * c.d_inner * c.d_conv + 9 * c.d_inner * c.d_state
    forward = c.n_layer * per_layer + 2 * c.d_model * c.vocab_size
    return float(3 * forward if training else forward)


# Dense bf16 peak per device (vendor datasheets), for MFU.
_PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12, "A5000": 111e12,
    "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6": 918e12,
}


def peak_flops_per_device(device: jax.Device) -> Optional[float]:
    kind = getattr(device, "device_kind", "")
    for name, flops in _PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def compiled_memory(compiled) -> Optional[dict]:
    """Device memory a compiled step needs, in bytes, from XLA's own analysis: its
    arguments, outputs (less what aliases donated arguments) and temporaries. None where
    the backend does not report it."""
    try:
        analysis = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if analysis is None:
        return None
    if isinstance(analysis, (list, tuple)):  # one per device under pmap: they are the same
        analysis = analysis[0]
    sizes = {"arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
             "aliased": analysis.alias_size_in_bytes, "temporaries": analysis.temp_size_in_bytes}
    sizes["total"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    return sizes
