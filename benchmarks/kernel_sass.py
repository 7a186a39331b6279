"""Count the SASS instructions of the Pallas scan kernels' inner loops, without a GPU.

Pallas lowers each kernel to Triton IR on any machine (`lowering_platforms=("cuda",)`);
pip's Triton then compiles that IR for sm_90 and its bundled cuobjdump disassembles it.
Per loop (a backward branch), this prints how many instructions one trip runs, the warp
instructions per (step, channel, state) element (issue slots: comparable across tilings),
and the opcode mix: MUFU (the exp), FFMA/FMUL (the arithmetic), and what is overhead (address
arithmetic, bf16 unpacking, shuffles, and BAR/STS/LDS, the shared-memory round trips of
Triton layout conversions). It is a proxy for choosing what to time on the device, not a
timing: XLA compiles the same IR with its own Triton build, which may differ.

    pip install --target /tmp/triton-site triton==3.5.1   # not a project dependency
    PYTHONPATH=. python3 benchmarks/kernel_sass.py --triton /tmp/triton-site \
        --shape 1,8192,1536,16 --impl pallas [--keep DIR]

`--impl` takes a pallas impl string (`pallas:fuse=true:approx_math=false`); the kernels are
tiled as `scan_pallas` tiles that shape. The call is the model's (bf16 u, delta, z, B, C;
dt bias, softplus, D and gate), forward only, or with its gradient under `--grad`.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import io
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

_MODULE_HEADER = re.compile(r"\nThe Triton module for pallas_call [^\n]*:\n")
_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*?);")


def triton_modules(impl: str, shape, grad: bool) -> dict[str, str]:
    """{kernel name: Triton IR text} of one selective_scan call lowered for CUDA."""
    import biomamba_jax.model.scan_pallas as scan_pallas
    from biomamba_jax.model.scan import selective_scan
    from biomamba_jax.model.scan_options import ScanImpl
    from jax.experimental import pallas as pl

    scan = _pallas_impl(impl)
    batch, length, channels, d_state = shape
    bf16 = lambda *s: jnp.zeros(s, jnp.bfloat16)
    args = (bf16(batch, length, channels), bf16(batch, length, channels), -jnp.ones((channels, d_state)),
            bf16(batch, length, d_state), bf16(batch, length, d_state))
    extras = dict(D=jnp.ones(channels), z=args[0], delta_bias=jnp.zeros(channels), delta_softplus=True)
    # The kernels must go to Triton, not the interpreter.
    compiled = ScanImpl("pallas", dataclasses.replace(scan.options, interpret=False))
    forward = lambda *a: selective_scan(*a, **extras, impl=compiled)[0]
    fn = jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)), argnums=(0, 1)) if grad else forward

    class PrintingPallas:  # `pl` as scan_pallas sees it, with pallas_call printing its Triton IR
        def __getattr__(self, attr):
            return functools.partial(pl.pallas_call, debug=True) if attr == "pallas_call" else getattr(pl, attr)

    printed = io.StringIO()
    scan_pallas.pl = PrintingPallas()
    try:
        with contextlib.redirect_stdout(printed):
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        scan_pallas.pl = pl
    modules = {}
    for text in _MODULE_HEADER.split(printed.getvalue())[1:]:
        kernel = re.search(r"tt.func public @(\w+)", text).group(1)
        modules[kernel] = _strip_locations(text)
    return modules


def _pallas_impl(impl: str):
    from biomamba_jax.model.scan_options import parse_scan_impl

    scan = parse_scan_impl(impl)
    if scan.name != "pallas":
        raise SystemExit(f"--impl {impl!r}: only pallas impls have kernels to inspect")
    return scan


def _strip_locations(text: str) -> str:
    """The IR without the debug locations Pallas prints (pip's Triton cannot parse them)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#loc"):
            continue
        line = line.replace(" [unknown]", "")
        line = re.sub(r' "[^"]*"\(#loc\d+\)', "", line)
        line = re.sub(r" #loc\d+$", "", line)
        lines.append(line)
    # The module alone: the print of each module ends with a trailer of location notes.
    start = next(i for i, line in enumerate(lines) if line.startswith("module @"))
    end = max(i for i, line in enumerate(lines) if line == "}")
    return "\n".join(lines[start: end + 1]) + "\n"


def compile_sass(ir_text: str, num_warps: int, workdir: pathlib.Path, kernel: str, triton_dir: str):
    """(SASS text, registers per thread) of one kernel's IR compiled for sm_90."""
    if triton_dir not in sys.path:
        sys.path.insert(0, triton_dir)
    import triton
    from triton.backends.compiler import GPUTarget

    ir_path = workdir / f"{kernel}.ttir"
    ir_path.write_text(ir_text)
    compiled = triton.compile(str(ir_path), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=1))
    cubin = workdir / f"{kernel}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    (workdir / f"{kernel}.ptx").write_text(compiled.asm["ptx"])
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    (workdir / f"{kernel}.sass").write_text(sass)
    registers = re.search(r"REG:(\d+)", usage)
    return sass, int(registers.group(1)) if registers else None


def loops(sass: str):
    """(start, end, opcode Counter) for each backward branch in the disassembly."""
    instructions = [(int(m.group(1), 16), m.group(2).split(".")[0], m.group(3))
                    for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    found = []
    for address, opcode, rest in instructions:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if opcode == "BRA" and target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = collections.Counter(op for a, op, _ in instructions if start <= a <= address)
            found.append((start, address, body))
    return len(instructions), found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton", required=True, help="folder holding pip's triton package (see above)")
    parser.add_argument("--impl", default="pallas", help="pallas impl string, e.g. pallas:fuse=true")
    parser.add_argument("--shape", default="1,8192,1536,16", help="B,L,E,N")
    parser.add_argument("--grad", action="store_true", help="the backward's kernels too")
    parser.add_argument("--keep", help="write each kernel's IR, PTX, cubin and SASS here")
    args = parser.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    from biomamba_jax.model.scan_pallas import _tiling

    tiling = _tiling(shape[0], shape[1], shape[2], _pallas_impl(args.impl).options)
    warps = {"forward_kernel": tiling.num_warps, "backward_kernel": tiling.bwd_num_warps,
             "segment_end_kernel": tiling.sum_num_warps, "segment_start_adjoint_kernel": tiling.sum_num_warps}
    # (step, channel, state) elements one trip of each kernel's loop covers (N padded as the kernels pad it)
    d_state = 1 << max(0, (shape[3] - 1).bit_length())
    elements = {"forward_kernel": tiling.chunk * tiling.block_e * d_state,
                "backward_kernel": tiling.chunk * tiling.bwd_block_e * d_state,
                "segment_end_kernel": tiling.sum_tile * tiling.block_e * d_state,
                "segment_start_adjoint_kernel": tiling.sum_tile * tiling.block_e * d_state}
    print(f"{args.impl} at {shape}: block_e {tiling.block_e}, chunk {tiling.chunk}, sum_tile {tiling.sum_tile}, "
          f"segments {tiling.segments}/{tiling.bwd_segments}, bwd_block_e {tiling.bwd_block_e}, fuse {tiling.fuse}")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = pathlib.Path(args.keep or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for kernel, text in triton_modules(args.impl, shape, args.grad).items():
            sass, registers = compile_sass(text, warps[kernel], workdir, kernel, args.triton)
            total, found = loops(sass)
            print(f"{kernel}: {warps[kernel]} warps, {registers} registers, {total} instructions")
            for start, end, body in found:
                # Issue slots per element: what the count predicts if the loop is issue-bound
                # and occupancy holds (it misled for register-heavy kernels: see benchmarks/HISTORY.md).
                per_element = sum(body.values()) * warps[kernel] / elements[kernel]
                print(f"  loop {start:#x}-{end:#x}: {sum(body.values())} per trip, {per_element:.3f} warp "
                      "instructions per element: " + ", ".join(f"{op} {n}" for op, n in body.most_common(14)))


if __name__ == "__main__":
    main()
