"""Sparse copies: holes stay holes, data arrives intact, however the kernel lets us copy.

The VHD tests (test_vhd) copy multi-GiB images through `vhd_file.from_raw`; these check
the helpers themselves on small files.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from archkernel.host import sparse
from archkernel.units import MiB
from tests.support.files import sparse_file, write_at


def test_data_extents_skip_holes(tmp_path: Path) -> None:
    raw = sparse_file(tmp_path / "disk.raw", 64 * MiB)
    write_at(raw, {8 * MiB: b"x" * MiB, 40 * MiB: b"y" * 4096})
    fd = os.open(raw, os.O_RDONLY)
    try:
        extents = list(sparse.data_extents(fd, 64 * MiB))
    finally:
        os.close(fd)
    covered = sum(end - start for start, end in extents)
    assert MiB + 4096 <= covered <= 2 * MiB  # file systems may round to their block size
    assert any(start <= 8 * MiB and end >= 9 * MiB for start, end in extents)
    assert any(start <= 40 * MiB < end for start, end in extents)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_sparse_copies_the_data_and_keeps_the_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool
) -> None:
    def no_copy_file_range(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    if not kernel_copy:
        monkeypatch.setattr(os, "copy_file_range", no_copy_file_range)
    chunks = {3 * MiB: b"a" * 4096, 9 * MiB + 7: b"b" * 100}
    raw = sparse_file(tmp_path / "disk.raw", 16 * MiB)
    write_at(raw, chunks)
    out = tmp_path / "copy.raw"
    src = os.open(raw, os.O_RDONLY)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        how = sparse.copy_sparse(src, dst, 16 * MiB)
    finally:
        os.close(src)
        os.close(dst)
    assert how in ("reflink", "extents")
    assert out.read_bytes() == raw.read_bytes()
    assert os.stat(out).st_blocks * 512 <= 4 * MiB


def test_pread_all_and_pwrite_all_round_trip(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "f", 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        sparse.pwrite_all(fd, b"hello", 4000)
        assert sparse.pread_all(fd, 5, 4000) == b"hello"
        assert sparse.pread_all(fd, 100, 4090) == b"\0" * 6  # stops at the end of the file
    finally:
        os.close(fd)
