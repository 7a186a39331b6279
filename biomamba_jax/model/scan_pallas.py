"""Fused selective scan as Pallas kernels (Triton lowering on GPU, interpreter elsewhere).

Forward kernel: one program per (batch row, block of `block_e` channels, segment of the
sequence). The fp32 state (block_e, N) stays in registers; a `fori_loop` walks over chunks
of `chunk` steps and a Python loop unrolls the steps of one chunk. Each loop iteration
first issues the loads of the *next* chunk and then computes the current one, so global
memory latency overlaps with arithmetic instead of stalling every chunk. The kernel
writes y, the state at the end of its segment and, when a gradient is needed, the state
at the start of every chunk (B, L / chunk, E, N).

Fusion (`fuse`, see `PallasOptions`): with fuse=delta the kernels take the raw delta in
the compute dtype (bf16 in training) and apply the dt bias and softplus in registers, so no
fp32 (B, L, E) delta goes through HBM; XLA applies the D skip and SiLU gate to y. With
fuse=true the kernels also take z and do the skip and gate, writing y in the compute
dtype. The backward kernel then writes du and d(raw delta) in their dtypes and per-row
partial sums of dD and the dt bias gradient; the gate's chain rule stays with XLA, from the
pre-gate output the forward saves. The default, "auto", is fuse=delta where the sequence is
split into segments and fuse=false otherwise, the faster of the two at each shape measured
(benchmarks/HISTORY.md): a full grid's fused backward holds more per step and is the slower.

Backward kernel (`jax.custom_vjp`): the same grid, walking chunks in reverse. It reloads
a chunk's saved start state, recomputes the chunk's states and decays in registers, then
runs the adjoint recurrence g_{t-1} = exp(delta_t A) g_t backwards, emitting du, ddelta
and per-channel-block partial sums of dB, dC (reduced over the blocks afterwards) and dA.

Segments: a grid of B * E / block_e programs is too small to fill a GPU at batch 1 (96
programs for Mamba-130m against 132 SMs on an H100), and each program then walks the whole
sequence alone. When the grid is too small (see `_Table`), the sequence is split into
S segments run in parallel. Forward: pass 1 computes each segment's end state from a zero
start as a sum over its steps (`_segment_end_kernel`: no step depends on the one before,
so it runs in tiles of many steps); an associative scan over segments in XLA composes those
with the segments' total decay exp(A * sum(delta)) into each segment's true start state;
pass 2 reruns the segments from those states and writes y. The backward does the same
with the adjoint (`_segment_start_adjoint_kernel`, then the full backward kernel per
segment). The forward saves the state at every chunk start, so the backward may split the
sequence into a different number of segments, or none.

Shapes the Triton lowering cannot take (channels not a multiple of the block, N not a
power of two, L not a multiple of segments x chunk) are padded: zero u and zero delta (or
-inf raw delta before the softplus) leave the state unchanged, and B = C = 0 on padded
states keep them at zero.

Document resets (`resets`, (B, L), 1 at a document's first step): the kernels then take
them as one more fp32 input, read one value per step, and multiply that step's decay by
1 - reset, which drops the state entering it; the backward, whose adjoint and delta and
A gradients all go through the same decay, needs nothing else. In the segment sums a
term counts only if no reset lies between it and the segment's edge (a running count of
resets beside the running delta sum), and a segment with a reset in it has decay 0 in
the composition. Without resets none of this is in the kernels.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax.ad_checkpoint import checkpoint_name

from biomamba_jax.model.scan_math import SCAN_RESIDUAL_NAMES, finish_output, prepare_delta, start_state
from biomamba_jax.model.scan_options import PallasOptions

__all__ = ["pallas_scan", "pallas_selective_scan", "PallasOptions"]

f32 = jnp.float32


class _Table(NamedTuple):
    """The tuning the kernels run at; `_tiling` picks from it by shape. Each entry was
    chosen by measurement on one H100 (benchmarks/HISTORY.md, "Tiling"); other GPUs may
    want other values."""

    chunk: int = 8  # steps unrolled per loop iteration; the state is saved at chunk starts
    num_warps: int = 2
    # Channels per program of the forward: (grid full without segments, segmented). Where
    # the sequence is split, the segments give the grid its programs, and wider blocks
    # were the faster there; a grid full on its own was faster with narrower ones.
    block_e: tuple = (16, 32)
    # The backward holds more per step (recomputed states, decays, adjoint) and runs out of
    # registers first, so it takes fewer channels per program, on one warp: (not
    # segmented, segmented), more where segments already give the grid its programs.
    bwd_block_e: tuple = (4, 8)
    bwd_num_warps: int = 1
    # Pass 1 of a segmented scan (each segment's own end state, and in the backward its
    # start adjoint, from zero) is a sum over the segment's steps,
    # h_end = sum_t exp(A * delta summed over the steps after t) * delta_t u_t B_t, taken in
    # tiles of steps with no step-to-step dependency, faster than running the recurrence
    # step by step. A tile covers `sum_elements` (step, channel) pairs: its steps halve as
    # the channels per program double, so its (steps, channels, N) terms keep their size.
    sum_elements: int = 512
    sum_num_warps: int = 4
    # A forward grid of fewer programs than `min_programs` splits the sequence into
    # segments, doubling them until the grid has `target_programs` and no segment is longer
    # than `max_segment_length` steps (one program walking a long segment alone is the
    # critical path), keeping segments of at least `min_segment_length` steps: each segment
    # adds a second pass over its steps and a step of the composition, which a grid that
    # is nearly full, or a short segment, does not win back.
    min_programs: int = 384
    target_programs: int = 768
    max_segment_length: int = 1024
    min_segment_length: int = 512


_TABLE = _Table()


class _Tiling(NamedTuple):
    """The tiling of one call, resolved by `_tiling` (hashable: a static argument)."""

    chunk: int
    block_e: int  # forward channels per program
    num_warps: int
    bwd_block_e: int
    bwd_num_warps: int
    segments: int  # what the forward splits the sequence into (a power of two)
    bwd_segments: int  # ... and the backward, independently
    sum_tile: int  # most steps per tile of the segment sum kernels (a power of two)
    sum_num_warps: int
    fuse: Union[bool, str]  # options.fuse with "auto" resolved


# What `_tiling_overrides` may set: an outcome of `_tiling`, or an entry of the segment rule.
# Tests use them to reach segmented paths and small tilings at the interpreter's shapes; no
# impl string reaches them.
_RULE_OVERRIDES = ("min_programs", "target_programs", "max_segment_length", "min_segment_length")
_TILING_OVERRIDES = tuple(f for f in _Tiling._fields if f != "fuse") + _RULE_OVERRIDES
_POWERS_OF_TWO = ("block_e", "bwd_block_e", "segments", "bwd_segments", "sum_tile")


class _Fusion(NamedTuple):
    """Which of selective_scan's pre- and post-processing the kernels do (static)."""

    bias: bool = False  # delta += delta_bias
    softplus: bool = False  # delta = softplus(delta)
    skip: bool = False  # y += D * u
    gate: bool = False  # y *= silu(z)


class _Plan(NamedTuple):
    """Static sizes of one call, after padding."""

    chunk: int
    chunks: int  # padded length / chunk
    segments: int  # what the kernels of this plan split the sequence into
    bwd_segments: int  # ... and what the backward's kernels split it into
    fusion: _Fusion  # forward kernel
    approx_math: bool = False  # kernels use the GPU's approximate ex2 and lg2 (see `_exp`)
    interpret: bool = True  # run the kernels in Pallas' interpreter
    resets: bool = False  # the kernels take document resets (B, L)

    @property
    def chunks_per_segment(self) -> int:
        return self.chunks // self.segments

    @property
    def bwd_fusion(self) -> _Fusion:
        """The backward kernel fuses all the forward does but the gate, whose chain rule
        XLA applies from the forward's saved pre-gate output: the gate in the kernel too
        adds to the backward's register pressure, and measured slower."""
        return self.fusion._replace(gate=False)

    @property
    def saves_pre_gate(self) -> bool:
        """The forward saves y before the gate, for the backward's gate in XLA."""
        return self.fusion.gate

    def backward(self) -> "_Plan":
        """The plan the backward's kernels run under: its own segments."""
        return self._replace(segments=self.bwd_segments)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_LOG2_E = math.log2(math.e)


def _approx(instruction, x):
    """PTX `<instruction>.approx.ftz.f32` (ex2, lg2) on each element of an fp32 kernel
    value: one MUFU op each. GPU kernels only; the interpreter cannot run inline asm."""
    from jax.experimental.pallas import triton as plgpu

    (result,) = plgpu.elementwise_inline_asm(
        f"{instruction}.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, x.dtype)])
    return result


def _sigmoid(x, approx_math=False):
    e = _approx("ex2", x * -_LOG2_E) if approx_math else jnp.exp(-x)
    return 1.0 / (1.0 + e)


def _exp_rate(A, plan):
    """A in the unit `_exp` takes: an exponent delta * _exp_rate(A) gives exp(delta * A)."""
    return A * _LOG2_E if plan.approx_math else A


def _exp(x, plan):
    """exp of an exponent built with `_exp_rate`. On the GPU this is one PTX ex2.approx
    (the MUFU unit, as mamba_ssm's exp2f under --use_fast_math, relative error ~2^-22),
    with log2(e) folded into A once per program: Pallas lowers jnp.exp to libdevice's
    __nv_expf, several more instructions per element of the kernels' hottest line. The
    interpreter (CPU tests) keeps jnp.exp."""
    return _approx("ex2", x) if plan.approx_math else jnp.exp(x)


def _delta(raw, bias, fusion, approx_math=False):
    """The delta the recurrence uses, from the raw kernel input (fp32, in registers)."""
    x = raw + bias if fusion.bias else raw
    if fusion.softplus:  # mamba_ssm's threshold: softplus(x) = x above 20
        if approx_math:  # log(1 + e^x) as ln2 * lg2(1 + 2^(x log2 e)): libdevice's log1pf is long
            x = jnp.where(x > 20.0, x, _approx("lg2", 1.0 + _approx("ex2", x * _LOG2_E)) / _LOG2_E)
        else:
            x = jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(x)))
    return x


def _softplus_grad(raw, bias, fusion, approx_math=False):
    x = raw + bias if fusion.bias else raw
    return jnp.where(x > 20.0, 1.0, _sigmoid(x, approx_math))


class _Refs:
    """Pops a kernel's refs in the order the wrapper passed them; absent ones are None."""

    def __init__(self, refs):
        self._it = iter(refs)

    def take(self, present=True):
        return next(self._it) if present else None


class _Program(NamedTuple):
    """Where one kernel program works: batch row, channel block, segment, chunk range."""

    b: jax.Array
    block: jax.Array
    segment: jax.Array
    channels: pl.Slice  # this program's channels
    first: jax.Array  # first and last chunk of its segment
    last: jax.Array


def _program(plan, block_e) -> _Program:
    b, block, segment = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = segment * plan.chunks_per_segment
    return _Program(b, block, segment, pl.ds(block * block_e, block_e), first, first + plan.chunks_per_segment - 1)


def _load_rows(refs, b, t0, channels, chunk, fusion, with_dy):
    """Per-step inputs of one chunk as fp32 vectors (the reset a scalar): a tuple of
    tuples, one per step."""
    u_ref, delta_ref, B_ref, C_ref, z_ref, dy_ref, resets_ref = refs
    rows = []
    for i in range(chunk):
        t = t0 + i
        row = (
            u_ref[b, t, channels].astype(f32),
            delta_ref[b, t, channels].astype(f32),
            B_ref[b, t, :].astype(f32),
            C_ref[b, t, :].astype(f32),
            z_ref[b, t, channels].astype(f32) if fusion.gate else None,
            dy_ref[b, t, channels].astype(f32) if with_dy else None,
            resets_ref[b, t] if resets_ref is not None else None,
        )
        rows.append(row)
    return tuple(rows)


def _step_decay(delta, rate, reset, plan):
    """exp(delta A) of one step, (E_blk, N); 0 where the step starts a new document."""
    decay = _exp(delta[:, None] * rate, plan)
    return decay if reset is None else decay * (1.0 - reset)


# ---------------------------------------------------------------------------- forward
def _forward_kernel(*refs, plan, block_e, save_states):
    fusion, chunk = plan.fusion, plan.chunk
    save_pre_gate = save_states and plan.saves_pre_gate
    r = _Refs(refs)
    u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref = (r.take() for _ in range(6))
    bias_ref, D_ref, z_ref = r.take(fusion.bias), r.take(fusion.skip), r.take(fusion.gate)
    resets_ref = r.take(plan.resets)
    y_ref, h_end_ref, states_ref = r.take(), r.take(), r.take(save_states)
    pre_gate_ref = r.take(save_pre_gate)

    b, _, segment, channels, first, last = _program(plan, block_e)
    rate = _exp_rate(A_ref[channels, :], plan)  # (E_blk, N)
    bias = bias_ref[channels] if fusion.bias else None
    D = D_ref[channels] if fusion.skip else None
    data = (u_ref, delta_ref, B_ref, C_ref, z_ref, None, resets_ref)
    load = lambda c: _load_rows(data, b, c * chunk, channels, chunk, fusion, with_dy=False)

    def one_chunk(k, carry):
        h, rows = carry
        c = first + k
        upcoming = load(jnp.minimum(c + 1, last))  # issued now, used next iteration
        if save_states:
            states_ref[b, c, channels, :] = h
        for i, (u, raw, Bt, Ct, z, _, reset) in enumerate(rows):
            delta = _delta(raw, bias, fusion, plan.approx_math)
            h = _step_decay(delta, rate, reset, plan) * h + (delta * u)[:, None] * Bt[None, :]
            y = jnp.sum(h * Ct[None, :], axis=1)
            if fusion.skip:
                y = y + D * u
            if save_pre_gate:
                pre_gate_ref[b, c * chunk + i, channels] = y
            if fusion.gate:
                y = y * z * _sigmoid(z, plan.approx_math)
            y_ref[b, c * chunk + i, channels] = y.astype(y_ref.dtype)
        return h, upcoming

    h0 = h0_ref[b, segment, channels, :]
    h, _ = jax.lax.fori_loop(0, plan.chunks_per_segment, one_chunk, (h0, load(first)))
    h_end_ref[b, segment, channels, :] = h


# --------------------------------------------------------------------------- backward
def _backward_kernel(*refs, plan, block_e):
    fusion, chunk = plan.bwd_fusion, plan.chunk
    r = _Refs(refs)
    u_ref, delta_ref, A_ref, B_ref, C_ref, states_ref, dy_ref, g_end_ref = (r.take() for _ in range(8))
    bias_ref, D_ref = r.take(fusion.bias), r.take(fusion.skip)
    resets_ref = r.take(plan.resets)
    du_ref, ddelta_ref, dA_ref, dB_ref, dC_ref, dh_start_ref = (r.take() for _ in range(6))
    dD_ref, dbias_ref = r.take(fusion.skip), r.take(fusion.bias)

    b, block, segment, channels, first, last = _program(plan, block_e)
    A = A_ref[channels, :]
    rate = _exp_rate(A, plan)
    bias = bias_ref[channels] if fusion.bias else None
    D = D_ref[channels] if fusion.skip else None
    data = (u_ref, delta_ref, B_ref, C_ref, None, dy_ref, resets_ref)

    def load(c):
        rows = _load_rows(data, b, c * chunk, channels, chunk, fusion, with_dy=True)
        return states_ref[b, c, channels, :], rows

    def one_chunk(k, carry):
        g, dA, dD, dbias, (h_start, rows) = carry  # g: adjoint of the state after the chunk
        c = last - k
        # Issued now, used next iteration. This holds a second chunk of rows in registers,
        # the backward's scarcest resource, yet loading the B and C rows or everything in
        # place was measured slower (benchmarks/HISTORY.md).
        upcoming = load(jnp.maximum(c - 1, first))
        # Recompute the chunk: states[i] is the state before step i, decays[i] its decay
        # (0 at a reset, which also zeroes the delta and A gradients through it, and the
        # adjoint carried past it).
        deltas = [_delta(row[1], bias, fusion, plan.approx_math) for row in rows]
        decays = [_step_decay(d, rate, row[6], plan) for d, row in zip(deltas, rows)]
        states = [h_start]
        for (u, _, Bt, *_), delta, decay in zip(rows, deltas, decays):
            states.append(decay * states[-1] + (delta * u)[:, None] * Bt[None, :])
        for i in reversed(range(chunk)):
            t = c * chunk + i
            u, raw, Bt, Ct, _, dy, _ = rows[i]
            delta, decay = deltas[i], decays[i]
            g = g + dy[:, None] * Ct[None, :]
            dC_ref[b, block, t, :] = jnp.sum(dy[:, None] * states[i + 1], axis=0).astype(dC_ref.dtype)
            dB_ref[b, block, t, :] = jnp.sum(g * (delta * u)[:, None], axis=0).astype(dB_ref.dtype)
            g_drive = jnp.sum(g * Bt[None, :], axis=1)  # d loss / d (delta u)
            g_log_decay = g * states[i] * decay  # d loss / d (delta A), elementwise
            ddelta = jnp.sum(g_log_decay * A, axis=1) + u * g_drive
            du = delta * g_drive
            if fusion.skip:
                du = du + dy * D
                dD = dD + dy * u
            if fusion.softplus:
                ddelta = ddelta * _softplus_grad(raw, bias, fusion, plan.approx_math)
            if fusion.bias:
                dbias = dbias + ddelta
            ddelta_ref[b, t, channels] = ddelta.astype(ddelta_ref.dtype)
            du_ref[b, t, channels] = du.astype(du_ref.dtype)
            dA = dA + g_log_decay * delta[:, None]
            g = decay * g
        return g, dA, dD, dbias, upcoming

    g_end = g_end_ref[b, segment, channels, :]
    zeros_e = jnp.zeros((block_e,), f32)
    init = (g_end, jnp.zeros_like(g_end), zeros_e, zeros_e, load(last))
    g, dA, dD, dbias, _ = jax.lax.fori_loop(0, plan.chunks_per_segment, one_chunk, init)
    dh_start_ref[b, segment, channels, :] = g
    dA_ref[b, segment, channels, :] = dA
    if fusion.skip:
        dD_ref[b, segment, channels] = dD
    if fusion.bias:
        dbias_ref[b, segment, channels] = dbias


def _sum_tile(plan, largest) -> int:
    """Steps per tile of the sum kernels: the largest power of two up to `largest` that
    divides a segment (Triton tensors have power-of-two sides)."""
    steps = plan.chunks_per_segment * plan.chunk
    tile = 1
    while tile * 2 <= largest and steps % (tile * 2) == 0:
        tile *= 2
    return tile


def _segment_end_kernel(*refs, plan, block_e, tile):
    """Pass 1 of a segmented forward as a sum: the state a segment reaches from zero,
    h_end = sum_t exp(A * later_t) * (delta_t u_t) B_t, later_t = sum of delta over the
    segment's steps after t. Tiles run from the segment's end so later_t is a running sum
    plus a within-tile cumsum; exp(A * later_t) <= 1 (A < 0), so nothing overflows. It also
    writes the segment's delta total, which sets the segment's decay: summed here, where
    delta is in registers anyway, XLA need not read the fp32 (B, L, E) delta once more.
    With resets, a step's term counts only if no reset comes after it in the segment."""
    fusion = plan.fusion
    r = _Refs(refs)
    u_ref, delta_ref, A_ref, B_ref = (r.take() for _ in range(4))
    bias_ref = r.take(fusion.bias)
    resets_ref = r.take(plan.resets)
    h_end_ref, total_ref = r.take(), r.take()

    b, _, segment, channels, first, _ = _program(plan, block_e)
    rate = _exp_rate(A_ref[channels, :], plan)
    bias = bias_ref[channels] if fusion.bias else None
    tiles = plan.chunks_per_segment * plan.chunk // tile

    def one_tile(k, carry):
        h, after, *resets_after = carry  # after: delta summed over the segment's steps after this tile
        steps = pl.ds((first * plan.chunk) + (tiles - 1 - k) * tile, tile)
        delta = _delta(delta_ref[b, steps, channels].astype(f32), bias, fusion, plan.approx_math)  # (T, E_blk)
        drive = delta * u_ref[b, steps, channels].astype(f32)
        Bt = B_ref[b, steps, :].astype(f32)  # (T, N)
        total = jnp.sum(delta, axis=0)
        later = after[None, :] + (total[None, :] - jnp.cumsum(delta, axis=0))
        if plan.resets:  # resets after step t in the segment, as `later` counts delta
            resets = resets_ref[b, steps]  # (T,)
            resets_total = jnp.sum(resets)
            later_resets = resets_after[0] + (resets_total - jnp.cumsum(resets))
            drive = jnp.where(later_resets[:, None] > 0.0, 0.0, drive)
            resets_after = [resets_after[0] + resets_total]
        terms = _exp(later[:, :, None] * rate[None], plan) * drive[:, :, None] * Bt[:, None, :]
        return h + jnp.sum(terms, axis=0), after + total, *resets_after

    zeros = jnp.zeros(rate.shape, f32), jnp.zeros((block_e,), f32), *([jnp.zeros((), f32)] if plan.resets else [])
    h, total, *_ = jax.lax.fori_loop(0, tiles, one_tile, zeros)
    h_end_ref[b, segment, channels, :] = h
    total_ref[b, segment, channels] = total


def _segment_start_adjoint_kernel(*refs, plan, block_e, tile):
    """Pass 1 of a segmented backward as a sum: the adjoint a segment carries to its start
    from zero at its end, g_start = sum_t exp(A * upto_t) * dy_t C_t, upto_t = sum of
    delta over the segment's steps up to and including t (the recurrence
    g <- exp(delta A) (g + dy C), run from the segment's end, written out as a sum), and
    the segment's delta total, as `_segment_end_kernel`. With resets, a step's term counts
    only if no reset comes at or before it in the segment."""
    fusion = plan.bwd_fusion
    r = _Refs(refs)
    delta_ref, A_ref, C_ref, dy_ref = (r.take() for _ in range(4))
    bias_ref = r.take(fusion.bias)
    resets_ref = r.take(plan.resets)
    g_start_ref, total_ref = r.take(), r.take()

    b, _, segment, channels, first, _ = _program(plan, block_e)
    rate = _exp_rate(A_ref[channels, :], plan)
    bias = bias_ref[channels] if fusion.bias else None
    tiles = plan.chunks_per_segment * plan.chunk // tile

    def one_tile(k, carry):
        g, before, *resets_before = carry  # before: delta summed over the segment's steps before this tile
        steps = pl.ds(first * plan.chunk + k * tile, tile)
        delta = _delta(delta_ref[b, steps, channels].astype(f32), bias, fusion, plan.approx_math)
        dy = dy_ref[b, steps, channels].astype(f32)
        Ct = C_ref[b, steps, :].astype(f32)
        upto = before[None, :] + jnp.cumsum(delta, axis=0)
        if plan.resets:  # resets up to and including step t in the segment, as `upto` counts delta
            resets = resets_ref[b, steps]  # (T,)
            upto_resets = resets_before[0] + jnp.cumsum(resets)
            dy = jnp.where(upto_resets[:, None] > 0.0, 0.0, dy)
            resets_before = [resets_before[0] + jnp.sum(resets)]
        terms = _exp(upto[:, :, None] * rate[None], plan) * dy[:, :, None] * Ct[:, None, :]
        return g + jnp.sum(terms, axis=0), before + jnp.sum(delta, axis=0), *resets_before

    zeros = jnp.zeros(rate.shape, f32), jnp.zeros((block_e,), f32), *([jnp.zeros((), f32)] if plan.resets else [])
    g, total, *_ = jax.lax.fori_loop(0, tiles, one_tile, zeros)
    g_start_ref[b, segment, channels, :] = g
    total_ref[b, segment, channels] = total


# ---------------------------------------------------------------------------- drivers
def _interpret(options: PallasOptions) -> bool:
    return jax.default_backend() != "gpu" if options.interpret is None else options.interpret


def _call(kernel, out_shape, grid, plan, num_warps, args):
    interpret = plan.interpret
    if interpret:
        params = None
    else:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret, compiler_params=params,
        name=kernel.func.__name__.strip("_"),
    )(*args)


def _fused_args(fusion, bias, D, z):
    return [x for x, on in ((bias, fusion.bias), (D, fusion.skip), (z, fusion.gate)) if on]


def _segment_decays(totals, A, resets):
    """exp(A * sum of delta over each segment): (B, S, E, N), the decay a segment applies,
    from the (B, S, E) delta totals the pass-1 kernels write; 0 for a segment with a
    document reset in it (resets (B, L) or None)."""
    decays = jnp.exp(totals[..., None] * A)
    if resets is None:
        return decays
    batch, segments = totals.shape[:2]
    carried = jnp.all(resets.reshape(batch, segments, -1) == 0.0, axis=-1)  # (B, S)
    return jnp.where(carried[..., None, None], decays, 0.0)


def _segment_recurrence(decays, drives, initial, reverse=False):
    """Every x_s of x_s = decays_s * x_{s-1} + drives_s over the segment axis (1), from
    x_{-1} = initial (with `reverse`, from the right: x_s = decays_s * x_{s+1} + drives_s).

    An associative scan, log2(S) levels of a few fused ops, rather than a `lax.scan` of S
    dependent steps: those were three tiny kernels per segment and layer, whose launches
    added up to a visible share of a long prompt's prefill.
    """
    first = -1 if reverse else 0
    drives = drives.at[:, first].add(decays[:, first] * initial)
    combine = lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1])
    return jax.lax.associative_scan(combine, (decays, drives), reverse=reverse, axis=1)[1]


def _forward(tiling, plan, u, delta, A, B, C, h0, bias, D, z, resets, save_states):
    """y (in u's dtype), the final state and, if `save_states`, the chunk-start states."""
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    S = plan.segments
    grid = (batch, channels // tiling.block_e, S)
    fused = _fused_args(plan.fusion, bias, D, z)
    resets_arg = [resets] if plan.resets else []
    states_shape = jax.ShapeDtypeStruct((batch, length // plan.chunk, channels, d_state), f32)
    segment_state = jax.ShapeDtypeStruct((batch, S, channels, d_state), f32)
    segment_totals = jax.ShapeDtypeStruct((batch, S, channels), f32)
    # The forward's kernels read B and C in fp32, converted by XLA first (a few MB per
    # layer, unlike u): from bf16 rows every thread would unpack its share of each step's
    # B and C again, in the loop (benchmarks/kernel_sass.py counts it). Exact, so it
    # changes no bit of the result.
    B, C = B.astype(f32), C.astype(f32)

    if S == 1:
        starts = h0[:, None]
    else:
        kernel = functools.partial(_segment_end_kernel, plan=plan, block_e=tiling.block_e,
                                   tile=_sum_tile(plan, tiling.sum_tile))
        bias_arg = [bias] if plan.fusion.bias else []
        local_ends, totals = _call(kernel, [segment_state, segment_totals], grid, plan, tiling.sum_num_warps,
                                   (u, delta, A, B, *bias_arg, *resets_arg))
        decays = _segment_decays(totals, A, resets)
        # The true end of segment s is decay_s * (its true start) + its end from zero.
        true_ends = _segment_recurrence(decays[:, :-1], local_ends[:, :-1], h0)
        starts = jnp.concatenate([h0[:, None], true_ends], axis=1)
    kernel = functools.partial(_forward_kernel, plan=plan, block_e=tiling.block_e, save_states=save_states)
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), segment_state]
    out_shape += [states_shape] if save_states else []
    out_shape += [jax.ShapeDtypeStruct(u.shape, f32)] if save_states and plan.saves_pre_gate else []
    y, ends, *saved = _call(kernel, out_shape, grid, plan, tiling.num_warps,
                            (u, delta, A, B, C, starts, *fused, *resets_arg))
    return y, ends[:, -1], (tuple(saved) if save_states else None)


def _backward(tiling, plan, residuals, dy, dfinal):
    u, delta, A, B, C, bias, D, z, resets, (states, *pre_gate) = residuals
    plan = plan.backward()
    resets_arg = [resets] if plan.resets else []
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    S, fusion = plan.segments, plan.bwd_fusion
    block_e = tiling.bwd_block_e
    n_blocks = channels // block_e
    grid = (batch, n_blocks, S)
    segment_state = jax.ShapeDtypeStruct((batch, S, channels, d_state), f32)
    dz = None
    if plan.fusion.gate:  # the gate's chain rule, in XLA (see `_Plan.bwd_fusion`)
        z32, dy32 = z.astype(f32), dy.astype(f32)
        sig = _sigmoid(z32)
        dz = (dy32 * pre_gate[0] * sig * (1.0 + z32 * (1.0 - sig))).astype(z.dtype)
        dy = dy32 * z32 * sig  # cotangent of the pre-gate output

    if S == 1:
        g_ends = dfinal[:, None]
    else:
        extras = [bias] if fusion.bias else []
        kernel = functools.partial(_segment_start_adjoint_kernel, plan=plan, block_e=tiling.block_e,
                                   tile=_sum_tile(plan, tiling.sum_tile))
        segment_totals = jax.ShapeDtypeStruct((batch, S, channels), f32)
        local, totals = _call(kernel, [segment_state, segment_totals], (batch, channels // tiling.block_e, S), plan,
                              tiling.sum_num_warps, (delta, A, C, dy, *extras, *resets_arg))
        decays = _segment_decays(totals, A, resets)
        # The adjoint entering segment s from its right is decay_{s+1} * (the one entering
        # segment s+1) + segment s+1's start adjoint from zero; the last receives dfinal.
        g_ends = _segment_recurrence(decays[:, 1:], local[:, 1:], dfinal, reverse=True)
        g_ends = jnp.concatenate([g_ends, dfinal[:, None]], axis=1)

    # The per-channel-block partial sums of dB and dC are written in B's and C's own dtype
    # (bf16 in training, where dB and dC end in bf16 anyway) and summed over the blocks in
    # fp32: at a few channels per program they are many times the size of B and C.
    partials = lambda x: jax.ShapeDtypeStruct((batch, n_blocks, length, d_state), x.dtype)
    out_shape = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),  # du
        jax.ShapeDtypeStruct(delta.shape, delta.dtype),  # d(raw) delta
        segment_state,  # dA per row and segment
        partials(B),  # dB per channel block
        partials(C),  # dC per channel block
        segment_state,  # adjoint at each segment start
    ]
    per_channel = jax.ShapeDtypeStruct((batch, S, channels), f32)
    out_shape += [per_channel] if fusion.skip else []
    out_shape += [per_channel] if fusion.bias else []
    kernel = functools.partial(_backward_kernel, plan=plan, block_e=block_e)
    outs = _call(kernel, out_shape, grid, plan, tiling.bwd_num_warps,
                 (u, delta, A, B, C, states, dy, g_ends, *_fused_args(fusion, bias, D, z), *resets_arg))
    du, ddelta, dA, dB, dC, dh_start, *rest = outs
    dD = rest.pop(0).sum((0, 1)) if fusion.skip else None
    dbias = rest.pop(0).sum((0, 1)) if fusion.bias else None
    # Sum the per-block partials behind a barrier: fused into its consumer (the
    # concatenation of x_proj's output gradient), XLA ran the dB sum as a loop of strided
    # loads, far below the bandwidth its reduction kernel reached for dC.
    dB, dC = jax.lax.optimization_barrier((dB.sum(1, dtype=f32), dC.sum(1, dtype=f32)))
    # Resets are not differentiable: their cotangent is None (zero).
    return (du, ddelta, dA.sum((0, 1)), dB.astype(B.dtype), dC.astype(C.dtype), dh_start[:, 0], dbias, dD, dz,
            None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_padded(tiling, plan, u, delta, A, B, C, h0, bias, D, z, resets):
    y, final, _ = _forward(tiling, plan, u, delta, A, B, C, h0, bias, D, z, resets, save_states=False)
    return y, final


def _scan_padded_fwd(tiling, plan, u, delta, A, B, C, h0, bias, D, z, resets):
    y, final, saved = _forward(tiling, plan, u, delta, A, B, C, h0, bias, D, z, resets, save_states=True)
    # Named so that remat="scan" keeps them and the backward pass skips the forward kernel.
    output_name, states_name = SCAN_RESIDUAL_NAMES
    y = checkpoint_name(y, output_name)
    saved = tuple(checkpoint_name(x, states_name) for x in saved)
    return (y, final), (u, delta, A, B, C, bias, D, z, resets, saved)


def _scan_padded_bwd(tiling, plan, residuals, cotangents):
    return _backward(tiling, plan, residuals, *cotangents)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd)


def _segment_count(table: _Table, programs: int, length: int) -> int:
    """Segments for a grid of `programs` programs: none from `min_programs` up; below,
    double until the grid has `target_programs` and no segment is over
    `max_segment_length` steps, keeping segments of at least `min_segment_length`."""
    segments = 1
    if programs < table.min_programs:
        while length >= 2 * segments * table.min_segment_length and (
            programs * segments < table.target_programs or length > segments * table.max_segment_length
        ):
            segments *= 2
    return segments


def _checked_overrides(overrides: Optional[dict]) -> dict:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(_TILING_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown pallas tiling override(s) {unknown}; valid: {list(_TILING_OVERRIDES)}")
    for name, value in overrides.items():
        if type(value) is not int or value < 1 or (name in _POWERS_OF_TWO and value & (value - 1)):
            wanted = "a power of two (1, 2, 4, ...)" if name in _POWERS_OF_TWO else "a positive whole number"
            raise ValueError(f"pallas tiling override {name}={value!r}: give {wanted}")
    return overrides


def _tiling(batch: int, length: int, channels: int, options: PallasOptions,
            overrides: Optional[dict] = None) -> _Tiling:
    """The tiling of a (batch, length, channels) call, from `_TABLE` by shape: the channels
    per program, the forward's and the backward's segment counts, the sum kernels' tile,
    and fuse="auto" resolved. `overrides` (tests only) fix any outcome or segment rule."""
    fixed = _checked_overrides(overrides)
    table = _TABLE._replace(**{k: v for k, v in fixed.items() if k in _RULE_OVERRIDES})
    programs = lambda block_e: batch * -(-channels // block_e)
    full_block_e, segmented_block_e = table.block_e
    block_e = fixed.get("block_e") or (full_block_e if programs(full_block_e) >= table.min_programs
                                       else segmented_block_e)
    block_e = min(block_e, _next_pow2(channels))
    chunk = max(1, min(fixed.get("chunk", table.chunk), length))
    segments = fixed.get("segments") or _segment_count(table, programs(block_e), length)
    bwd_segments = fixed.get("bwd_segments") or segments
    bwd_block_e = fixed.get("bwd_block_e") or table.bwd_block_e[bwd_segments > 1]
    bwd_block_e = min(bwd_block_e, _next_pow2(channels))
    sum_tile = fixed.get("sum_tile") or max(1, table.sum_elements // block_e)
    # fuse="auto": the delta fused where the sequence is split into segments (see the module docstring).
    fuse = ("delta" if segments > 1 else False) if options.fuse == "auto" else options.fuse
    return _Tiling(
        chunk=chunk, block_e=block_e, num_warps=fixed.get("num_warps", table.num_warps),
        bwd_block_e=bwd_block_e, bwd_num_warps=fixed.get("bwd_num_warps", table.bwd_num_warps),
        segments=segments, bwd_segments=bwd_segments, sum_tile=sum_tile,
        sum_num_warps=fixed.get("sum_num_warps", table.sum_num_warps), fuse=fuse)


def _padded(tiling: _Tiling, length: int, channels: int) -> tuple[int, int]:
    """(length, channels) padded to whole chunks in every segment, forward and backward,
    and to whole channel blocks of both kernels."""
    widest = max(tiling.block_e, tiling.bwd_block_e)  # both powers of two
    steps = max(tiling.segments, tiling.bwd_segments) * tiling.chunk  # segment counts: powers of two
    return -(-length // steps) * steps, -(-channels // widest) * widest


def _run(u, delta, A, B, C, h0, bias, D, z, fusion, tiling, options, resets=None):
    """Pad to the kernels' tiling, run, and slice the padding off. `resets` (B, L) bool or None."""
    _, length, channels = u.shape
    d_state = A.shape[-1]
    padded_l, padded_e = _padded(tiling, length, channels)
    interpret = _interpret(options)
    plan = _Plan(tiling.chunk, padded_l // tiling.chunk, tiling.segments, tiling.bwd_segments, fusion,
                 approx_math=options.approx_math and not interpret, interpret=interpret, resets=resets is not None)
    padded_n = _next_pow2(d_state)
    de, dn, dl = padded_e - channels, padded_n - d_state, padded_l - length

    def pad(x, *widths, value=0.0):
        if x is None or not any(widths):
            return x
        return jnp.pad(x, [(0, w) for w in widths], constant_values=value)

    # Padded steps must leave the state alone: delta = 0 after the (fused) softplus.
    delta_pad = -jnp.inf if fusion.softplus else 0.0
    y, final = _scan_padded(
        tiling, plan,
        pad(u, 0, dl, de), pad(delta, 0, dl, de, value=delta_pad), pad(A, de, dn),
        pad(B, 0, dl, dn), pad(C, 0, dl, dn), pad(h0, 0, de, dn),
        pad(bias, de), pad(D, de), pad(z, 0, dl, de),
        None if resets is None else pad(resets.astype(f32), 0, dl),  # padded steps start no document
    )
    return y[:, :length, :channels], final[:, :channels, :d_state]


def pallas_scan(u, delta, A, B, C, initial_state, *, resets=None, fuse: Union[bool, str] = PallasOptions.fuse,
                approx_math: bool = PallasOptions.approx_math, interpret: Optional[bool] = PallasOptions.interpret,
                _tiling_overrides: Optional[dict] = None):
    """Selective scan through the Pallas kernels; same contract as `scan.reference_scan`
    (delta with softplus applied, y in fp32 without D and gate). u, B and C may also come
    in a narrower dtype: the kernels compute in fp32 and return their gradients in the
    inputs' dtypes. The keywords are `PallasOptions` (`fuse` has nothing to fuse here);
    `_tiling_overrides` is for tests (see `_TILING_OVERRIDES`)."""
    options = PallasOptions(fuse=fuse, approx_math=approx_math, interpret=interpret)
    tiling = _tiling(*u.shape, options, _tiling_overrides)
    h0 = start_state(initial_state, *u.shape[::2], A.shape[-1])
    return _run(u, delta, A, B, C, h0, None, None, None, _Fusion(), tiling, options, resets)


def pallas_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, mask=None, *, resets=None,
                          fuse: Union[bool, str] = PallasOptions.fuse,
                          approx_math: bool = PallasOptions.approx_math,
                          interpret: Optional[bool] = PallasOptions.interpret,
                          _tiling_overrides: Optional[dict] = None):
    """`selective_scan`'s full contract with bias, softplus, D and gate inside the kernels
    as `fuse` says (the keywords are `PallasOptions`; `_tiling_overrides` is for tests).

    u, delta, z stay in their dtype (bf16 in training) on the way in and y comes out in
    u's dtype, so no fp32 (B, L, E) copy of them is made. Masked positions get u = 0 and a
    delta of exactly 0, as in `selective_scan`.
    """
    options = PallasOptions(fuse=fuse, approx_math=approx_math, interpret=interpret)
    tiling = _tiling(*u.shape, options, _tiling_overrides)
    h0 = start_state(initial_state, *u.shape[::2], A.shape[-1])
    if not tiling.fuse:  # XLA does the work around the kernels
        delta32 = prepare_delta(delta, delta_bias, delta_softplus, mask)
        # u, B and C go in as they are (bf16 in training, where u is a bf16 activation, so
        # nothing is lost): the kernels read them as fp32 and return their gradients in
        # their own dtypes, which saves an fp32 (B, L, E) copy of u and of du per layer.
        u = u if mask is None else u * mask[..., None].astype(u.dtype)
        y, final = _run(u, delta32, A.astype(f32), B, C, h0, None, None, None, _Fusion(), tiling, options, resets)
        return finish_output(y, u.astype(f32), D, z, u.dtype), final
    if delta_bias is not None and not delta_softplus:
        # Masked and padded steps must see delta exactly 0. With a softplus they get a raw
        # delta of -inf; without one, no raw value gives 0 after each channel's bias in the
        # kernel, so the bias is added here, before masking and padding.
        delta, delta_bias = delta.astype(f32) + delta_bias.astype(f32), None
    delta_only = tiling.fuse == "delta"  # D and the gate are then applied by XLA, after the kernels
    fusion = _Fusion(bias=delta_bias is not None, softplus=bool(delta_softplus),
                     skip=D is not None and not delta_only, gate=z is not None and not delta_only)
    if mask is not None:
        keep = mask[..., None].astype(bool)
        u = jnp.where(keep, u, jnp.zeros((), u.dtype))
        off = -jnp.inf if delta_softplus else 0.0
        delta = jnp.where(keep, delta, jnp.asarray(off, delta.dtype))
    as_f32 = lambda x: None if x is None else x.astype(f32)
    kernel_D, kernel_z = (None, None) if delta_only else (as_f32(D), z)
    y, final = _run(u, delta, A.astype(f32), B, C, h0, as_f32(delta_bias), kernel_D, kernel_z, fusion, tiling,
                    options, resets)
    if delta_only:
        y = finish_output(y, u.astype(f32), D, z, u.dtype)
    return y, final
