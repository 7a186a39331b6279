"""Which selective-scan implementation runs, and with what options, as plain data.

An impl string names an implementation and may set its options, separated by ':':
``"pallas:fuse=delta:approx_math=false"``, ``"chunked:chunk=64"``, or ``"auto"`` (the
fastest implementation on the device the scan runs on). `parse_scan_impl` checks the
name, every option's name, type and value, once, and returns a `ScanImpl`; configs keep
that and pass it down, and nothing here imports a kernel, so a config stays plain data.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Optional, Union

__all__ = ["ScanImpl", "ChunkedOptions", "PallasOptions", "MosaicOptions", "NoOptions", "IMPL_OPTIONS", "AUTO_IMPL", "DEFAULT_SCAN_IMPL",
           "parse_scan_impl"]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of an implementation that takes none (reference, associative)."""


@dataclasses.dataclass(frozen=True)
class ChunkedOptions:
    chunk: int = 128  # steps per chunk: the backward keeps one (B, E, N) state per chunk
    inner: str = "associative"  # how the steps of one chunk run: "associative" or "sequential"

    def __post_init__(self):
        if self.chunk < 1:
            raise ValueError(f"chunked scan option chunk={self.chunk}: give a positive whole number")
        if self.inner not in ("associative", "sequential"):
            raise ValueError(f"chunked scan option inner={self.inner!r}; choose associative or sequential")


@dataclasses.dataclass(frozen=True)
class PallasOptions:
    """The public options of the Pallas GPU kernels; their tiling follows from the shape.

    - fuse: how much of the work around the recurrence the kernels do. "delta": the dt
      bias and softplus (XLA then writes no fp32 copy of delta); true: also the D skip and
      the gate; false: none. "auto" picks by shape (see `scan_pallas`).
    - approx_math: the kernels' exp, softplus and sigmoid on the GPU's approximate
      ex2/lg2 instructions, as mamba_ssm's kernels are built (--use_fast_math).
    - interpret: run the kernels in Pallas' interpreter; None: unless the backend is a GPU.
    """

    fuse: Union[bool, str] = "auto"
    approx_math: bool = True
    interpret: Optional[bool] = None

    def __post_init__(self):
        if self.fuse not in (False, True, "delta", "auto"):
            raise ValueError(f"pallas scan option fuse={self.fuse!r}; choose auto, true, false or delta")


@dataclasses.dataclass(frozen=True)
class MosaicOptions:
    """The public option of the Mosaic GPU kernels (Hopper); their tiling is fixed.

    - approx_math: exp, log, softplus and sigmoid on the GPU's approximate ex2/lg2
      instructions, as mamba_ssm's kernels are built (--use_fast_math).
    """

    approx_math: bool = True


IMPL_OPTIONS: dict[str, type] = {
    "reference": NoOptions,
    "associative": NoOptions,
    "chunked": ChunkedOptions,
    "pallas": PallasOptions,
    "mosaic": MosaicOptions,
}
# What "auto" runs where: the Mosaic GPU kernels on Hopper GPUs (for the shapes they take),
# the Pallas Triton kernels on other GPUs, the portable XLA scan elsewhere
# (benchmarks/HISTORY.md has the measurements behind each).
AUTO_IMPL = {"gpu-hopper": "mosaic", "gpu": "pallas", "cpu": "chunked", "tpu": "chunked"}
# The default of `selective_scan` and of `MambaConfig.scan_impl`.
DEFAULT_SCAN_IMPL = "auto"


@dataclasses.dataclass(frozen=True)
class ScanImpl:
    """A parsed impl string. `name` may be "auto" until `resolve` is given the platform."""

    name: str
    options: object = NoOptions()

    def resolve(self, platform: str) -> "ScanImpl":
        if self.name != "auto":
            return self
        name = AUTO_IMPL.get(platform, "chunked")
        return ScanImpl(name, IMPL_OPTIONS[name]())

    def __str__(self) -> str:
        """The impl string with every option spelt out: what a run plan prints."""
        fields = dataclasses.fields(self.options) if self.name != "auto" else ()
        return ":".join([self.name] + [f"{f.name}={_option_text(getattr(self.options, f.name))}" for f in fields])


def _option_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _option_value(text: str, hint, option: str, impl: str):
    """Read `text` as the type the option's annotation asks for; say what to give if it cannot be."""
    kinds = set(typing.get_args(hint)) or {hint}  # Optional[int] -> {int, NoneType}
    lowered = text.lower()
    if type(None) in kinds and lowered == "none":
        return None
    if bool in kinds and lowered in ("true", "false"):
        return lowered == "true"
    if int in kinds and lowered.lstrip("-").isdigit():
        return int(text)
    if str in kinds:
        return text
    wanted = " or ".join(sorted({int: "a whole number", bool: "true or false", type(None): "none"}[k]
                                for k in kinds if k is not str))
    raise ValueError(f"selective-scan impl {impl!r}: option {option}={text!r}; give {wanted} "
                     f"(options are separated by ':', as in pallas:fuse=delta:approx_math=false)")


def parse_scan_impl(impl: Union[str, ScanImpl]) -> ScanImpl:
    """"chunked:chunk=64" -> ScanImpl("chunked", ChunkedOptions(chunk=64)). Unknown names,
    unknown options and bad values fail here with the valid choices named."""
    if isinstance(impl, ScanImpl):
        return impl
    if not isinstance(impl, str):
        raise ValueError(f"selective-scan impl must be a string such as 'auto' or 'pallas:fuse=delta', got {impl!r}")
    name, *pairs = impl.split(":")
    if name == "auto":
        if pairs:
            raise ValueError(f"selective-scan impl {impl!r}: 'auto' takes no options; name the impl to set them")
        return ScanImpl("auto")
    if name not in IMPL_OPTIONS:
        raise ValueError(f"unknown selective-scan impl {name!r}; choose one of {sorted(IMPL_OPTIONS) + ['auto']}")
    options_type = IMPL_OPTIONS[name]
    hints = typing.get_type_hints(options_type)
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"bad option {pair!r} in selective-scan impl {impl!r}; {name!r} takes "
                             f"key=value options from {list(hints) or 'none'}")
        values[key] = _option_value(text, hints[key], key, impl)
    return ScanImpl(name, options_type(**values))
