"""Experiment (not wired into the library): a Pallas forward scan parallel along time.

The library's kernels walk time step by step inside one program, so a short grid (batch 1)
needs segment passes. mamba_ssm instead lays threads along time and runs a block-wide
scan. Pallas' Triton lowering registers only `cumsum` for Triton's scan op; a first-order
linear recurrence h_t = a_t h_{t-1} + b_t needs the two-operand combine
(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2). `linear_scan` below is a primitive with that
combine: XLA evaluates it with `lax.associative_scan` (so interpret mode works on CPU) and
the Triton lowering emits one `tt.scan` with two operands, built like JAX's own cumsum
lowering. It uses JAX internals (jax._src.pallas.triton.lowering), so it is bound to the
JAX version it was written against (0.10.2 here, 0.11.2 on the device image).

The kernel: one program per (batch row, block of channels); a loop over tiles of T steps
computes a = exp(delta A) and b = delta u B as (T, E_blk, N) blocks, scans them along T,
adds the carried state, contracts with C and stores a (T, E_blk) block of y. With a
gradient it also saves the state at every chunk start in the layout the library's
backward kernel reads, so `_backward` (segments and all) runs unchanged.

Importing this module registers the scan impl "pallas_tp" (options: the Pallas ones plus
`tile`, `tp_block_e`, `tp_num_warps`), so `scripts/benchmark.py --plugin
benchmarks/time_parallel_forward.py --train-impls pallas,pallas_tp` checks and times it.

Status: values and gradients tested against `reference` in interpret mode on CPU, lowered
to Triton IR for CUDA on CPU, and checked on an H100 (JAX 0.11.2). Slower than "pallas" at
every shape and tiling timed (`device_tp1.sh`, `device_s5r2.sh`; benchmarks/NOTES.md
section 10): Triton's scan along the tile's first axis crosses warps, and fewer warps were
always faster. Its exp is the library's `_exp` (ex2.approx on the GPU) since session 7;
re-timed then (`device_s7r2.sh`, section 12), it stayed far behind: prefill B=1 64k
505,158 tok/s against 740,782. Not wired into the library.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax._src import api_util
from jax._src import core as jax_core
from jax._src import linear_util as lu
from jax._src import tree_util
from jax._src.interpreters import mlir
from jax._src.interpreters import partial_eval as pe
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from biomamba_jax import scan_pallas as sp
from biomamba_jax.scan import SCAN_RESIDUAL_NAMES, register_scan_impl

f32 = jnp.float32


def _combine(x, y):
    (a1, b1), (a2, b2) = x, y
    return a1 * a2, a2 * b1 + b2


def _linear_scan_impl(a, b, *, axis):
    return jax.lax.associative_scan(_combine, (a, b), axis=axis)


linear_scan_p = jax_core.Primitive("linear_scan")
linear_scan_p.multiple_results = True
linear_scan_p.def_impl(_linear_scan_impl)
linear_scan_p.def_abstract_eval(lambda a, b, *, axis: (jax_core.ShapedArray(a.shape, a.dtype),
                                                         jax_core.ShapedArray(b.shape, b.dtype)))
mlir.register_lowering(linear_scan_p, mlir.lower_fun(_linear_scan_impl, multiple_results=True))


def linear_scan(a, b, axis=0):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along `axis`: returns
    (prod of a up to t, h_t)."""
    return linear_scan_p.bind(a, b, axis=axis)


def _register_triton_lowering():
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas.triton import lowering as tl

    @tl.register_lowering(linear_scan_p)
    def _lowering(ctx, a, b, *, axis):
        dtype = ctx.avals_in[0].dtype
        scalar = jax_core.ShapedArray((), dtype)
        in_tree = tree_util.tree_structure(((0, 0), (0, 0)))
        debug = api_util.debug_info("linear_scan combine", _combine, ((a, b), (a, b)), {})
        flat_fun, _ = api_util.flatten_fun_nokwargs(lu.wrap_init(_combine, debug_info=debug), in_tree)
        jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(flat_fun, [scalar] * 4)
        if consts:
            raise NotImplementedError("linear_scan combine with constants")
        element_types = [tl._element_type(v.type) for v in (a, b)]
        scan_op = tt_dialect.ScanOp([a, b], axis)
        entry = scan_op.regions[0].blocks.append(*(element_types * 2))
        with tl.ir.InsertionPoint.at_block_begin(entry):
            results = tl.lower_jaxpr_to_triton_ir(ctx.context, jaxpr, None, *entry.arguments)
            tt_dialect.scan_return(results)
        scan_op.verify()
        return list(scan_op.result)


_register_triton_lowering()


class TimeParallel(NamedTuple):
    # A (tile, block_e, N) block is 4096 fp32 values at these defaults, 16 per thread on 8
    # warps. Chosen to avoid register spills; on an H100 4 warps and 64-step tiles measured
    # faster (NOTES section 10), so the cost is the scan across warps. At B=1 for
    # Mamba-130m: 192 programs.
    tile: int = 32  # steps scanned at once
    block_e: int = 8  # channels per program
    num_warps: int = 8
    # Loop over the N state columns, scanning (T, E_blk) blocks one column at a time, as
    # mamba_ssm's kernel does: a sixteenth of the registers per block, so tiles can be
    # longer, and y accumulates per thread with no reduction over N.
    per_state: bool = False


def _kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, h_end_ref, *states_ref, block_e, tile, plan):
    b, block = pl.program_id(0), pl.program_id(1)
    channels = pl.ds(block * block_e, block_e)
    rate = sp._exp_rate(A_ref[channels, :], plan)  # (E_blk, N), in the unit sp._exp takes
    d_state, chunk = rate.shape[-1], plan.chunk
    groups = tile // chunk
    last = jax.lax.broadcasted_iota(jnp.int32, (tile, 1, 1), 0) == tile - 1
    chunk_last = jax.lax.broadcasted_iota(jnp.int32, (groups, chunk, 1, 1), 1) == chunk - 1
    h0 = h0_ref[b, channels, :]
    if states_ref:  # states_ref[0][b, c] is the state at the start of chunk c (one row extra)
        states_ref[0][b, 0, channels, :] = h0

    def one_tile(k, h):
        steps = pl.ds(k * tile, tile)
        delta = delta_ref[b, steps, channels].astype(f32)  # (T, E_blk)
        drive = delta * u_ref[b, steps, channels].astype(f32)
        Bt, Ct = B_ref[b, steps, :].astype(f32), C_ref[b, steps, :].astype(f32)  # (T, N)
        decay = sp._exp(delta[:, :, None] * rate[None], plan)  # (T, E_blk, N)
        cum_decay, local = linear_scan(decay, drive[:, :, None] * Bt[:, None, :], axis=0)
        states = local + cum_decay * h[None]  # the true state after each step
        y_ref[b, steps, channels] = jnp.sum(states * Ct[:, None, :], axis=2).astype(y_ref.dtype)
        if states_ref:  # the state after each chunk of this tile starts the next chunk
            grouped = states.reshape(groups, chunk, block_e, d_state)
            states_ref[0][b, pl.ds(k * groups + 1, groups), channels, :] = jnp.sum(
                jnp.where(chunk_last, grouped, 0.0), axis=1)
        return jnp.sum(jnp.where(last, states, 0.0), axis=0)  # the state after the tile

    h_end_ref[b, channels, :] = jax.lax.fori_loop(0, u_ref.shape[1] // tile, one_tile, h0)


def _per_state_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, h_end_ref, *states_ref, block_e, tile,
                      plan):
    b, block = pl.program_id(0), pl.program_id(1)
    channels = pl.ds(block * block_e, block_e)
    d_state, chunk = A_ref.shape[-1], plan.chunk
    groups = tile // chunk
    last = jax.lax.broadcasted_iota(jnp.int32, (tile, 1), 0) == tile - 1
    chunk_last = jax.lax.broadcasted_iota(jnp.int32, (groups, chunk, 1), 1) == chunk - 1
    rate = [sp._exp_rate(A_ref[channels, n], plan) for n in range(d_state)]  # N columns of (E_blk,)
    h0 = tuple(h0_ref[b, channels, n] for n in range(d_state))
    if states_ref:  # states_ref[0][b, c] is the state at the start of chunk c (one row extra)
        for n in range(d_state):
            states_ref[0][b, 0, channels, n] = h0[n]

    def one_tile(k, h):
        steps = pl.ds(k * tile, tile)
        delta = delta_ref[b, steps, channels].astype(f32)  # (T, E_blk)
        drive = delta * u_ref[b, steps, channels].astype(f32)
        y = jnp.zeros_like(delta)
        h_next = []
        for n in range(d_state):
            Bn, Cn = B_ref[b, steps, n].astype(f32), C_ref[b, steps, n].astype(f32)  # (T,)
            cum_decay, local = linear_scan(sp._exp(delta * rate[n][None], plan), drive * Bn[:, None], axis=0)
            states = local + cum_decay * h[n][None]  # (T, E_blk): column n of the state after each step
            y = y + states * Cn[:, None]
            if states_ref:
                grouped = states.reshape(groups, chunk, block_e)
                states_ref[0][b, pl.ds(k * groups + 1, groups), channels, n] = jnp.sum(
                    jnp.where(chunk_last, grouped, 0.0), axis=1)
            h_next.append(jnp.sum(jnp.where(last, states, 0.0), axis=0))
        y_ref[b, steps, channels] = y.astype(y_ref.dtype)
        return tuple(h_next)

    h_end = jax.lax.fori_loop(0, u_ref.shape[1] // tile, one_tile, h0)
    for n in range(d_state):
        h_end_ref[b, channels, n] = h_end[n]


def _forward(cfg, plan, tp, u, delta, A, B, C, h0, save_states):
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    if channels % tp.block_e or length % tp.tile or tp.tile % plan.chunk:
        raise ValueError(f"pallas_tp: E={channels}, L={length}, tile={tp.tile}, block_e={tp.block_e}, "
                         f"chunk={plan.chunk} do not tile")
    interpret = sp._interpret(cfg)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=tp.num_warps, num_stages=1)
    out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct((batch, channels, d_state), f32)]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((batch, plan.chunks + 1, channels, d_state), f32))
    kernel = functools.partial(_per_state_kernel if tp.per_state else _kernel, block_e=tp.block_e, tile=tp.tile, plan=plan)
    return pl.pallas_call(kernel, grid=(batch, channels // tp.block_e), interpret=interpret, compiler_params=params,
                          out_shape=out_shape, name="time_parallel_forward")(u, delta, A, B, C, h0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(tp, cfg, plan, u, delta, A, B, C, h0, bias, D, z):
    y, final = _forward(cfg, plan, tp, u, delta, A, B, C, h0, save_states=False)
    return y, final


def _scan_fwd(tp, cfg, plan, u, delta, A, B, C, h0, bias, D, z):
    y, final, states = _forward(cfg, plan, tp, u, delta, A, B, C, h0, save_states=True)
    output_name, states_name = SCAN_RESIDUAL_NAMES  # so remat="scan" keeps them, as for "pallas"
    y, states = checkpoint_name(y, output_name), checkpoint_name(states, states_name)
    return (y, final), (u, delta, A, B, C, bias, D, z, (states,))


def _scan_bwd(tp, cfg, plan, residuals, cotangents):
    return sp._backward(cfg, plan, residuals, *cotangents)  # reads states[:, c] for c < chunks


_scan.defvjp(_scan_fwd, _scan_bwd)


def time_parallel_scan(u, delta, A, B, C, initial_state=None, **options):
    """`pallas_scan`'s contract (gradients included) with the time-parallel forward. Options:
    `tile`, `tp_block_e`, `tp_num_warps`, `tp_per_state`, and any `PallasScanConfig` field (the backward's)."""
    default = TimeParallel()
    tp = TimeParallel(options.pop("tile", default.tile), options.pop("tp_block_e", default.block_e),
                      options.pop("tp_num_warps", default.num_warps),
                      bool(options.pop("tp_per_state", default.per_state)))
    h0 = sp._initial_state(initial_state, *u.shape[::2], A.shape[-1])
    return sp._run(u, delta, A, B, C, h0, None, None, None, sp._Fusion(), options,
                   scan=functools.partial(_scan, tp), length_multiple=tp.tile)


def time_parallel_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                 initial_state=None, mask=None, **options):
    """As "pallas" with fuse=false: bf16 u, B, C go in as they are; XLA does the rest."""
    from biomamba_jax.scan import _finish_output, _prepare_delta

    delta32 = _prepare_delta(delta, delta_bias, delta_softplus, mask)
    u = u if mask is None else u * mask[..., None].astype(u.dtype)
    y, final = time_parallel_scan(u, delta32, A.astype(f32), B, C, initial_state, **options)
    return _finish_output(y, u.astype(f32), D, z, u.dtype), final


register_scan_impl("pallas_tp", time_parallel_scan, fused=time_parallel_selective_scan,
                   options=sp.PallasScanConfig._fields + ("tile", "tp_block_e", "tp_num_warps", "tp_per_state"))
