"""Fused selective scan as Pallas kernels (Triton lowering on GPU, interpreter elsewhere).

Forward kernel: one program per (batch row, block of `block_e` channels, segment of the
sequence). The fp32 state (block_e, N) stays in registers; a `fori_loop` walks over chunks
of `chunk` steps and a Python loop unrolls the steps of one chunk. Each loop iteration
first issues the loads of the *next* chunk and then computes the current one, so global
memory latency overlaps with arithmetic instead of stalling every chunk. The kernel
writes y, the state at the end of its segment and, when a gradient is needed, the state
at the start of every chunk (B, L / chunk, E, N).

Fusion (`fuse`): with fuse=delta the kernels take the raw delta in the compute dtype
(bf16 in training) and apply the dt bias and softplus in registers, so no fp32 (B, L, E)
delta goes through HBM; XLA applies the D skip and SiLU gate to y. With fuse=true the
kernels also take z and do the skip and gate, writing y in the compute dtype. The
backward writes du, d(raw delta) and dz in their dtypes and per-row partial sums of dD and
the dt bias gradient (or leaves part of that to XLA, see `bwd_fuse`). The default, "auto",
is fuse=delta where the sequence is split into segments and fuse=false otherwise, the
faster of the two on one H100 at each shape measured (benchmarks/NOTES.md, section 12).

Backward kernel (`jax.custom_vjp`): the same grid, walking chunks in reverse. It reloads
a chunk's saved start state, recomputes the chunk's states and decays in registers, then
runs the adjoint recurrence g_{t-1} = exp(delta_t A) g_t backwards, emitting du, ddelta
and per-channel-block partial sums of dB, dC (reduced over the blocks afterwards) and dA.

Segments: a grid of B * E / block_e programs is too small to fill a GPU at batch 1 (96
programs for Mamba-130m against 132 SMs on an H100), and each program then walks the whole
sequence alone. When the grid is smaller than `min_programs`, the sequence is split into
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
"""

from __future__ import annotations

import functools
import math
import typing
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax.ad_checkpoint import checkpoint_name

from biomamba_jax.model.scan_math import SCAN_RESIDUAL_NAMES, finish_output, prepare_delta, start_state

__all__ = ["pallas_scan", "pallas_selective_scan", "PallasScanConfig"]

f32 = jnp.float32


class PallasScanConfig(NamedTuple):
    chunk: int = 8  # steps unrolled per loop iteration; state saved at chunk starts
    # Channels per program of the forward. None picks by measurement on one H100 with the
    # approximate exp (benchmarks/NOTES.md, section 11): 16 when the grid is full without
    # segments (training step at B=8, L=2k: 156,675 against 151,322 tok/s for 32), 32 when
    # the sequence is split into segments (prefill B=1 L=8k: 596,495 against 548,216;
    # training at B=1, L=16k: 147,080 against 144,954).
    block_e: Optional[int] = None
    num_warps: int = 2
    # The backward holds more per step (recomputed states, decays, adjoint) and runs out of
    # registers first, so it takes fewer channels per program, on one warp. None picks by
    # measurement on one H100 (benchmarks/NOTES.md, section 8): 4 channels when the
    # sequence is not split into segments (Mamba-130m training step at B=8, L=2048:
    # 148,462 against 141,287 tok/s for 8), 8 when it is (B=1, L=16k: 121,729 against
    # 118,642 for 4). bwd_num_warps None: as the forward.
    bwd_block_e: Optional[int] = None
    bwd_num_warps: Optional[int] = 1
    # dtype of the backward's per-channel-block partial sums of dB and dC, which XLA then
    # sums over the blocks in fp32: "input" is B's and C's own dtype (bf16 in training, where
    # dB and dC end in bf16 anyway), "float32" always fp32. At 4 channels per program the
    # fp32 partials are 2 x 403 MB per layer for B=8, L=2048, written and read once.
    bwd_partials: str = "input"
    # dtype in which the forward's kernels read B and C: "float32", converted by XLA first
    # (a few MB per layer, unlike u), or "input" (bf16 in training and prefill). With bf16
    # rows every thread unpacks its share of each step's B and C again: 12% of the forward
    # loop's SASS for sm_90 (823 -> 723 instructions per trip at B=1 L=8k,
    # benchmarks/kernel_sass.py). Measured on one H100 (NOTES section 12): prefill B=1
    # L=64k 746,488 against 734,992 tok/s, L=8k 614,600 against 603,751; training equal.
    fwd_bc: str = "float32"
    # A forward grid of fewer programs than `min_programs` splits the sequence into
    # segments, until it has `target_programs` and no segment is longer than
    # `max_segment_length` steps. Measured on H100 (one layer's scan fwd+bwd): at B=1,
    # L=16k, 16 segments of 1k steps beat 8 of 2k by 9%; at B=4, L=4k (384 programs), no
    # segments beat 4 by 13%; at B=8, L=2k, no segments beat 2 by 8%.
    min_programs: int = 384
    target_programs: int = 768
    max_segment_length: int = 1024
    min_segment_length: int = 512  # steps; shorter segments cost more in the second pass
    # Force the number of segments (a power of two) of the forward and of the backward; None
    # picks by the rule above. The two are independent: the forward saves the state at every
    # chunk start, so the backward may split the sequence differently or not at all.
    segments: Optional[int] = None
    bwd_segments: Optional[int] = None
    # Pass 1 of a segmented scan (each segment's own end state, and in the backward its
    # start adjoint, from zero) is a sum over the segment's steps,
    # h_end = sum_t exp(A * delta summed over the steps after t) * delta_t u_t B_t, taken in
    # tiles of `sum_tile` steps with no step-to-step dependency. Measured on H100 against
    # running the recurrence step by step (benchmarks/NOTES.md, section 9): prefill B=1
    # L=8k 437k vs 410k tok/s; one layer's scan fwd+bwd at B=2 L=8k 3.29 vs 3.59 ms
    # (16-step tiles), B=1 L=16k 3.30 vs 3.35 ms. None: 512 elements per channel-state
    # pair and tile, 32 steps at 16 channels per program, 16 at 32, each the better of the
    # two on one H100 (sections 9 and 11: prefill B=1 L=64k at 32 channels, 731,514 tok/s
    # for 16-step tiles against 705,179 for 32).
    sum_tile: Optional[int] = None
    sum_num_warps: int = 4
    # What of selective_scan's work around the recurrence the kernels do. "delta": the dt
    # bias and softplus (the kernels read the raw bf16 delta, so XLA writes no fp32
    # (B, L, E) copy of it); D and the gate stay with XLA. true: all four, with y written
    # in bf16. false: none. "auto" (the default): "delta" where the forward splits the
    # sequence into segments, else false. Measured on one H100 (benchmarks/NOTES.md,
    # section 12, tok/s, "delta" against false in the same call): with segments, prefill
    # B=1 at 8k / 64k 617,213 / 752,218 against 613,036 / 748,554, training at B=2 L=8k
    # 157,691 against 151,871 and B=1 L=16k 156,486 against 149,784; without, training at
    # B=8 L=2k 157,049 against 156,742 but at B=4 L=4k 136,952 against 148,462 (the fused
    # backward kernel took 42.5 ms per step instead of 28.0). true trains at B=8 1% faster
    # than false with 2 GiB more memory and prefills 3% slower.
    fuse: Union[bool, str] = "auto"
    # What the backward kernel fuses: "all"; "nogate" (all but the gate, whose chain rule
    # XLA applies from the forward's saved pre-gate output); "off" (XLA does everything
    # around the plain scan adjoint).
    bwd_fuse: str = "nogate"
    # The kernels' exp (and the fused softplus and sigmoid) on the GPU's approximate MUFU
    # instructions, as mamba_ssm's kernels are compiled (--use_fast_math); false:
    # libdevice's exact ones. Measured on one H100 (NOTES section 11): prefill B=1 L=64k
    # 690,758 against 596,718 tok/s, training at B=8 L=2k 156,451 against 150,453.
    # Ignored by the interpreter, which always computes exactly.
    approx_math: bool = True
    interpret: Optional[bool] = None  # None: interpret unless the backend is GPU

    @classmethod
    def from_options(cls, **options) -> "PallasScanConfig":
        unknown = sorted(set(options) - set(cls._fields))
        if unknown:
            raise ValueError(f"unknown pallas scan option(s) {unknown}; valid: {list(cls._fields)}")
        config = cls(**options)
        # Impl strings carry text: catch "16,a" or a mistyped bool, by the fields' annotations.
        for name, hint in typing.get_type_hints(cls).items():
            kinds = set(typing.get_args(hint)) or {hint}  # Optional[int]: {int, NoneType}
            wanted = {frozenset({int}): "a whole number", frozenset({bool}): "true or false"}.get(
                frozenset(kinds - {type(None)}))
            value = getattr(config, name)
            if wanted and type(value) not in kinds:
                raise ValueError(f"pallas scan option {name}={value!r}: give {wanted} (options are separated"
                                 " by ':', as in pallas:block_e=32:chunk=8)")
        if config.fuse not in (False, True, "delta", "auto"):
            raise ValueError(f"pallas scan option fuse={config.fuse!r}; choose auto, true, false or delta")
        if config.bwd_fuse not in ("all", "nogate", "off"):
            raise ValueError(f"pallas scan option bwd_fuse={config.bwd_fuse!r}; choose all, nogate or off")
        if config.fwd_bc not in ("input", "float32"):
            raise ValueError(f"pallas scan option fwd_bc={config.fwd_bc!r}; choose input or float32")
        if config.bwd_partials not in ("input", "float32"):
            raise ValueError(f"pallas scan option bwd_partials={config.bwd_partials!r}; choose input or float32")
        for name in ("segments", "bwd_segments", "sum_tile"):
            value = getattr(config, name)
            if value is not None and (value < 1 or value & (value - 1)):
                raise ValueError(f"pallas scan option {name}={value}: give a power of two (1, 2, 4, ...)")
        return config


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
    bwd_fusion: _Fusion  # backward kernel: a subset of `fusion`
    approx_math: bool = False  # kernels use the GPU's approximate ex2 and lg2 (see `_exp`)

    @property
    def chunks_per_segment(self) -> int:
        return self.chunks // self.segments

    @property
    def saves_pre_gate(self) -> bool:
        """The forward saves y before the gate when the backward leaves the gate to XLA."""
        return self.fusion.gate and not self.bwd_fusion.gate

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
    """Per-step inputs of one chunk as fp32 vectors: a tuple of tuples, one per step."""
    u_ref, delta_ref, B_ref, C_ref, z_ref, dy_ref = refs
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
        )
        rows.append(row)
    return tuple(rows)


# ---------------------------------------------------------------------------- forward
def _forward_kernel(*refs, plan, block_e, save_states):
    fusion, chunk = plan.fusion, plan.chunk
    save_pre_gate = save_states and plan.saves_pre_gate
    r = _Refs(refs)
    u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref = (r.take() for _ in range(6))
    bias_ref, D_ref, z_ref = r.take(fusion.bias), r.take(fusion.skip), r.take(fusion.gate)
    y_ref, h_end_ref, states_ref = r.take(), r.take(), r.take(save_states)
    pre_gate_ref = r.take(save_pre_gate)

    b, _, segment, channels, first, last = _program(plan, block_e)
    rate = _exp_rate(A_ref[channels, :], plan)  # (E_blk, N)
    bias = bias_ref[channels] if fusion.bias else None
    D = D_ref[channels] if fusion.skip else None
    data = (u_ref, delta_ref, B_ref, C_ref, z_ref, None)
    load = lambda c: _load_rows(data, b, c * chunk, channels, chunk, fusion, with_dy=False)

    def one_chunk(k, carry):
        h, rows = carry
        c = first + k
        upcoming = load(jnp.minimum(c + 1, last))  # issued now, used next iteration
        if save_states:
            states_ref[b, c, channels, :] = h
        for i, (u, raw, Bt, Ct, z, _) in enumerate(rows):
            delta = _delta(raw, bias, fusion, plan.approx_math)
            h = _exp(delta[:, None] * rate, plan) * h + (delta * u)[:, None] * Bt[None, :]
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
    bias_ref, D_ref, z_ref = r.take(fusion.bias), r.take(fusion.skip), r.take(fusion.gate)
    du_ref, ddelta_ref, dA_ref, dB_ref, dC_ref, dh_start_ref = (r.take() for _ in range(6))
    dD_ref, dbias_ref, dz_ref = r.take(fusion.skip), r.take(fusion.bias), r.take(fusion.gate)

    b, block, segment, channels, first, last = _program(plan, block_e)
    A = A_ref[channels, :]
    rate = _exp_rate(A, plan)
    bias = bias_ref[channels] if fusion.bias else None
    D = D_ref[channels] if fusion.skip else None
    data = (u_ref, delta_ref, B_ref, C_ref, z_ref, dy_ref)

    def load(c):
        rows = _load_rows(data, b, c * chunk, channels, chunk, fusion, with_dy=True)
        return states_ref[b, c, channels, :], rows

    def one_chunk(k, carry):
        g, dA, dD, dbias, (h_start, rows) = carry  # g: adjoint of the state after the chunk
        c = last - k
        # Issued now, used next iteration. This holds a second chunk of rows in registers
        # (255 per thread on H100), yet loading the B and C rows or everything in place
        # measured slower (benchmarks/NOTES.md, section 8).
        upcoming = load(jnp.maximum(c - 1, first))
        # Recompute the chunk: states[i] is the state before step i, decays[i] its decay.
        deltas = [_delta(row[1], bias, fusion, plan.approx_math) for row in rows]
        decays = [_exp(d[:, None] * rate, plan) for d in deltas]
        states = [h_start]
        for (u, _, Bt, _, _, _), delta, decay in zip(rows, deltas, decays):
            states.append(decay * states[-1] + (delta * u)[:, None] * Bt[None, :])
        for i in reversed(range(chunk)):
            t = c * chunk + i
            u, raw, Bt, Ct, z, dy = rows[i]
            delta, decay = deltas[i], decays[i]
            if fusion.gate:
                sig = _sigmoid(z, plan.approx_math)
                out = jnp.sum(states[i + 1] * Ct[None, :], axis=1)
                if fusion.skip:
                    out = out + D * u
                dz_ref[b, t, channels] = (dy * out * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
                dy = dy * z * sig  # cotangent of the pre-gate output
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


def _sum_tile(plan, cfg) -> int:
    """Steps per tile of the sum kernels: the largest power of two up to `sum_tile` that
    divides a segment (Triton tensors have power-of-two sides)."""
    steps = plan.chunks_per_segment * plan.chunk
    tile = 1
    while tile * 2 <= cfg.sum_tile and steps % (tile * 2) == 0:
        tile *= 2
    return tile


def _segment_end_kernel(*refs, plan, block_e, tile):
    """Pass 1 of a segmented forward as a sum: the state a segment reaches from zero,
    h_end = sum_t exp(A * later_t) * (delta_t u_t) B_t, later_t = sum of delta over the
    segment's steps after t. Tiles run from the segment's end so later_t is a running sum
    plus a within-tile cumsum; exp(A * later_t) <= 1 (A < 0), so nothing overflows. It also
    writes the segment's delta total, which sets the segment's decay: summed here, where
    delta is in registers anyway, XLA need not read the fp32 (B, L, E) delta once more."""
    fusion = plan.fusion
    r = _Refs(refs)
    u_ref, delta_ref, A_ref, B_ref = (r.take() for _ in range(4))
    bias_ref = r.take(fusion.bias)
    h_end_ref, total_ref = r.take(), r.take()

    b, _, segment, channels, first, _ = _program(plan, block_e)
    rate = _exp_rate(A_ref[channels, :], plan)
    bias = bias_ref[channels] if fusion.bias else None
    tiles = plan.chunks_per_segment * plan.chunk // tile

    def one_tile(k, carry):
        h, after = carry  # after: delta summed over the segment's steps after this tile
        steps = pl.ds((first * plan.chunk) + (tiles - 1 - k) * tile, tile)
        delta = _delta(delta_ref[b, steps, channels].astype(f32), bias, fusion, plan.approx_math)  # (T, E_blk)
        drive = delta * u_ref[b, steps, channels].astype(f32)
        Bt = B_ref[b, steps, :].astype(f32)  # (T, N)
        total = jnp.sum(delta, axis=0)
        later = after[None, :] + (total[None, :] - jnp.cumsum(delta, axis=0))
        terms = _exp(later[:, :, None] * rate[None], plan) * drive[:, :, None] * Bt[:, None, :]
        return h + jnp.sum(terms, axis=0), after + total

    zeros = jnp.zeros(rate.shape, f32), jnp.zeros((block_e,), f32)
    h, total = jax.lax.fori_loop(0, tiles, one_tile, zeros)
    h_end_ref[b, segment, channels, :] = h
    total_ref[b, segment, channels] = total


def _segment_start_adjoint_kernel(*refs, plan, block_e, tile):
    """Pass 1 of a segmented backward as a sum: the adjoint a segment carries to its start
    from zero at its end, g_start = sum_t exp(A * upto_t) * dy_t C_t, upto_t = sum of
    delta over the segment's steps up to and including t (the recurrence
    g <- exp(delta A) (g + dy C), run from the segment's end, written out as a sum), and
    the segment's delta total, as `_segment_end_kernel`."""
    fusion = plan.bwd_fusion
    r = _Refs(refs)
    delta_ref, A_ref, C_ref, dy_ref = (r.take() for _ in range(4))
    bias_ref, z_ref = r.take(fusion.bias), r.take(fusion.gate)
    g_start_ref, total_ref = r.take(), r.take()

    b, _, segment, channels, first, _ = _program(plan, block_e)
    rate = _exp_rate(A_ref[channels, :], plan)
    bias = bias_ref[channels] if fusion.bias else None
    tiles = plan.chunks_per_segment * plan.chunk // tile

    def one_tile(k, carry):
        g, before = carry  # before: delta summed over the segment's steps before this tile
        steps = pl.ds(first * plan.chunk + k * tile, tile)
        delta = _delta(delta_ref[b, steps, channels].astype(f32), bias, fusion, plan.approx_math)
        dy = dy_ref[b, steps, channels].astype(f32)
        if fusion.gate:
            z = z_ref[b, steps, channels].astype(f32)
            dy = dy * z * _sigmoid(z, plan.approx_math)
        Ct = C_ref[b, steps, :].astype(f32)
        upto = before[None, :] + jnp.cumsum(delta, axis=0)
        terms = _exp(upto[:, :, None] * rate[None], plan) * dy[:, :, None] * Ct[:, None, :]
        return g + jnp.sum(terms, axis=0), before + jnp.sum(delta, axis=0)

    zeros = jnp.zeros(rate.shape, f32), jnp.zeros((block_e,), f32)
    g, total = jax.lax.fori_loop(0, tiles, one_tile, zeros)
    g_start_ref[b, segment, channels, :] = g
    total_ref[b, segment, channels] = total


# ---------------------------------------------------------------------------- drivers
def _interpret(cfg: PallasScanConfig) -> bool:
    return jax.default_backend() != "gpu" if cfg.interpret is None else cfg.interpret


def _call(kernel, out_shape, grid, cfg, num_warps, args):
    interpret = _interpret(cfg)
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


def _segment_decays(totals, A):
    """exp(A * sum of delta over each segment): (B, S, E, N), the decay a segment applies,
    from the (B, S, E) delta totals the pass-1 kernels write."""
    return jnp.exp(totals[..., None] * A)


def _segment_recurrence(decays, drives, initial, reverse=False):
    """Every x_s of x_s = decays_s * x_{s-1} + drives_s over the segment axis (1), from
    x_{-1} = initial (with `reverse`, from the right: x_s = decays_s * x_{s+1} + drives_s).

    An associative scan, log2(S) levels of a few fused ops, rather than a `lax.scan` of S
    dependent steps: those were three tiny kernels per segment, 4,600 per 64k prefill
    (64 segments, 24 layers), about 6 ms of device time on an H100 (NOTES section 10).
    """
    first = -1 if reverse else 0
    drives = drives.at[:, first].add(decays[:, first] * initial)
    combine = lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1])
    return jax.lax.associative_scan(combine, (decays, drives), reverse=reverse, axis=1)[1]


def _forward(cfg, plan, u, delta, A, B, C, h0, bias, D, z, save_states):
    """y (in u's dtype), the final state and, if `save_states`, the chunk-start states."""
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    S = plan.segments
    grid = (batch, channels // cfg.block_e, S)
    fused = _fused_args(plan.fusion, bias, D, z)
    states_shape = jax.ShapeDtypeStruct((batch, length // plan.chunk, channels, d_state), f32)
    segment_state = jax.ShapeDtypeStruct((batch, S, channels, d_state), f32)
    segment_totals = jax.ShapeDtypeStruct((batch, S, channels), f32)
    if cfg.fwd_bc == "float32":
        B, C = B.astype(f32), C.astype(f32)

    if S == 1:
        starts = h0[:, None]
    else:
        kernel = functools.partial(_segment_end_kernel, plan=plan, block_e=cfg.block_e, tile=_sum_tile(plan, cfg))
        bias_arg = [bias] if plan.fusion.bias else []
        local_ends, totals = _call(kernel, [segment_state, segment_totals], grid, cfg, cfg.sum_num_warps,
                                   (u, delta, A, B, *bias_arg))
        decays = _segment_decays(totals, A)
        # The true end of segment s is decay_s * (its true start) + its end from zero.
        true_ends = _segment_recurrence(decays[:, :-1], local_ends[:, :-1], h0)
        starts = jnp.concatenate([h0[:, None], true_ends], axis=1)
    kernel = functools.partial(_forward_kernel, plan=plan, block_e=cfg.block_e, save_states=save_states)
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), segment_state]
    out_shape += [states_shape] if save_states else []
    out_shape += [jax.ShapeDtypeStruct(u.shape, f32)] if save_states and plan.saves_pre_gate else []
    y, ends, *saved = _call(kernel, out_shape, grid, cfg, cfg.num_warps, (u, delta, A, B, C, starts, *fused))
    return y, ends[:, -1], (tuple(saved) if save_states else None)


def _backward(cfg, plan, residuals, dy, dfinal):
    u, delta, A, B, C, bias, D, z, (states, *pre_gate) = residuals
    plan = plan.backward()
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    S, fusion, full = plan.segments, plan.bwd_fusion, plan.fusion
    block_e = cfg.bwd_block_e  # resolved by _tiling
    warps = cfg.bwd_num_warps or cfg.num_warps
    n_blocks = channels // block_e
    grid = (batch, n_blocks, S)
    segment_state = jax.ShapeDtypeStruct((batch, S, channels, d_state), f32)
    # What the backward kernel does not fuse, XLA does around it, in fp32.
    raw_u_dtype, raw_delta, dz = u.dtype, delta, None
    if full.gate and not fusion.gate:
        z32, dy32 = z.astype(f32), dy.astype(f32)
        sig = _sigmoid(z32)
        dz = (dy32 * pre_gate[0] * sig * (1.0 + z32 * (1.0 - sig))).astype(z.dtype)
        dy = dy32 * z32 * sig  # cotangent of the pre-gate output
    if full.skip and not fusion.skip:
        u32 = u.astype(f32)
        dD_xla, du_skip = jnp.sum(dy.astype(f32) * u32, axis=(0, 1)), dy.astype(f32) * D
        u = u32
    prepare_delta_in_xla = (full.bias or full.softplus) and not (fusion.bias or fusion.softplus)
    if prepare_delta_in_xla:
        delta = _delta(delta.astype(f32), bias, full)

    if S == 1:
        g_ends = dfinal[:, None]
    else:
        extras = [x for x, on in ((bias, fusion.bias), (z, fusion.gate)) if on]
        kernel = functools.partial(_segment_start_adjoint_kernel, plan=plan, block_e=cfg.block_e,
                                   tile=_sum_tile(plan, cfg))
        segment_totals = jax.ShapeDtypeStruct((batch, S, channels), f32)
        local, totals = _call(kernel, [segment_state, segment_totals], (batch, channels // cfg.block_e, S), cfg,
                              cfg.sum_num_warps, (delta, A, C, dy, *extras))
        decays = _segment_decays(totals, A)
        # The adjoint entering segment s from its right is decay_{s+1} * (the one entering
        # segment s+1) + segment s+1's start adjoint from zero; the last receives dfinal.
        g_ends = _segment_recurrence(decays[:, 1:], local[:, 1:], dfinal, reverse=True)
        g_ends = jnp.concatenate([g_ends, dfinal[:, None]], axis=1)

    partials = lambda x: jax.ShapeDtypeStruct(
        (batch, n_blocks, length, d_state), x.dtype if cfg.bwd_partials == "input" else f32)
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
    out_shape += [jax.ShapeDtypeStruct(z.shape, z.dtype)] if fusion.gate else []
    kernel = functools.partial(_backward_kernel, plan=plan, block_e=block_e)
    outs = _call(kernel, out_shape, grid, cfg, warps,
                 (u, delta, A, B, C, states, dy, g_ends, *_fused_args(fusion, bias, D, z)))
    du, ddelta, dA, dB, dC, dh_start, *rest = outs
    dD = rest.pop(0).sum((0, 1)) if fusion.skip else None
    dbias = rest.pop(0).sum((0, 1)) if fusion.bias else None
    dz = rest.pop(0) if fusion.gate else dz
    if full.skip and not fusion.skip:
        du, dD = du + du_skip, dD_xla
    if prepare_delta_in_xla and full.softplus:
        ddelta = ddelta * _softplus_grad(raw_delta.astype(f32), bias, full)
    if prepare_delta_in_xla and full.bias:
        dbias = ddelta.sum((0, 1))
    # Sum the per-block partials behind a barrier: fused into its consumer (the
    # concatenation of x_proj's output gradient), XLA ran the dB sum as a loop of strided
    # loads at a quarter of the bandwidth its reduction kernel reached for dC on H100.
    dB, dC = jax.lax.optimization_barrier((dB.sum(1, dtype=f32), dC.sum(1, dtype=f32)))
    return (du.astype(raw_u_dtype), ddelta.astype(raw_delta.dtype), dA.sum((0, 1)), dB.astype(B.dtype),
            dC.astype(C.dtype), dh_start[:, 0], dbias, dD, dz)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_padded(cfg, plan, u, delta, A, B, C, h0, bias, D, z):
    y, final, _ = _forward(cfg, plan, u, delta, A, B, C, h0, bias, D, z, save_states=False)
    return y, final


def _scan_padded_fwd(cfg, plan, u, delta, A, B, C, h0, bias, D, z):
    y, final, saved = _forward(cfg, plan, u, delta, A, B, C, h0, bias, D, z, save_states=True)
    # Named so that remat="scan" keeps them and the backward pass skips the forward kernel.
    output_name, states_name = SCAN_RESIDUAL_NAMES
    y = checkpoint_name(y, output_name)
    saved = tuple(checkpoint_name(x, states_name) for x in saved)
    return (y, final), (u, delta, A, B, C, bias, D, z, saved)


def _scan_padded_bwd(cfg, plan, residuals, cotangents):
    return _backward(cfg, plan, residuals, *cotangents)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd)


def _segment_count(cfg: PallasScanConfig, programs: int, length: int) -> int:
    """Segments for a grid of `programs` programs: none from `min_programs` up; below,
    double until the grid has `target_programs` and no segment is over
    `max_segment_length` steps, keeping segments of at least `min_segment_length`."""
    segments = 1
    if programs < cfg.min_programs:
        while length >= 2 * segments * cfg.min_segment_length and (
            programs * segments < cfg.target_programs or length > segments * cfg.max_segment_length
        ):
            segments *= 2
    return segments


def _tiling(cfg: PallasScanConfig, batch: int, length: int, channels: int):
    """Clamp the config to the shape, resolve its shape-dependent defaults (None tilings,
    fuse="auto") and pick the forward's and the backward's segment counts:
    (cfg, segments, bwd_segments)."""
    programs = lambda block_e: batch * -(-channels // block_e)
    block_e = cfg.block_e or (16 if programs(16) >= cfg.min_programs else 32)
    block_e = min(block_e, _next_pow2(channels))
    chunk = max(1, min(cfg.chunk, length))
    segments = cfg.segments or _segment_count(cfg, programs(block_e), length)
    bwd_segments = cfg.bwd_segments or segments
    bwd_block_e = cfg.bwd_block_e or (8 if bwd_segments > 1 else 4)
    bwd_block_e = min(bwd_block_e, _next_pow2(channels))
    sum_tile = cfg.sum_tile or max(1, 512 // block_e)
    fuse = ("delta" if segments > 1 else False) if cfg.fuse == "auto" else cfg.fuse  # see PallasScanConfig.fuse
    cfg = cfg._replace(block_e=block_e, bwd_block_e=bwd_block_e, chunk=chunk, sum_tile=sum_tile, fuse=fuse)
    return cfg, segments, bwd_segments


def _run(u, delta, A, B, C, h0, bias, D, z, fusion, options):
    """Pad to the kernel's tiling, choose segments, run, and slice the padding off."""
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    cfg, segments, bwd_segments = _tiling(PallasScanConfig.from_options(**options), batch, length, channels)
    widest = max(cfg.block_e, cfg.bwd_block_e)  # both powers of two
    padded_e = -(-channels // widest) * widest
    steps = max(segments, bwd_segments) * cfg.chunk  # all powers of two
    padded_l = -(-length // steps) * steps
    bwd_fusion = {"all": fusion, "nogate": fusion._replace(gate=False), "off": _Fusion()}[cfg.bwd_fuse]
    plan = _Plan(cfg.chunk, padded_l // cfg.chunk, segments, bwd_segments, fusion, bwd_fusion,
                 approx_math=cfg.approx_math and not _interpret(cfg))
    padded_n = _next_pow2(d_state)
    de, dn, dl = padded_e - channels, padded_n - d_state, padded_l - length

    def pad(x, *widths, value=0.0):
        if x is None or not any(widths):
            return x
        return jnp.pad(x, [(0, w) for w in widths], constant_values=value)

    # Padded steps must leave the state alone: delta = 0 after the (fused) softplus.
    delta_pad = -jnp.inf if fusion.softplus else 0.0
    y, final = _scan_padded(
        cfg, plan,
        pad(u, 0, dl, de), pad(delta, 0, dl, de, value=delta_pad), pad(A, de, dn),
        pad(B, 0, dl, dn), pad(C, 0, dl, dn), pad(h0, 0, de, dn),
        pad(bias, de), pad(D, de), pad(z, 0, dl, de),
    )
    return y[:, :length, :channels], final[:, :channels, :d_state]


def pallas_scan(u, delta, A, B, C, initial_state, **options):
    """Selective scan through the Pallas kernels; same contract as `scan.reference_scan`
    (delta with softplus applied, y in fp32 without D and gate). u, B and C may also come
    in a narrower dtype: the kernels compute in fp32 and return their gradients in the
    inputs' dtypes. `options` are `PallasScanConfig` fields, e.g. block_e=32, chunk=8."""
    h0 = start_state(initial_state, *u.shape[::2], A.shape[-1])
    return _run(u, delta, A, B, C, h0, None, None, None, _Fusion(), options)


def pallas_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, mask=None, **options):
    """`selective_scan`'s full contract with bias, softplus, D and gate inside the kernels.

    u, delta, z stay in their dtype (bf16 in training) on the way in and y comes out in
    u's dtype, so no fp32 (B, L, E) copy of them is made. Masked positions get u = 0 and a
    delta of exactly 0, as in `selective_scan`.
    """
    fuse = _tiling(PallasScanConfig.from_options(**options), *u.shape)[0].fuse
    if not fuse:  # XLA does the work around the kernels
        delta32 = prepare_delta(delta, delta_bias, delta_softplus, mask)
        # u, B and C go in as they are (bf16 in training, where u is a bf16 activation, so
        # nothing is lost): the kernels read them as fp32 and return their gradients in
        # their own dtypes, which saves an fp32 (B, L, E) copy of u and of du per layer.
        u = u if mask is None else u * mask[..., None].astype(u.dtype)
        y, final = pallas_scan(u, delta32, A.astype(f32), B, C, initial_state, **options)
        return finish_output(y, u.astype(f32), D, z, u.dtype), final
    if delta_bias is not None and not delta_softplus:
        # Masked and padded steps must see delta exactly 0. With a softplus they get a raw
        # delta of -inf; without one, no raw value gives 0 after each channel's bias in the
        # kernel, so the bias is added here, before masking and padding.
        delta, delta_bias = delta.astype(f32) + delta_bias.astype(f32), None
    delta_only = fuse == "delta"  # D and the gate are then applied by XLA, after the kernels
    fusion = _Fusion(bias=delta_bias is not None, softplus=bool(delta_softplus),
                     skip=D is not None and not delta_only, gate=z is not None and not delta_only)
    if mask is not None:
        keep = mask[..., None].astype(bool)
        u = jnp.where(keep, u, jnp.zeros((), u.dtype))
        off = -jnp.inf if delta_softplus else 0.0
        delta = jnp.where(keep, delta, jnp.asarray(off, delta.dtype))
    h0 = start_state(initial_state, *u.shape[::2], A.shape[-1])
    as_f32 = lambda x: None if x is None else x.astype(f32)
    kernel_D, kernel_z = (None, None) if delta_only else (as_f32(D), z)
    y, final = _run(u, delta, A.astype(f32), B, C, h0, as_f32(delta_bias), kernel_D, kernel_z, fusion, options)
    if delta_only:
        y = finish_output(y, u.astype(f32), D, z, u.dtype)
    return y, final
