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

`time_parallel_scan` is the forward only (prefill): one program per (batch row, block of
channels); a loop over tiles of T steps computes a = exp(delta A) and b = delta u B as
(T, E_blk, N) blocks, scans them along T, adds the carried state, contracts with C and
stores a (T, E_blk) block of y. Same contract as `pallas_scan` without gradients.

Status: numerics tested in interpret mode on CPU and lowered to Triton IR for CUDA on CPU;
never compiled for or timed on a GPU: `benchmarks/device_tp1.sh` does both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src import api_util
from jax._src import core as jax_core
from jax._src import linear_util as lu
from jax._src import tree_util
from jax._src.interpreters import mlir
from jax._src.interpreters import partial_eval as pe
from jax.experimental import pallas as pl

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
        body = lambda x, y: _combine(x, y)
        in_tree = tree_util.tree_structure(((0, 0), (0, 0)))
        flat_fun, _ = api_util.flatten_fun_nokwargs(
            lu.wrap_init(body, debug_info=api_util.debug_info("linear_scan combine", body, ((a, b), (a, b)), {})),
            in_tree)
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


def _kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, h_end_ref, *, block_e, tile, tiles):
    b, block = pl.program_id(0), pl.program_id(1)
    channels = pl.ds(block * block_e, block_e)
    A = A_ref[channels, :]  # (E_blk, N)
    last = jax.lax.broadcasted_iota(jnp.int32, (tile, 1, 1), 0) == tile - 1

    def one_tile(k, h):
        steps = pl.ds(k * tile, tile)
        delta = delta_ref[b, steps, channels].astype(f32)  # (T, E_blk)
        drive = delta * u_ref[b, steps, channels].astype(f32)
        Bt, Ct = B_ref[b, steps, :].astype(f32), C_ref[b, steps, :].astype(f32)  # (T, N)
        decay = jnp.exp(delta[:, :, None] * A[None])  # (T, E_blk, N)
        cum_decay, local = linear_scan(decay, drive[:, :, None] * Bt[:, None, :], axis=0)
        states = local + cum_decay * h[None]  # the true state after each step
        y_ref[b, steps, channels] = jnp.sum(states * Ct[:, None, :], axis=2).astype(y_ref.dtype)
        return jnp.sum(jnp.where(last, states, 0.0), axis=0)  # the state after the tile

    h = jax.lax.fori_loop(0, tiles, one_tile, h0_ref[b, channels, :])
    h_end_ref[b, channels, :] = h


def time_parallel_scan(u, delta, A, B, C, initial_state=None, *, block_e=8, tile=64, num_warps=4, interpret=None):
    """Forward selective scan, no gradient: (y in u's dtype, final fp32 state). L must be a
    multiple of `tile` and E of `block_e` (an experiment: no padding)."""
    batch, length, channels = u.shape
    d_state = A.shape[-1]
    if length % tile or channels % block_e:
        raise ValueError(f"time_parallel_scan: L={length} must be a multiple of tile={tile} and "
                         f"E={channels} of block_e={block_e}")
    h0 = jnp.zeros((batch, channels, d_state), f32) if initial_state is None else initial_state.astype(f32)
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    kernel = functools.partial(_kernel, block_e=block_e, tile=tile, tiles=length // tile)
    return pl.pallas_call(
        kernel, grid=(batch, channels // block_e), interpret=interpret, compiler_params=params,
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(h0.shape, f32)],
        name="time_parallel_forward",
    )(u, delta.astype(f32), A.astype(f32), B, C, h0)
