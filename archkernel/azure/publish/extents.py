"""Which byte ranges of a VHD an upload sends (pure: no I/O).

A page blob is written in 512-byte pages, at most 4 MiB per request. The file's data
extents (SEEK_DATA/SEEK_HOLE) are widened to whole pages, the ranges the service already
holds (its page ranges, after an interrupted upload) are taken away, and what is left is
cut on the 4 MiB grid, so each request covers at most one 4 MiB region of the disk. The
footer (the last 512 bytes) is always sent, and last: until it is there, a partial
upload is not a VHD.
"""

from __future__ import annotations

from collections.abc import Iterable

from archkernel.units import MiB

PAGE = 512
MAX_WRITE = 4 * MiB

Range = tuple[int, int]  # [start, end) in bytes


def merge(ranges: Iterable[Range]) -> list[Range]:
    """`ranges` sorted, with overlapping and touching ones joined; empty ones dropped."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def to_pages(ranges: Iterable[Range], size: int) -> list[Range]:
    """`ranges` widened to whole 512-byte pages and clipped to `size` (a multiple of 512)."""
    if size % PAGE:
        raise ValueError(f"a page blob's size is a multiple of {PAGE}, not {size}")
    return merge((start // PAGE * PAGE, min(size, -(-end // PAGE) * PAGE)) for start, end in ranges)


def subtract(ranges: Iterable[Range], taken: Iterable[Range]) -> list[Range]:
    """What of `ranges` lies outside every range of `taken`."""
    left: list[Range] = []
    holes = merge(taken)
    for start, end in merge(ranges):
        pos = start
        for t_start, t_end in holes:
            if t_end <= pos or t_start >= end:
                continue
            if t_start > pos:
                left.append((pos, t_start))
            pos = max(pos, t_end)
            if pos >= end:
                break
        if pos < end:
            left.append((pos, end))
    return left


def split(ranges: Iterable[Range], limit: int = MAX_WRITE) -> list[Range]:
    """`ranges` cut at every multiple of `limit`: no piece crosses a `limit` boundary."""
    pieces: list[Range] = []
    for start, end in ranges:
        pos = start
        while pos < end:
            cut = min(end, (pos // limit + 1) * limit)
            pieces.append((pos, cut))
            pos = cut
    return pieces


def footer(size: int) -> Range:
    """The footer of a fixed VHD of `size` bytes (file size, footer included)."""
    return (size - PAGE, size)


def to_send(data: Iterable[Range], written: Iterable[Range], size: int) -> list[Range]:
    """The writes that upload a VHD of `size` bytes whose data lies in `data`, to a page blob
    that already holds `written`: the footer last, whatever was written."""
    foot = footer(size)
    body = subtract(to_pages(data, size), [*written, foot])
    return [*split(body), foot]


def total(ranges: Iterable[Range]) -> int:
    """How many bytes `ranges` cover (counted once)."""
    return sum(end - start for start, end in merge(ranges))
