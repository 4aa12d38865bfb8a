"""Sizes in bytes: the binary units and the disk sector, defined once for every module."""

from __future__ import annotations

SECTOR = 512  # bytes per logical sector, for partition tables and VHD geometry alike
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
