"""benchmarks/kernel_sass.py without pip's Triton: the Triton IR it captures from Pallas
(what it hands the compiler) and its reading of a disassembly. The compile step itself
needs `pip install triton` and is not run here."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_sass  # noqa: E402


def test_captures_each_kernels_triton_ir_without_debug_locations():
    # 64 channels at batch 1: 2 programs of 32, so the 4k sequence is split into segments
    # and both forward kernels appear; with --grad the backward's too.
    modules = kernel_sass.triton_modules("pallas", (1, 4096, 64, 16), grad=True)
    assert set(modules) == {"forward_kernel", "segment_end_kernel", "backward_kernel",
                            "segment_start_adjoint_kernel"}
    for name, text in modules.items():
        assert text.startswith(f"module @{name} {{") and text.endswith("}\n")
        assert "#loc" not in text and "[unknown]" not in text and "\n at" not in text
        assert "ex2.approx.ftz.f32" in text  # the approximate exp, as on the GPU
    assert "tt.elementwise_inline_asm" in modules["forward_kernel"]


def test_loops_counts_one_trip_of_each_backward_branch():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FMUL R2, R3, R4 ;
        /*0020*/                   MUFU.EX2 R5, R2 ;
        /*0030*/              @!P0 FFMA R6, R5, R7, R6 ;
        /*0040*/                   ISETP.NE.AND P0, PT, R8, RZ, PT ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
    """
    total, found = kernel_sass.loops(sass)
    assert total == 7
    [(start, end, body)] = found
    assert (start, end) == (0x10, 0x50)
    assert dict(body) == {"FMUL": 1, "MUFU": 1, "FFMA": 1, "ISETP": 1, "BRA": 1}


def test_impl_takes_only_pallas_and_its_public_options():
    import pytest

    assert kernel_sass._pallas_impl("pallas:fuse=true").options.fuse is True
    with pytest.raises(SystemExit, match="only pallas impls"):
        kernel_sass._pallas_impl("chunked:chunk=64")
    with pytest.raises(ValueError, match="takes key=value options from"):
        kernel_sass._pallas_impl("pallas:block_e=16")  # the tiling follows from the shape
