"""Writing files whole or not at all: a reader never sees a half-written file under its
final name, and a crash leaves only a temporary name behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PARTIAL_SUFFIX", "atomic_output", "write_text_atomic"]

PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    A crash mid-write leaves a `*.partial` file, never a truncated file under the final
    name, so "the file exists" always means "the file is complete".
    """
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` (creating its folder) through `atomic_output`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as partial:
        partial.write_text(text)
