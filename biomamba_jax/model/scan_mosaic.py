"""Fused selective scan as Pallas Mosaic GPU kernels, for Hopper GPUs (impl "mosaic").

Pallas' Triton backend, which `scan_pallas` is written for, is deprecated; Mosaic GPU is
the GPU backend JAX keeps, and it reaches Hopper's copy engine (TMA) and mbarriers.

Forward kernel: one thread block (one warpgroup, 128 threads) per (128 channels, batch
row), one channel per thread, the channel's N fp32 states in registers. The block walks
the sequence in tiles of `FWD_TILE` (16) tokens; each tile's rows of delta, u, z (128
channels) and of [B | C] (and the reset flags) come in by TMA, `FWD_STAGES` tiles ahead of
the one being computed. Per token a thread applies the dt bias and softplus, runs its N state
updates (exp2 of A pre-scaled by log2(e)), contracts with C, adds the D skip and applies
the SiLU gate, and writes its y straight to global memory; B and C are read from shared
memory as values every thread of a warp shares. When a gradient is needed the forward
also writes the state entering every `TILE` (32) tokens, every other tile (B, L / TILE,
N, E): the largest activation a training step keeps, half of what a state per tile would
be.

Backward kernel: the same grid, walking tiles of `TILE` tokens in reverse. Per tile, pass 1
walks the tile from its saved state and writes the state entering every `PAIR` (2) tokens
to shared memory (each thread only its own channel's column, so no barrier is needed).
Pass 2 runs the adjoint g_{t-1} = exp(delta_t A) (g_t + dy_t C_t) back through the tile a
pair at a time: the pair's entering state comes from that history, the state between its
tokens and the first token's decays are computed once and kept in registers, so each state
and token costs two exp2 over both passes and the history one store and one load per pair.
dB and dC are sums over channels: each token's 2N products are summed over a warp's 32
lanes by a butterfly reduce-scatter of warp shuffles, the four warps' rows are added once
per half tile, and each block writes its partial sums, which XLA adds over the channel
blocks. dA, dD and the dt
bias gradient are summed per thread over the sequence and over the batch by XLA.

Document resets (`resets`, True at the first token of a document) enter as a per-token
penalty added to delta in the decay only: exp2((delta + 1e30) * A log2(e)) is 0, so the
state entering a reset token is dropped at the cost of one add per token, not one
multiply per state. (A channel whose A is exactly 0 would not reset; A = -exp(A_log) is
never 0.)

Masked and padded tokens get u = 0 and a delta of exactly 0 (a raw delta of -1e4 before
the softplus, or 0 after the bias when there is no softplus), which leaves the state
unchanged. Channels are padded to a multiple of 128 and N to 4, 8 or 16 with zero A,
B, C and start state, which keeps the padded states at zero.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from biomamba_jax.model.scan_math import SCAN_RESIDUAL_NAMES
from biomamba_jax.model.scan_options import MosaicOptions

__all__ = ["MAX_D_STATE", "TILE", "MosaicOptions", "device_reason", "mosaic_selective_scan", "unsupported_reason"]

f32 = jnp.float32
TILE = 32  # tokens per saved state, and per TMA tile of the backward
HALF = TILE // 2  # tokens per d[B | C] warp-sums buffer of the backward (two per tile)
# The backward keeps the state entering every PAIR-th token in shared memory, and the state
# between a pair's tokens in registers: a whole tile's history then fits in shared memory
# (PAIRS x N x 128 fp32, 128 KB at N = 16), with half the history stores and loads of one
# entry per token. (Larger groups would hold more states in registers than a thread has.)
PAIR = 2
PAIRS = TILE // PAIR
# Tokens per TMA tile of the forward: 32-token tiles made the forward 13% slower at
# 8 x 2048 x 1536 on an H200 (benchmarks/HISTORY.md), so it saves every other tile's state.
FWD_TILE = HALF
BLOCK = 128  # channels per thread block: one per thread of a warpgroup
FWD_STAGES = 3  # tiles in flight in the forward
BWD_STAGES = 2  # ... and in the backward, whose shared memory also holds the state history
_SMEM_BYTES = 226 * 1024  # Hopper's 227 KB of shared memory per block, less Mosaic's own use
FWD_UNROLL = 4  # tokens per iteration of the in-tile loops
MAX_D_STATE = 16  # the backward's state history (PAIRS x N x 128 fp32) fills shared memory at 16
_WARP = 32
_WARPS = BLOCK // _WARP
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MASKED_RAW_DELTA = -1.0e4  # softplus(-1e4 + bias) is exactly 0 in fp32
_RESET_PENALTY = 1.0e30  # added to delta in the decay of a reset token: exp2(-huge) = 0
_LINE = plgpu.Layout.WG_STRIDED((BLOCK,), vec_size=1)  # thread i holds channel i


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static shape and options of one kernel launch (hashable: a jit static argument)."""

    batch: int
    tiles: int  # padded length / TILE
    channels: int  # padded to a multiple of BLOCK
    d_state: int  # padded to 4, 8 or 16
    softplus: bool
    has_z: bool
    has_resets: bool
    approx_math: bool
    interpret: bool

    @property
    def length(self) -> int:
        return self.tiles * TILE


def _padded_d_state(d_state: int) -> int:
    return max(4, 1 << (d_state - 1).bit_length())


def unsupported_reason(d_state: int) -> Optional[str]:
    """Why the kernels cannot run a scan with this state size (None if they can)."""
    if d_state > MAX_D_STATE:
        return (f"the mosaic scan supports d_state up to {MAX_D_STATE} (its backward keeps a tile of "
                f"states in shared memory); got {d_state}: use impl 'pallas' or 'chunked'")
    return None


def device_reason() -> Optional[str]:
    """Why the default device cannot run the kernels (None if it can): they use Hopper's
    copy engine (TMA) and need compute capability 9.0 or newer."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"impl 'mosaic' runs on NVIDIA GPUs of compute capability 9.0 or newer; this backend is {backend}"
    capability = str(getattr(jax.devices()[0], "compute_capability", "") or "")
    if capability and int(capability.split(".")[0]) < 9:
        return (f"impl 'mosaic' needs compute capability 9.0 or newer (Hopper); this GPU has {capability}: "
                f"use impl 'pallas'")
    return None


# jax 0.10's `plgpu.load` takes an index argument; 0.11 deprecates it for `ref.at[...]`.
_LOAD_TAKES_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
    if _LOAD_TAKES_INDEX:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def _line(ref):
    """A (BLOCK,) row of a ref, one element per thread."""
    return _load(ref, _LINE)


def _softplus(x):
    """log(1 + e^x), and x itself above 20 as mamba_ssm does. log1p(e) from log(1 + e) and
    the rounding error of 1 + e (e / ((1 + e) - 1)), since the kernels have no log1p."""
    e = jnp.exp(jnp.minimum(x, 20.0))
    one_plus = 1.0 + e
    log1p = jnp.where(one_plus == 1.0, e, jnp.log(one_plus) * (e / (one_plus - 1.0)))
    return jnp.where(x > 20.0, x, log1p)


def _launch(cfg: _Config, name: str, body, out_type, scratch_types):
    # Lane semantics (thread-level values with the layouts written here) rather than jax
    # 0.11's default, Warpgroup: the kernels already give every value its layout, and
    # Warpgroup's layout inference takes 13 s of a 14 s build of the forward and backward
    # (jax 0.11.2, 8 x 2048 x 1536; 0.75 s with Lane).
    params = plgpu.CompilerParams(approx_math=cfg.approx_math, unsafe_no_auto_barriers=True,
                                  lowering_semantics=plgpu.LoweringSemantics.Lane)
    kwargs = {}
    if cfg.interpret:
        kwargs["interpret"] = _interpret_params()
    # No automatic barriers: a thread reads and writes only its own channel's column of the
    # tiles and the state history; the shared rows (refilled tile slots, dB/dC warp sums)
    # are ordered by the explicit `commit_smem` (a fence and a warpgroup barrier).
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, grid=(cfg.channels // BLOCK, cfg.batch),
                        grid_names=("e", "b"), kernel_name=name, compiler_params=params, **kwargs)


def _interpret_params():
    """Pallas' GPU interpreter (exported from jax 0.11; jax 0.10 has it unexported)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import (
            InterpretGPUParams as params,
        )
    return params()


def _line_inputs(cfg: _Config, with_dy: bool) -> list[str]:
    return ["delta", "u"] + (["z"] if cfg.has_z else []) + (["dy"] if with_dy else [])


def _tile_scratch(cfg: _Config, arrays: dict, lines: list[str], stages: int, tokens: int) -> dict:
    """Shared memory for `stages` tiles of `tokens` tokens in flight."""
    scratch = {name: plgpu.SMEM((stages, tokens, BLOCK), arrays[name].dtype) for name in lines}
    scratch["bc"] = plgpu.SMEM((stages, tokens, 2 * cfg.d_state), f32)
    if cfg.has_resets:
        # Penalties travel as the 128-byte row of the TILE tokens around the tile (a forward
        # tile reads half of it): TMA writes shared memory at 128-byte aligned addresses,
        # and a copy under the Lane semantics moves a multiple of 128 bytes (one per thread
        # of the warpgroup).
        scratch["pen"] = plgpu.SMEM((stages, TILE), f32)
    copies = len(lines) + 1 + int(cfg.has_resets)
    scratch["bars"] = plgpu.Barrier(num_arrivals=copies, num_barriers=stages)
    return scratch


def _fetch(cfg: _Config, ins: dict, scratch: dict, lines: list[str], b, cols, tile, slot, tokens: int):
    """Start the TMA copies of tile `tile` (of `tokens` tokens) into slot `slot`."""
    rows = pl.ds(tile * tokens, tokens)
    bar = scratch["bars"].at[slot]
    for name in lines:
        plgpu.copy_gmem_to_smem(ins[name].at[b, rows, cols], scratch[name].at[slot], bar)
    plgpu.copy_gmem_to_smem(ins["bc"].at[b, rows], scratch["bc"].at[slot], bar)
    if cfg.has_resets:
        pen_rows = pl.ds(lax.div(tile, TILE // tokens) * TILE, TILE)
        plgpu.copy_gmem_to_smem(ins["pen"].at[b, pen_rows], scratch["pen"].at[slot], bar)


class _Token:
    """What every token of a tile needs, read from a tile slot: the pre-bias delta x, delta,
    u, delta * u and the delta the decay uses (delta plus the reset penalty)."""

    def __init__(self, cfg: _Config, scratch: dict, slot, t, bias, pen_offset=0):
        self.x = _line(scratch["delta"].at[slot, t]).astype(f32) + bias
        self.delta = _softplus(self.x) if cfg.softplus else self.x
        self.u = _line(scratch["u"].at[slot, t]).astype(f32)
        self.du = self.delta * self.u
        self.decay_delta = self.delta + scratch["pen"][slot, pen_offset + t] if cfg.has_resets else self.delta


def _in_names(cfg: _Config) -> list[str]:
    return ["delta", "u"] + (["z"] if cfg.has_z else []) + ["bc"] + (["pen"] if cfg.has_resets else []) + [
        "bias", "dskip", "a2t", "h0t"]


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))  # one lowering per configuration and call site shape
def _forward_call(cfg: _Config, save_states: bool, arrays: dict):
    """y (B, L, E) in u's dtype, the final state (B, N, E) fp32 and, with `save_states`,
    the state entering every TILE tokens (B, L / TILE, N, E)."""
    n_state, tiles = cfg.d_state, cfg.tiles * (TILE // FWD_TILE)
    in_names = _in_names(cfg)
    lines = _line_inputs(cfg, with_dy=False)
    out_type = [jax.ShapeDtypeStruct((cfg.batch, cfg.length, cfg.channels), arrays["u"].dtype),
                jax.ShapeDtypeStruct((cfg.batch, n_state, cfg.channels), f32)]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((cfg.batch, cfg.tiles, n_state, cfg.channels), f32))
    scratch_types = _tile_scratch(cfg, arrays, lines, FWD_STAGES, FWD_TILE)

    def body(*refs, **scratch):
        ins = dict(zip(in_names, refs))
        y_ref, final_ref = refs[len(in_names):len(in_names) + 2]
        states_ref = refs[len(in_names) + 2] if save_states else None
        e_block, b = lax.axis_index("e"), lax.axis_index("b")
        cols = pl.ds(e_block * BLOCK, BLOCK)
        for tile in range(min(FWD_STAGES, tiles)):
            _fetch(cfg, ins, scratch, lines, b, cols, tile, tile, FWD_TILE)
        bias = _line(ins["bias"].at[cols])
        dskip = _line(ins["dskip"].at[cols])
        a2 = [_line(ins["a2t"].at[j, cols]) for j in range(n_state)]
        h0 = tuple(_line(ins["h0t"].at[b, j, cols]) for j in range(n_state))

        def one_tile(tile, h):
            slot = lax.rem(tile, FWD_STAGES)
            half = lax.rem(tile, TILE // FWD_TILE)  # which part of its TILE tokens this tile is
            if save_states:

                @pl.when(half == 0)
                def _():
                    for j in range(n_state):
                        states_ref[b, lax.div(tile, TILE // FWD_TILE), j, cols] = h[j]

            plgpu.barrier_wait(scratch["bars"].at[slot])
            bc = scratch["bc"].at[slot]

            def one_token(t, h):
                tok = _Token(cfg, scratch, slot, t, bias, pen_offset=half * FWD_TILE)
                y = dskip * tok.u
                h = list(h)
                for j in range(n_state):
                    decay = jnp.exp2(tok.decay_delta * a2[j])
                    h[j] = decay * h[j] + tok.du * bc[t, j]
                    y = y + h[j] * bc[t, n_state + j]
                if cfg.has_z:
                    z = _line(scratch["z"].at[slot, t]).astype(f32)
                    y = y * (z * jax.nn.sigmoid(z))
                y_ref[b, tile * FWD_TILE + t, cols] = y.astype(y_ref.dtype)
                return tuple(h)

            def unrolled(i, h):
                for r in range(FWD_UNROLL):
                    h = one_token(i * FWD_UNROLL + r, h)
                return h

            h = lax.fori_loop(0, FWD_TILE // FWD_UNROLL, unrolled, h)
            plgpu.commit_smem()  # every thread is done with this slot: refill it

            @pl.when(tile + FWD_STAGES < tiles)
            def _():
                _fetch(cfg, ins, scratch, lines, b, cols, tile + FWD_STAGES, slot, FWD_TILE)

            return h

        h = lax.fori_loop(0, tiles, one_tile, h0)
        for j in range(n_state):
            final_ref[b, j, cols] = h[j]

    call = _launch(cfg, "selective_scan_fwd", body, tuple(out_type), scratch_types)
    return call(*(arrays[name] for name in in_names))


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def _lane_sums_store(ref, products):
    """Sum each of the K products (a power of two up to 32) over the 32 lanes of each warp
    and store warp w's sum of product k at ref[w, k].

    A butterfly reduce-scatter: at each step lanes l and l ^ half exchange the halves of
    their list that the other keeps, so the list halves while the sums double; K - 1
    shuffles for K products, against 5 K for K separate reductions. Steps past K's
    log2 are plain butterfly adds of the one sum left."""
    # Mosaic GPU's own IR, below Pallas: only this function needs it.
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    count = len(products)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) + (_LINE,) * count)
    def store(ctx, out, *arrays):
        del ctx
        i32 = ir.IntegerType.get_signless(32)
        tid = mgpu_utils.thread_idx()
        lane = arith.andi(tid, mgpu_utils.c(_WARP - 1, i32))
        warp = arith.andi(arith.shrui(tid, mgpu_utils.c(5, i32)), mgpu_utils.c(_WARPS - 1, i32))
        first = ir.DenseI64ArrayAttr.get([0])
        sums = [vector.extract(a.registers.flat[0], dynamic_position=[], static_position=first) for a in arrays]
        half = _WARP // 2
        index = None  # which product this lane's sum ends up being
        while half:
            if len(sums) > 1:
                keep_upper = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, mgpu_utils.c(half, i32)),
                                        mgpu_utils.c(0, i32))
                m = len(sums) // 2
                next_sums = []
                for lo, hi in zip(sums[:m], sums[m:]):
                    send = arith.select(keep_upper, lo, hi)
                    keep = arith.select(keep_upper, hi, lo)
                    next_sums.append(arith.addf(keep, mgpu_utils.shfl_bfly(send, half)))
                sums = next_sums
                bit = arith.select(keep_upper, mgpu_utils.c(m, i32), mgpu_utils.c(0, i32))
                index = bit if index is None else arith.addi(index, bit)
            else:
                sums = [arith.addf(sums[0], mgpu_utils.shfl_bfly(sums[0], half))]
            half //= 2
        idx = ir.IndexType.get()
        index = mgpu_utils.c(0, i32) if index is None else index
        # Lanes holding the same product store the same value to the same place.
        memref.store(sums[0], out, [arith.index_cast(idx, warp), arith.index_cast(idx, index)])

    store(ref, *products)


def _backward_stages(cfg: _Config, arrays: dict, lines: list[str]) -> int:
    """Tiles in flight in the backward: BWD_STAGES when they fit in shared memory beside the
    state history and the warp sums, else one (fp32 inputs: no prefetch, slower, still right)."""
    width = 2 * cfg.d_state
    tile_bytes = TILE * (BLOCK * sum(jnp.dtype(arrays[name].dtype).itemsize for name in lines) + 4 * width + 4)
    fixed_bytes = 4 * (PAIRS * cfg.d_state * BLOCK + 2 * _WARPS * HALF * width)
    return BWD_STAGES if fixed_bytes + BWD_STAGES * tile_bytes <= _SMEM_BYTES else 1


@functools.partial(jax.jit, static_argnums=0)
def _backward_call(cfg: _Config, arrays: dict):
    """Cotangents of the kernel inputs: d(delta), du, dz (B, L, E) in their dtypes, d[B | C]
    per channel block (B, E / 128, L * 2N) fp32, dA (B, N, E), dD and d(bias) (B, E), and
    d(h0) (B, N, E)."""
    n_state, tiles, width = cfg.d_state, cfg.tiles, 2 * cfg.d_state
    blocks = cfg.channels // BLOCK
    in_names = _in_names(cfg)[:-1] + ["states", "dfinal", "dy"]
    lines = _line_inputs(cfg, with_dy=True)
    line_out = lambda name: jax.ShapeDtypeStruct((cfg.batch, cfg.length, cfg.channels), arrays[name].dtype)
    out_names = ["ddelta", "du"] + (["dz"] if cfg.has_z else []) + ["dbc", "dA", "dD", "dbias", "dh0"]
    per_state = jax.ShapeDtypeStruct((cfg.batch, n_state, cfg.channels), f32)
    per_channel = jax.ShapeDtypeStruct((cfg.batch, cfg.channels), f32)
    out_type = ([line_out("delta"), line_out("u")] + ([line_out("z")] if cfg.has_z else [])
                + [jax.ShapeDtypeStruct((cfg.batch, blocks, cfg.length * width), f32),
                   per_state, per_channel, per_channel, per_state])
    stages = _backward_stages(cfg, arrays, lines)
    scratch_types = _tile_scratch(cfg, arrays, lines, stages, TILE)
    scratch_types["history"] = plgpu.SMEM((PAIRS, n_state, BLOCK), f32)  # state entering each pair
    # Per-warp sums of each token's products, one buffer per half tile, so that one barrier
    # per half orders both their writes and their reads.
    warp_rows = 1 if cfg.interpret else _WARPS
    scratch_types["warp_sums"] = plgpu.SMEM((2, warp_rows, HALF * width), f32)
    sums_line = plgpu.Layout.WG_STRIDED((HALF * width,), vec_size=1)

    def body(*refs, **scratch):
        ins = dict(zip(in_names, refs))
        outs = dict(zip(out_names, refs[len(in_names):]))
        history, warp_sums = scratch["history"], scratch["warp_sums"]
        e_block, b = lax.axis_index("e"), lax.axis_index("b")
        cols = pl.ds(e_block * BLOCK, BLOCK)
        for step in range(min(stages, tiles)):
            _fetch(cfg, ins, scratch, lines, b, cols, tiles - 1 - step, step, TILE)
        bias = _line(ins["bias"].at[cols])
        dskip = _line(ins["dskip"].at[cols])
        a2 = [_line(ins["a2t"].at[j, cols]) for j in range(n_state)]
        zero = 0.0 * bias
        g0 = tuple(_line(ins["dfinal"].at[b, j, cols]) for j in range(n_state))
        sums0 = (tuple(zero for _ in range(n_state)), zero, zero)  # dA, dD, d(bias)

        def one_tile(step, carry):
            tile = tiles - 1 - step
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(scratch["bars"].at[slot])
            bc = scratch["bc"].at[slot]

            def forward_tile(h):
                """Walk the tile's TILE tokens from h, the state entering the tile, writing the
                state entering every PAIR-th token to the history."""

                def one_pair(i, h):
                    for j in range(n_state):
                        history[i, j, :] = h[j]
                    for t in (i * PAIR, i * PAIR + 1):
                        tok = _Token(cfg, scratch, slot, t, bias)
                        h = tuple(jnp.exp2(tok.decay_delta * a2[j]) * h[j] + tok.du * bc[t, j] for j in range(n_state))
                    return h

                lax.fori_loop(0, PAIRS, one_pair, h)

            def backward_token(t, tok, h_prev, decays, first, parity, carry):
                """The adjoint back through token t of the tile, from h_prev, the state entering
                it (and its decays, when the caller has them); its d[B | C] warp sums go to
                row t - first of buffer `parity`. Returns the carry and the state after t."""
                g, (dA, dD, dbias) = carry
                g, dA = list(g), list(dA)
                dout = _line(scratch["dy"].at[slot, t]).astype(f32)
                if cfg.has_z:
                    z = _line(scratch["z"].at[slot, t]).astype(f32)
                    z_sig = jax.nn.sigmoid(z)
                    dy = dout * (z * z_sig)
                else:
                    dy = dout
                y = dskip * tok.u
                d_du = zero  # d(loss) / d(delta * u)
                d_decay_delta = zero  # d(loss) / d(delta) through the decays, over ln 2
                d_b, d_c = [], []
                for j in range(n_state):
                    b_j, c_j = bc[t, j], bc[t, n_state + j]
                    decay = decays[j] if decays is not None else jnp.exp2(tok.decay_delta * a2[j])
                    h_j = decay * h_prev[j] + tok.du * b_j
                    y = y + h_j * c_j
                    g_h = dy * c_j + g[j]  # d(loss) / d(h_t)
                    d_c.append(dy * h_j)
                    d_b.append(g_h * tok.du)
                    d_du = d_du + g_h * b_j
                    g[j] = g_h * decay  # d(loss) / d(h_{t-1})
                    d_log_decay = g[j] * h_prev[j]  # d(loss) / d(decay), times the decay
                    dA[j] = dA[j] + d_log_decay * tok.delta
                    d_decay_delta = d_decay_delta + d_log_decay * a2[j]
                row = warp_sums.at[parity, :, pl.ds((t - first) * width, width)]
                if cfg.interpret:  # the interpreter runs no warp shuffles: sum the whole block
                    for k, p in enumerate(d_b + d_c):
                        row[0, k] = jnp.sum(p)
                else:
                    _lane_sums_store(row, d_b + d_c)
                tok_index = tile * TILE + t
                if cfg.has_z:
                    dz = dout * y * (z_sig * (1.0 + z * (1.0 - z_sig)))
                    outs["dz"][b, tok_index, cols] = dz.astype(outs["dz"].dtype)
                d_delta = d_decay_delta * _LN2 + d_du * tok.u
                if cfg.softplus:
                    d_delta = d_delta * jax.nn.sigmoid(tok.x)
                outs["ddelta"][b, tok_index, cols] = d_delta.astype(outs["ddelta"].dtype)
                outs["du"][b, tok_index, cols] = (dy * dskip + d_du * tok.delta).astype(outs["du"].dtype)
                return tuple(g), (tuple(dA), dD + dy * tok.u, dbias + d_delta)

            def backward_half(first, parity, carry):
                """The adjoint back through tokens first + HALF - 1 .. first, a pair at a time:
                the pair's entering state comes from the history, the state between its two
                tokens and the first token's decays are computed once and kept in registers."""

                def one_pair(i, carry):
                    pair = (first + HALF) // PAIR - 1 - i
                    t = pair * PAIR
                    h_first = [_line(history.at[pair, j]) for j in range(n_state)]
                    tok_first = _Token(cfg, scratch, slot, t, bias)
                    decays = [jnp.exp2(tok_first.decay_delta * a2[j]) for j in range(n_state)]
                    h_second = [decays[j] * h_first[j] + tok_first.du * bc[t, j] for j in range(n_state)]
                    carry = backward_token(t + 1, _Token(cfg, scratch, slot, t + 1, bias), h_second, None, first,
                                           parity, carry)
                    return backward_token(t, tok_first, h_first, decays, first, parity, carry)

                return lax.fori_loop(0, HALF // PAIR, one_pair, carry)

            def store_sums(first, parity):
                total = None
                for w in range(warp_rows):
                    part = _load(warp_sums.at[parity, w], sums_line)
                    total = part if total is None else total + part
                outs["dbc"][b, e_block, pl.ds((tile * TILE + first) * width, HALF * width)] = total

            # One walk through the tile from its saved state fills the history (a state per
            # PAIR tokens); the adjoint then runs back through the upper half and the lower
            # half, each half's d[B | C] warp sums in their own buffer, so that one barrier
            # per half orders both their writes and their reads.
            forward_tile(tuple(_line(ins["states"].at[b, tile, j, cols]) for j in range(n_state)))
            carry = backward_half(HALF, 0, carry)
            plgpu.commit_smem()  # every thread has written its warp's sums of the upper half
            store_sums(HALF, 0)
            carry = backward_half(0, 1, carry)
            # Every thread is done reading the slot and has written its lower half's sums
            # (and read the upper half's: the next tile writes that buffer again).
            plgpu.commit_smem()

            @pl.when(step + stages < tiles)
            def _():
                _fetch(cfg, ins, scratch, lines, b, cols, tile - stages, slot, TILE)

            store_sums(0, 1)
            return carry

        g, (dA, dD, dbias) = lax.fori_loop(0, tiles, one_tile, (g0, sums0))
        for j in range(n_state):
            outs["dA"][b, j, cols] = dA[j]
            outs["dh0"][b, j, cols] = g[j]
        outs["dD"][b, cols] = dD
        outs["dbias"][b, cols] = dbias

    call = _launch(cfg, "selective_scan_bwd", body, tuple(out_type), scratch_types)
    return dict(zip(out_names, call(*(arrays[name] for name in in_names))))


# ---------------------------------------------------------------------------------------------
# custom VJP over the padded kernel inputs
# ---------------------------------------------------------------------------------------------


def _kernel_arrays(cfg, delta, u, z, bc, pen, bias, dskip, a_t, h0t):
    arrays = {"delta": delta, "u": u, "bc": bc, "bias": bias, "dskip": dskip, "a2t": a_t * _LOG2E, "h0t": h0t}
    if cfg.has_z:
        arrays["z"] = z
    if cfg.has_resets:
        arrays["pen"] = pen
    return arrays


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, delta, u, z, bc, pen, bias, dskip, a_t, h0t):
    y, final = _forward_call(cfg, False, _kernel_arrays(cfg, delta, u, z, bc, pen, bias, dskip, a_t, h0t))
    return y, final


def _scan_fwd(cfg, delta, u, z, bc, pen, bias, dskip, a_t, h0t):
    arrays = _kernel_arrays(cfg, delta, u, z, bc, pen, bias, dskip, a_t, h0t)
    y, final, states = _forward_call(cfg, True, arrays)
    # Named so that remat="scan" keeps them and the backward pass skips the forward kernel.
    output_name, states_name = SCAN_RESIDUAL_NAMES
    y = checkpoint_name(y, output_name)
    states = checkpoint_name(states, states_name)
    return (y, final), (arrays, states)


def _scan_bwd(cfg, residuals, cotangents):
    arrays, states = residuals
    dy, dfinal = cotangents
    arrays = dict(arrays, states=states, dfinal=dfinal.astype(f32), dy=dy.astype(arrays["u"].dtype))
    del arrays["h0t"]
    grads = _backward_call(cfg, arrays)
    n = cfg.d_state
    dbc = grads["dbc"].sum(axis=1).reshape(cfg.batch, cfg.length, 2 * n)
    return (grads["ddelta"], grads["du"], grads.get("dz"), dbc, None, grads["dbias"].sum(0), grads["dD"].sum(0),
            grads["dA"].sum(0), grads["dh0"])


_scan.defvjp(_scan_fwd, _scan_bwd)


# ---------------------------------------------------------------------------------------------
# the impl
# ---------------------------------------------------------------------------------------------


_MIN_SEGMENT = 512  # tokens: shorter segments would spend more on the passes than they gain
_DEFAULT_SMS = 132  # an H100 SXM or H200, when the device does not say


def segment_count(batch: int, length: int, channels: int, multiprocessors: Optional[int] = None) -> int:
    """How many segments each row is cut into (1: none). A thread block walks its row's whole
    sequence, so batch x channel blocks below the GPU's multiprocessor count leave some idle
    (B=1, E=1536: 12 blocks of 132). Cut into S segments, the scan runs twice, each time
    over L / S tokens in S times as many blocks: the most segments that still fit one wave
    (B=1, E=1536: 11, 132 blocks), and only from S = 4 on, where the two passes gain 2x."""
    if multiprocessors is None:
        multiprocessors = getattr(jax.devices()[0], "core_count", None) or _DEFAULT_SMS
    blocks = batch * -(-channels // BLOCK)
    segments = min(multiprocessors // blocks, length // _MIN_SEGMENT)
    return segments if segments >= 4 else 1


def mosaic_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, mask=None, *, resets=None,
                          approx_math: bool = MosaicOptions.approx_math, _interpret: bool = False,
                          _segments: Optional[int] = None):
    """`selective_scan`'s full contract (bias, softplus, D skip, gate, mask, resets) in the
    Mosaic GPU kernels. Returns y in u's dtype and the fp32 final state (B, E, N).
    `_interpret` runs the kernels in Pallas' GPU interpreter (tests on a CPU); `_segments`
    overrides `segment_count`."""
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    reason = unsupported_reason(d_state) or (None if _interpret else device_reason())
    if reason:
        raise ValueError(reason)
    segments = segment_count(batch, length, channels) if _segments is None else _segments
    if segments > 1:
        return _segmented_scan(segments, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, mask,
                               resets, approx_math=approx_math, interpret=_interpret)
    n_pad = _padded_d_state(d_state)
    tiles = -(-length // TILE)
    e_pad = -(-channels // BLOCK) * BLOCK
    l_extra, e_extra, n_extra = tiles * TILE - length, e_pad - channels, n_pad - d_state

    neutral_needed = mask is not None or l_extra > 0
    if neutral_needed and delta_bias is not None and not delta_softplus:
        # Masked and padded tokens need a delta of exactly 0; with no softplus no raw value
        # gives that after each channel's bias, so the bias is added here.
        delta, delta_bias = delta.astype(f32) + delta_bias.astype(f32), None
    neutral = _MASKED_RAW_DELTA if delta_softplus else 0.0
    if mask is not None:
        keep = mask[..., None].astype(bool)
        u = jnp.where(keep, u, jnp.zeros((), u.dtype))
        delta = jnp.where(keep, delta, jnp.asarray(neutral, delta.dtype))

    def pad(x, value=0.0, length_axis=1, last=0):
        widths = [(0, 0)] * x.ndim
        if length_axis is not None:
            widths[length_axis] = (0, l_extra)
        widths[-1] = (0, last)
        return jnp.pad(x, widths, constant_values=value) if any(w != (0, 0) for w in widths) else x

    delta_p = pad(delta, neutral, last=e_extra)
    u_p = pad(u, last=e_extra)
    z_p = None if z is None else pad(z, last=e_extra)
    bc = jnp.concatenate([pad(B.astype(f32), last=n_extra), pad(C.astype(f32), last=n_extra)], axis=-1)
    pen = None
    if resets is not None:
        pen = jnp.pad(jnp.where(resets.astype(bool), _RESET_PENALTY, 0.0).astype(f32), [(0, 0), (0, l_extra)])
    per_channel = lambda x: jnp.zeros((e_pad,), f32) if x is None else pad(x.astype(f32), length_axis=None,
                                                                            last=e_extra)
    a_t = jnp.pad(A.astype(f32).T, [(0, n_extra), (0, e_extra)])
    if initial_state is None:
        h0t = jnp.zeros((batch, n_pad, e_pad), f32)
    else:
        h0t = jnp.pad(jnp.swapaxes(initial_state.astype(f32), 1, 2), [(0, 0), (0, n_extra), (0, e_extra)])
    cfg = _Config(batch=batch, tiles=tiles, channels=e_pad, d_state=n_pad, softplus=bool(delta_softplus),
                  has_z=z is not None, has_resets=resets is not None, approx_math=bool(approx_math),
                  interpret=bool(_interpret))
    y, final = _scan(cfg, delta_p, u_p, z_p, bc, pen, per_channel(delta_bias), per_channel(D), a_t, h0t)
    return y[:, :length, :channels], jnp.swapaxes(final[:, :d_state, :channels], 1, 2)


def _segmented_scan(segments, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, mask, resets, *,
                    approx_math, interpret):
    """The scan with each row cut into `segments` rows of L / S tokens. Pass 1 runs every
    segment from a zero state; the state entering segment s is then, in XLA,
    h_s = P_{s-1} h_{s-1} + end_{s-1}, with P the product of the segment's decays,
    exp(A * sum of its deltas) (0 once a document starts in it). Pass 2 runs every segment
    from its entering state and gives y. Gradients flow through both passes' kernels."""
    batch, length, channels = u.shape
    seg_len = -(-length // (segments * TILE)) * TILE
    extra = segments * seg_len - length
    if extra:  # trailing tokens the kernels see as masked: no change to the state
        keep = jnp.ones((batch, length), bool) if mask is None else mask.astype(bool)
        mask = jnp.pad(keep, [(0, 0), (0, extra)])
        grow = lambda x: None if x is None else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
        u, delta, z, B, C, resets = grow(u), grow(delta), grow(z), grow(B), grow(C), grow(resets)
    rows = lambda x: None if x is None else x.reshape((batch * segments, seg_len) + x.shape[2:])
    inner = functools.partial(mosaic_selective_scan, A=A, B=rows(B), C=rows(C), D=D, z=rows(z),
                              delta_bias=delta_bias, delta_softplus=delta_softplus, mask=rows(mask),
                              resets=rows(resets), approx_math=approx_math, _interpret=interpret, _segments=1)
    _, ends = inner(rows(u), rows(delta))
    ends = ends.reshape(batch, segments, channels, -1)

    # The product of each segment's decays, exp(A * sum of deltas), as the kernels take them.
    step = delta.astype(f32) + (0.0 if delta_bias is None else delta_bias.astype(f32))
    step = jax.nn.softplus(step) if delta_softplus else step
    if mask is not None:
        step = jnp.where(mask.astype(bool)[..., None], step, 0.0)
    totals = step.reshape(batch, segments, seg_len, channels).sum(axis=2)
    products = jnp.exp(totals[..., None] * A.astype(f32))  # (B, S, E, N)
    if resets is not None:
        starts_document = resets.astype(bool).reshape(batch, segments, seg_len).any(axis=2)
        products = jnp.where(starts_document[..., None, None], 0.0, products)

    entering = [jnp.zeros_like(ends[:, 0]) if initial_state is None else initial_state.astype(f32)]
    for s in range(1, segments):
        entering.append(products[:, s - 1] * entering[-1] + ends[:, s - 1])
    entering = jnp.stack(entering, axis=1).reshape(batch * segments, channels, -1)
    y, finals = inner(rows(u), rows(delta), initial_state=entering)
    y = y.reshape(batch, segments * seg_len, channels)[:, :length]
    return y, finals.reshape(batch, segments, channels, -1)[:, -1]
