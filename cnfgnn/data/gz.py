"""Read files that may be gzip-compressed (the bundled data is: ``data/README.md``).

A file is treated as gzip when it starts with the gzip magic bytes, whatever its name;
pandas' readers decompress ``*.gz`` by name themselves.
"""

from __future__ import annotations

import gzip
from io import BufferedIOBase
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str | Path) -> bool:
    """True when the file starts with the gzip magic bytes."""
    with Path(path).open("rb") as f:
        return f.read(2) == GZIP_MAGIC


def open_bytes(path: str | Path) -> BufferedIOBase:
    """The file's (decompressed) bytes as a binary stream."""
    p = Path(path)
    return gzip.open(p, "rb") if is_gzip(p) else p.open("rb")


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The file's (decompressed) text."""
    with open_bytes(path) as f:
        return f.read().decode(encoding)
