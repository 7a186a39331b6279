"""Next-token cross entropy over the LM head without the full (tokens, vocab) logits.

At Mamba-130m with 8 x 2048 tokens and a 50k vocabulary the logits are 16k x 50k: 3.3 GB
in fp32, the largest buffers of a training step, and the plain loss holds several of them
(the logits in the compute dtype, their fp32 copy, the softmax and the gradient).
`lm_head_cross_entropy` computes the same loss sum from the final hidden states and the
(V, D) output matrix, in one of two ways (`MambaConfig.loss_impl`):

- ``chunked``: plain JAX. A `lax.scan` over chunks of tokens computes each chunk's logits
  in fp32 and keeps only the per-token loss; under differentiation (a custom VJP) the same
  pass also writes that chunk's d(hidden) and adds its share of d(output matrix) to an fp32
  accumulator, while the chunk's logits exist (see `_chunked`). Peak memory is
  O(chunk x vocab) besides the (V, D) accumulator.
- ``tokamax``: Google's Pallas kernel library (`tokamax.linear_softmax_cross_entropy_loss`),
  an optional import: only its device kernels ("triton" on GPUs, "mosaic_tpu" on TPUs)
  are asked for, never its "xla" implementation, which materialises the logits.

Matmuls read their inputs in the compute dtype (bf16 in training), as the model's own LM
head does, and accumulate in fp32; logsumexp, softmax and every sum are fp32. The plain
loss rounds its logits to the compute dtype before the fp32 softmax; these do not, so in
bf16 they are the closer of the two to the exact value (in fp32 they agree to rounding).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

__all__ = ["TOKAMAX_KERNELS", "chunked_cross_entropy", "lm_head_cross_entropy", "resolve_loss_impl",
           "tokamax_available", "tokamax_cross_entropy"]

f32 = jnp.float32

# The tokamax implementation that does not materialise the logits, per backend platform.
TOKAMAX_KERNELS = {"gpu": "triton", "tpu": "mosaic_tpu"}


def tokamax_available(platform: str | None = None) -> bool:
    """Whether `tokamax` imports here and has its kernel for `platform` (default: JAX's
    default backend). Released tokamax 0.0.12 has only the TPU one; the GPU ("triton") one
    is newer, and needs a newer jax than this project does. Its table of implementations
    is private: if it moves, this says False and "auto" runs the chunked loss."""
    kernel = TOKAMAX_KERNELS.get(platform or jax.default_backend())
    if kernel is None:
        return False
    try:
        from tokamax._src.ops.linear_softmax_cross_entropy_loss import api
    except (ImportError, AttributeError):  # not installed, or built for another jax
        return False
    return kernel in getattr(api, "IMPLEMENTATIONS", {})


def resolve_loss_impl(loss_impl: str, platform: str | None = None) -> str:
    """The loss a `MambaConfig.loss_impl` runs on `platform` (default: JAX's default backend):
    "auto" is tokamax where it imports with a kernel for the platform, else "chunked"."""
    if loss_impl != "auto":
        return loss_impl
    return "tokamax" if tokamax_available(platform) else "chunked"


def lm_head_cross_entropy(hidden, head, targets, weights=None, *, impl: str = "chunked", dtype=None,
                          chunk_tokens: int = 1024):
    """sum_i weights_i * (logsumexp(logits_i) - logits_i[targets_i]), logits = hidden @ head.T,
    as an fp32 scalar, differentiable in `hidden` and `head`.

    hidden (T, D) and head (V, D) in any float dtype; their matmuls read them in `dtype`
    (default: hidden's) and their gradients come back in their own dtypes. targets (T,) ints
    in [0, V); weights (T,) (default all 1): 0 leaves a token out. `impl` is "chunked" or
    "tokamax" (which takes 0/1 weights only, see `tokamax_cross_entropy`) or "auto"
    (`resolve_loss_impl`); `chunk_tokens` is the chunked loss's tokens per chunk.
    """
    if hidden.ndim != 2 or head.ndim != 2 or hidden.shape[1] != head.shape[1]:
        raise ValueError(f"hidden {hidden.shape} and head {head.shape} must be (T, D) and (V, D)")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {targets.shape} must be ({hidden.shape[0]},), one per row of hidden")
    weights = jnp.ones(targets.shape, f32) if weights is None else weights.astype(f32)
    if weights.shape != targets.shape:
        raise ValueError(f"weights {weights.shape} must match targets {targets.shape}")
    dtype = jnp.dtype(dtype or hidden.dtype)
    impl = resolve_loss_impl(impl)
    if impl == "tokamax":
        return tokamax_cross_entropy(hidden, head, targets, weights, dtype=dtype)
    if impl != "chunked":
        raise ValueError(f"lm_head_cross_entropy impl={impl!r}; choose chunked, tokamax or auto")
    if type(chunk_tokens) is not int or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r}: give a positive whole number")
    return chunked_cross_entropy(hidden, head, targets.astype(jnp.int32), weights, dtype=dtype,
                                 chunk_tokens=min(chunk_tokens, hidden.shape[0]))


# --------------------------------------------------------------------- chunked
def chunked_cross_entropy(hidden, head, targets, weights, *, dtype, chunk_tokens: int):
    """The chunked loss (see the module docstring); arguments as `lm_head_cross_entropy`'s."""
    # fp32 in and out of the custom VJP: inputs in another dtype get their gradient cast back
    # to it by the casts' own VJP. (The model hands over fp32 hidden states and head.)
    return _chunked(jnp.dtype(dtype), chunk_tokens, hidden.astype(f32), head.astype(f32), targets, weights)


def _chunks(x, chunk_tokens: int):
    """(T, ...) -> (T / chunk, chunk, ...), zero-padded to whole chunks. Padded tokens get
    weight 0, which takes them out of the loss and of both gradients."""
    pad = -x.shape[0] % chunk_tokens
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, chunk_tokens, *x.shape[1:])


def _chunk_logits(hidden_chunk, head):
    """(chunk, D) x (V, D) -> (chunk, V) fp32: inputs as given, fp32 accumulation."""
    return jax.lax.dot_general(hidden_chunk, head, (((1,), (1,)), ((), ())), preferred_element_type=f32)


def _is_target(logits, targets):
    """(chunk, V) bool: column == that row's target. A compare, not a gather: it fuses into
    the reductions over the vocabulary instead of writing a one-hot matrix."""
    return jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]


def _chunk_loop(dtype, chunk_tokens, hidden, head, targets, weights, *, with_grads: bool):
    """Each token's loss (T,) fp32 and, `with_grads`, the gradients of the weighted loss sum
    in hidden (T, D) and head (V, D), both fp32: one `lax.scan` over chunks of tokens."""
    tokens = hidden.shape[0]
    head_c = head.astype(dtype)

    def one_chunk(head_grad, chunk):
        hidden_chunk, target_chunk, weight_chunk = chunk
        hidden_chunk = hidden_chunk.astype(dtype)
        logits = _chunk_logits(hidden_chunk, head_c)
        lse = jax.nn.logsumexp(logits, axis=-1)
        is_target = _is_target(logits, target_chunk)
        losses = lse - jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
        if not with_grads:
            return head_grad, (losses, None)
        # d loss / d logit_ij = w_i (softmax_ij - [j == target_i]). The two gradient matmuls
        # read it in the compute dtype, as the plain loss's backward does, and accumulate in
        # fp32 (the head's across chunks too).
        softmax = jnp.exp(logits - lse[:, None])
        logits_grad = (weight_chunk[:, None] * (softmax - is_target.astype(f32))).astype(dtype)
        hidden_grad = jax.lax.dot_general(logits_grad, head_c, (((1,), (0,)), ((), ())), preferred_element_type=f32)
        head_grad = head_grad + jax.lax.dot_general(logits_grad, hidden_chunk, (((0,), (0,)), ((), ())),
                                                    preferred_element_type=f32)
        return head_grad, (losses, hidden_grad)

    head_grad = jnp.zeros(head.shape, f32) if with_grads else None
    chunks = tuple(_chunks(x, chunk_tokens) for x in (hidden, targets, weights))
    head_grad, (losses, hidden_grad) = jax.lax.scan(one_chunk, head_grad, chunks)
    losses = losses.reshape(-1)[:tokens]
    if not with_grads:
        return losses, None, None
    return losses, hidden_grad.reshape(-1, hidden.shape[1])[:tokens], head_grad


# The loss is a scalar, so its gradient is the gradient of the sum scaled by the incoming
# cotangent. The forward pass under differentiation therefore computes the gradients while
# each chunk's logits exist, and the backward pass only scales them: the LM head's matmuls
# run three times in all (logits, d(hidden), d(head)), as in the plain loss, where a
# backward that recomputed the logits would run four, with the same peak memory (an fp32
# (V, D) accumulator and one chunk's logits). Without differentiation (evaluation) only
# the losses are computed.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(dtype, chunk_tokens, hidden, head, targets, weights):
    losses, _, _ = _chunk_loop(dtype, chunk_tokens, hidden, head, targets, weights, with_grads=False)
    return jnp.sum(losses * weights)


def _chunked_fwd(dtype, chunk_tokens, hidden, head, targets, weights):
    losses, hidden_grad, head_grad = _chunk_loop(dtype, chunk_tokens, hidden, head, targets, weights,
                                                 with_grads=True)
    return jnp.sum(losses * weights), (losses, hidden_grad, head_grad)


def _chunked_bwd(dtype, chunk_tokens, residuals, loss_cotangent):
    losses, hidden_grad, head_grad = residuals
    scale = loss_cotangent.astype(f32)
    # The loss is linear in the weights: their gradient is each token's loss.
    return hidden_grad * scale, head_grad * scale, None, losses * scale


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# --------------------------------------------------------------------- tokamax
def tokamax_cross_entropy(hidden, head, targets, weights, *, dtype, kernel: str | None = None,
                          loss_fn=None):
    """The loss through `tokamax.linear_softmax_cross_entropy_loss(x, labels, w)`, which
    returns the plain sum over all tokens and takes no per-token weights.

    Weights must therefore be 0 or 1 (every loss mask in this project is). A left-out token
    is given an all-zero hidden row: its logits are all 0, so it adds exactly log(V) to the
    sum, which is subtracted again, and nothing to either gradient (the row is zero for the
    output matrix's gradient and cut off by `where` for the hidden's). `kernel` defaults to
    the platform's entry of `TOKAMAX_KERNELS`; `loss_fn` stands in for tokamax's function
    (tests).
    """
    if loss_fn is None:
        import tokamax

        loss_fn = tokamax.linear_softmax_cross_entropy_loss
    kernel = kernel or TOKAMAX_KERNELS.get(jax.default_backend())
    if kernel is None:
        raise ValueError(f"tokamax has no cross-entropy kernel for the {jax.default_backend()} backend; "
                         f"use loss_impl='chunked'")
    vocab = head.shape[0]
    keep = weights != 0
    x = jnp.where(keep[:, None], hidden, jnp.zeros((), hidden.dtype)).astype(dtype)
    total = loss_fn(x, targets, head.astype(dtype).T, reduction="sum", implementation=kernel)
    left_out = jnp.sum(~keep).astype(f32)
    return total.astype(f32) - left_out * math.log(vocab)
