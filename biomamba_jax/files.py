"""Writing files whole or not at all: a reader never sees a half-written file under its
final name, and a crash leaves only a temporary name behind."""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PARTIAL_SUFFIX", "atomic_output", "write_text_atomic", "current_umask", "apply_default_modes",
           "TextFileError", "read_text"]

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


def current_umask() -> int:
    """The process umask. POSIX has no getter: set it and put it back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_modes(directory: str | Path) -> None:
    """Give `directory` and what it holds the modes a plain open() or mkdir() would
    (0o666 / 0o777 less the umask). Some writers create their files 0o600 (safetensors,
    tempfile), which would leave an export readable by its owner only."""
    mask = current_umask()
    directory = Path(directory)
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


GZIP_MAGIC = b"\x1f\x8b"


class TextFileError(ValueError):
    """A file that cannot be read as UTF-8 text (or gzipped UTF-8 text); the message names
    the file and the fix, without a traceback's worth of codec detail."""


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents, gunzipped first when it starts with gzip's magic bytes
    (`.json.gz` or not); a UTF-8 byte-order mark is dropped.

    Raises FileNotFoundError for a missing file, TextFileError for other encodings or a
    broken gzip stream.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise TextFileError(f"{path}: truncated or corrupt gzip ({err}); download or compress it again") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TextFileError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); convert it to UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}"
        ) from None
