"""Sparse files with data at chosen offsets, for the VHD and sparse-copy tests."""

from __future__ import annotations

from pathlib import Path


def sparse_file(path: Path, size: int) -> Path:
    """A file of `size` bytes that is all hole."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def write_at(path: Path, chunks: dict[int, bytes]) -> None:
    """Write each chunk of `chunks` at its offset in `path`."""
    with open(path, "r+b") as f:
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
