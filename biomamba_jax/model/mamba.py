"""Mamba-1 language model in Flax NNX: mixer, block, LM, and the recurrent decode cache.

Shape letters used in comments:
    B batch, L length, D d_model, E d_inner, N d_state, K conv width, R dt_rank, V vocab,
    Y layers.

Numerics: parameters are fp32. Matmuls and the conv run in `config.dtype` (bf16 on
accelerators). A_log, D, the dt bias, the norms, the residual stream and the scan state
stay fp32 whatever the compute dtype, as in mamba_ssm.

Layers are created stacked (every parameter has a leading Y axis) and run under
`jax.lax.scan`, so compile time does not grow with depth and remat is one decorator; with
`scan_layers=False` they are written out one by one instead, which trades compile time
for the copies a scan makes of what the backward pass keeps from each layer.

Packed documents: given per-token `segment_ids` and `config.reset_at_documents`, each
document of a row runs as if it were alone: the conv reads no input of an earlier
document and the scan state restarts from zero at each document's first token
(`document_resets`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from biomamba_jax.model.config import MambaConfig
from biomamba_jax.model.scan import SCAN_RESIDUAL_NAMES, selective_scan, selective_state_update

__all__ = ["DecodeWeights", "MambaCache", "MambaMixer", "MambaBlock", "MambaLM", "RMSNorm", "document_resets"]


class DecodeWeights(NamedTuple):
    """What `MambaLM.decode_weights` prepares once for a decode loop."""

    layers: tuple  # one nnx state per layer, sliced out of the stacked parameters
    head: Optional[jax.Array]  # tied output matrix (V, D) in the compute dtype, or None


class MambaCache(NamedTuple):
    """Recurrent state of every layer: the conv window and the fp32 SSM state.

    Stacked, each field is one array with a leading layer axis. A decode loop carries the
    per-layer form instead (`per_layer()`: a tuple of Y arrays per field), so each layer's
    step rewrites its own buffers in place; updating one slice of a stacked cache per
    layer costs a copy kernel per layer and token."""

    conv_state: jax.Array  # (Y, B, E, K) last K pre-conv inputs, newest last
    ssm_state: jax.Array  # (Y, B, E, N) fp32

    def per_layer(self) -> "MambaCache":
        return MambaCache(*(tuple(field) for field in self))

    def stacked(self) -> "MambaCache":
        return MambaCache(*(jnp.stack(field) if isinstance(field, (tuple, list)) else field for field in self))


def _unstack(layer_state, n_layer: int) -> tuple:
    """The stacked (Y, ...) layer state as one state per layer."""
    return tuple(jax.tree.map(lambda x: x[index], layer_state) for index in range(n_layer))


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer, recompute it in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Recompute the layer but keep the scan's output and chunk-start states, so the
    # backward pass does not rerun the scan kernel (impls that name those residuals).
    # Why these and only these: the forward scan kernel is the piece of a layer that costs
    # as much to rerun as to run (a pass over B x L x E x N state updates) and its outputs
    # are exactly what its backward kernel reads: y (B, L, E) in the compute dtype and one
    # fp32 (E, N) state per chunk of steps. Everything else the backward needs comes from
    # the layer input through the norm, projections, conv, softplus and gate: elementwise
    # work, or matmuls that are cheaper to redo than to keep (saving their outputs too,
    # "dots", measured no faster than "full": benchmarks/HISTORY.md). The price is memory:
    # with the Pallas chunk of 8 steps and N = 16 the states are 4x y's bf16 bytes, so a
    # layer keeps 5 (B, L, E) bf16 arrays' worth beyond the fp32 input "full" keeps alone.
    "scan": jax.checkpoint_policies.save_only_these_names(*SCAN_RESIDUAL_NAMES),
}


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x = x.astype(jnp.float32)
        scale = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * scale * self.weight[...]


def _dt_bias_init(config: MambaConfig, key) -> jax.Array:
    """Inverse softplus of dt ~ logU(dt_min, dt_max), so softplus(bias) starts there."""
    log_dt = jax.random.uniform(
        key, (config.d_inner,), minval=math.log(config.dt_min), maxval=math.log(config.dt_max)
    )
    dt = jnp.maximum(jnp.exp(log_dt), config.dt_init_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def document_resets(segment_ids):
    """Packed rows' segment ids (B, L) -> resets (B, L) bool, True at the first token of
    each document after a row's first: where segment_ids[t] != segment_ids[t - 1] and
    t is not padding (id 0, which the attention mask handles as it always has)."""
    segment_ids = jnp.asarray(segment_ids)
    starts = (segment_ids[:, 1:] != segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return jnp.pad(starts, ((0, 0), (1, 0)))


def causal_depthwise_conv(x, kernel, bias=None, resets=None):
    """Causal depthwise conv over time: x (B, L, E), Flax kernel (K, 1, E), bias (E,).

    Written as K shifted multiply-adds that XLA fuses into one elementwise pass, accumulated
    in fp32. A grouped `lax.conv` with E groups computes the same, but its filter gradient
    is a slow grouped-convolution kernel on GPUs. Like PyTorch's Conv1d this is
    cross-correlation: tap k multiplies x[t - (K - 1) + k]. With `resets` (B, L) a tap
    reads x[t - s] only if no reset lies in (t - s, t]: the window stays in t's document.
    """
    width, length = kernel.shape[0], x.shape[1]
    padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0))).astype(jnp.float32)
    taps = kernel[:, 0, :].astype(jnp.float32)  # (K, E)
    if resets is None:
        out = sum(padded[:, k:k + length] * taps[k] for k in range(width))
    else:
        document = jnp.cumsum(resets, axis=1, dtype=jnp.int32)  # (B, L): which document each token is in
        padded_document = jnp.pad(document, ((0, 0), (width - 1, 0)), constant_values=-1)
        same = [(padded_document[:, k:k + length] == document)[..., None] for k in range(width)]
        out = sum(jnp.where(same[k], padded[:, k:k + length], 0.0) * taps[k] for k in range(width))
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)


class MambaMixer(nnx.Module):
    """The selective-SSM mixer of one Mamba-1 block."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        dtype = jnp.dtype(c.dtype)
        linear = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.in_proj = nnx.Linear(c.d_model, 2 * c.d_inner, use_bias=c.proj_bias, **linear)
        # Holds the conv parameters in Flax's layout; the forward is `causal_depthwise_conv`.
        self.conv1d = nnx.Conv(
            c.d_inner, c.d_inner, kernel_size=(c.d_conv,), feature_group_count=c.d_inner,
            padding=((c.d_conv - 1, 0),), use_bias=c.conv_bias, **linear,
        )
        self.x_proj = nnx.Linear(c.d_inner, c.dt_rank + 2 * c.d_state, use_bias=False, **linear)
        dt_std = c.dt_scale * c.dt_rank**-0.5
        self.dt_proj = nnx.Linear(
            c.dt_rank, c.d_inner, use_bias=True,
            kernel_init=nnx.initializers.uniform(2 * dt_std), **linear,
        )
        # uniform(s) samples [0, s): shift to [-dt_std, dt_std) as mamba_ssm does.
        self.dt_proj.kernel[...] = self.dt_proj.kernel[...] - dt_std
        self.dt_proj.bias[...] = _dt_bias_init(c, rngs.params())
        self.A_log = nnx.Param(
            jnp.log(jnp.broadcast_to(jnp.arange(1, c.d_state + 1, dtype=jnp.float32), (c.d_inner, c.d_state)))
        )
        self.D = nnx.Param(jnp.ones((c.d_inner,), jnp.float32))
        self.out_proj = nnx.Linear(c.d_inner, c.d_model, use_bias=c.proj_bias, **linear)

    def _ssm_inputs(self, x):
        """x_proj, then dt through dt_proj's weight; the dt bias is added in fp32 later."""
        c = self.config
        x_dbl = self.x_proj(x)
        dt, B, C = jnp.split(x_dbl, [c.dt_rank, c.dt_rank + c.d_state], axis=-1)
        delta = dt @ self.dt_proj.kernel[...].astype(dt.dtype)
        return delta, B, C

    def __call__(self, hidden, mask=None, *, resets=None, return_cache: bool = False):
        """hidden (B, L, D) -> (B, L, D); with `return_cache` also the layer's
        (conv_state (B, E, K), ssm_state (B, E, N)). `resets` (B, L) bool: True at a
        document's first token, where the conv window and the scan state restart."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x, z = jnp.split(self.in_proj(hidden.astype(dtype)), 2, axis=-1)  # (B, L, E) each
        if mask is not None:
            # Zero padded inputs before the conv so they add nothing to real tokens' windows.
            x = x * mask[..., None].astype(dtype)
        pre_conv = x
        x = jax.nn.silu(causal_depthwise_conv(
            x, self.conv1d.kernel[...], self.conv1d.bias[...] if c.conv_bias else None, resets))
        delta, B, C = self._ssm_inputs(x)
        y, ssm_state = selective_scan(
            x, delta, -jnp.exp(self.A_log[...]), B, C, self.D[...], z,
            delta_bias=self.dt_proj.bias[...], delta_softplus=True,
            return_final_state=True, mask=mask, resets=resets, impl=c.scan,
        )
        out = self.out_proj(y)
        if not return_cache:
            return out
        if resets is not None:  # the window a next token sees holds only the last document's inputs
            document = jnp.cumsum(resets, axis=1, dtype=jnp.int32)
            pre_conv = jnp.where((document == document[:, -1:])[..., None], pre_conv, 0)
        # The conv window after the prompt: its last K pre-conv inputs, zero-padded on the left.
        window = jnp.pad(pre_conv, ((0, 0), (max(c.d_conv - pre_conv.shape[1], 0), 0), (0, 0)))
        conv_state = jnp.swapaxes(window[:, -c.d_conv:], 1, 2)  # (B, E, K)
        return out, (conv_state, ssm_state)

    def step(self, hidden, conv_state, ssm_state):
        """One token: hidden (B, D) -> (B, D), with the updated (conv_state, ssm_state)."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x, z = jnp.split(self.in_proj(hidden.astype(dtype)), 2, axis=-1)  # (B, E)
        conv_state = jnp.concatenate([conv_state[..., 1:], x[..., None].astype(conv_state.dtype)], axis=-1)
        kernel = self.conv1d.kernel[...][:, 0, :].T.astype(dtype)  # (E, K)
        x = jnp.sum(conv_state.astype(dtype) * kernel, axis=-1)
        if c.conv_bias:
            x = x + self.conv1d.bias[...].astype(dtype)
        x = jax.nn.silu(x)
        delta, B, C = self._ssm_inputs(x)
        y, ssm_state = selective_state_update(
            ssm_state, x, delta, -jnp.exp(self.A_log[...]), B, C, self.D[...], z,
            delta_bias=self.dt_proj.bias[...], delta_softplus=True,
        )
        return self.out_proj(y), conv_state, ssm_state


class MambaBlock(nnx.Module):
    """Pre-norm residual block: h + mixer(rmsnorm(h)), with h kept in fp32."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.mixer = MambaMixer(config, rngs=rngs)

    def __call__(self, hidden, mask=None, *, resets=None, return_cache: bool = False):
        if return_cache:
            out, cache = self.mixer(self.norm(hidden), mask, resets=resets, return_cache=True)
            return hidden + out.astype(jnp.float32), cache
        return hidden + self.mixer(self.norm(hidden), mask, resets=resets).astype(jnp.float32)

    def step(self, hidden, conv_state, ssm_state):
        out, conv_state, ssm_state = self.mixer.step(self.norm(hidden), conv_state, ssm_state)
        return hidden + out.astype(jnp.float32), conv_state, ssm_state


class MambaLM(nnx.Module):
    """Mamba-1 causal language model (`MambaForCausalLM` / `MambaLMHeadModel`)."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embedding = nnx.Embed(
            c.vocab_size, c.d_model, dtype=jnp.float32, param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(c.initializer_range), rngs=rngs,
        )

        @nnx.split_rngs(splits=c.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_stacked_blocks(rngs):
            return MambaBlock(c, rngs=rngs)

        self.layers = make_stacked_blocks(rngs)
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = nnx.Linear(
                c.d_model, c.vocab_size, use_bias=False, dtype=jnp.dtype(c.dtype),
                param_dtype=jnp.float32, rngs=rngs,
            )

    # --------------------------------------------------------------- internals
    def _logits(self, hidden, head_weight=None):
        """Final norm and output matrix; `head_weight`: a tied (V, D) matrix already cast."""
        hidden = self.norm_f(hidden).astype(jnp.dtype(self.config.dtype))
        if self.config.tie_embeddings:
            if head_weight is None:
                head_weight = self.embedding.embedding[...].astype(hidden.dtype)
            return hidden @ head_weight.T
        return self.lm_head(hidden)

    def decode_weights(self) -> "DecodeWeights":
        """The weights a decode step reads, split per layer and cast ahead of the token loop.

        Inside a loop, slicing layer i's matrices out of the stacked (Y, ...) parameters
        copies them at every token (for Mamba-130m at B=32 that was 0.2 ms of a 1.2 ms
        step on an H100), and a tied output matrix is recast from the fp32 embedding table.
        Computed once before the loop and passed to every `step`, neither happens."""
        c = self.config
        _, layer_state = nnx.split(self.layers)
        head = self.embedding.embedding[...].astype(jnp.dtype(c.dtype)) if c.tie_embeddings else None
        return DecodeWeights(_unstack(layer_state, c.n_layer), head)

    def _run_layers(self, hidden, mask, return_cache, resets=None):
        graphdef, layer_state = nnx.split(self.layers)

        def one_layer(hidden, state):
            block = nnx.merge(graphdef, state)
            if return_cache:
                return block(hidden, mask, resets=resets, return_cache=True)
            return block(hidden, mask, resets=resets), None

        if self.config.remat != "none":
            one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[self.config.remat])
        if self.config.scan_layers:
            return jax.lax.scan(one_layer, hidden, layer_state)
        # Written out layer by layer: what the backward pass keeps from each layer stays in
        # that layer's own buffers, where a scan stacks it, and the stacking copies it once
        # on the way in and once on the way out (benchmarks/NOTES.md, section 8).
        caches = []
        for state in _unstack(layer_state, self.config.n_layer):
            hidden, cache = one_layer(hidden, state)
            caches.append(cache)
        return hidden, (jax.tree.map(lambda *xs: jnp.stack(xs), *caches) if return_cache else None)

    # ------------------------------------------------------------------ public
    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, lm_head: bool = True):
        """input_ids (B, L) int -> logits (B, L, V) in the compute dtype.

        `attention_mask` (B, L): 0 marks padding, which leaves the state untouched.
        `segment_ids` (B, L): packed documents numbered 1, 2, ... along a row (0: padding).
        With `config.reset_at_documents` each document then gives the logits it would give
        alone (`document_resets`); without, they are not used and the row is one stream.
        `lm_head=False` returns the final-normed hidden states (B, L, D) in fp32 instead, for
        a loss that applies `output_matrix()` itself without materialising the logits.
        """
        resets = None
        if segment_ids is not None and self.config.reset_at_documents:
            resets = document_resets(segment_ids)
        hidden = self.embedding(input_ids)
        hidden, _ = self._run_layers(hidden, attention_mask, return_cache=False, resets=resets)
        return self._logits(hidden) if lm_head else self.norm_f(hidden)

    def output_matrix(self) -> jax.Array:
        """The LM head as a (V, D) fp32 matrix: the tied embedding or the untied head's kernel
        transposed. The logits are the final-normed hidden states times its transpose."""
        if self.config.tie_embeddings:
            return self.embedding.embedding[...]
        return self.lm_head.kernel[...].T

    def prefill(self, input_ids, attention_mask=None, *, last_logits_only: bool = False):
        """Parallel forward over a (left-padded) prompt; returns (logits, MambaCache).

        `last_logits_only` returns the logits of the last position alone, (B, 1, V): all a
        decode loop reads, and for a long prompt the full (B, L, V) logits are by far the
        largest buffer (and matmul) of the prefill."""
        hidden = self.embedding(input_ids)
        hidden, (conv_state, ssm_state) = self._run_layers(hidden, attention_mask, return_cache=True)
        return self._logits(hidden[:, -1:] if last_logits_only else hidden), MambaCache(conv_state, ssm_state)

    def step(self, token_ids, cache: MambaCache, *, unroll_layers: bool = True,
             weights: "DecodeWeights | None" = None):
        """One decode step: token_ids (B,) -> (logits (B, V), updated cache).

        `unroll_layers` writes the layer loop out in full: a decode step is a few small
        kernels per layer, and as straight-line code XLA launches them without a loop
        round trip per layer. The cache comes back in the form it came in: stacked, or
        per layer (`MambaCache.per_layer()`, what a decode loop should carry).
        `weights` is `decode_weights()`, computed once outside a decode loop.
        """
        graphdef, layer_state = nnx.split(self.layers)

        def one_layer(hidden, per_layer):
            state, conv_state, ssm_state = per_layer
            hidden, conv_state, ssm_state = nnx.merge(graphdef, state).step(hidden, conv_state, ssm_state)
            return hidden, (conv_state, ssm_state)

        hidden = self.embedding(token_ids)
        head = None if weights is None else weights.head
        per_layer = isinstance(cache.ssm_state, (tuple, list))
        if not unroll_layers:
            hidden, (conv_state, ssm_state) = jax.lax.scan(
                one_layer, hidden, (layer_state, *cache.stacked()))
            new_cache = MambaCache(conv_state, ssm_state)
            return self._logits(hidden, head), (new_cache.per_layer() if per_layer else new_cache)
        layers = _unstack(layer_state, self.config.n_layer) if weights is None else weights.layers
        new_states = []
        for index, state in enumerate(layers):
            hidden, states = one_layer(hidden, (state, cache.conv_state[index], cache.ssm_state[index]))
            new_states.append(states)
        new_cache = MambaCache(*(tuple(field) for field in zip(*new_states)))
        return self._logits(hidden, head), (new_cache if per_layer else new_cache.stacked())

    def init_cache(self, batch_size: int) -> MambaCache:
        c = self.config
        return MambaCache(
            conv_state=jnp.zeros((c.n_layer, batch_size, c.d_inner, c.d_conv), jnp.dtype(c.dtype)),
            ssm_state=jnp.zeros((c.n_layer, batch_size, c.d_inner, c.d_state), jnp.float32),
        )
