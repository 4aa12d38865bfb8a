"""The provisioning DVD: a UDF image holding `ovf-env.xml`, as Azure attaches it.

Made with `genisoimage -udf` (Debian's `genisoimage`): a UDF file system bridged with
ISO 9660. Azure's media are UDF only, and both agents would happily mount the ISO 9660
side (cloud-init looks for `udf` and `iso9660` devices, waagent mounts `/dev/sr0` as udf
or iso9660), so an image without the `udf` module would pass here and fail on Azure:
`udf_only` turns the ISO 9660 side off by making its primary volume descriptor a set
terminator (ISO 9660 readers stop there; UDF's volume recognition skips every `CD001`
descriptor and finds its own). No mount, no root: the files are staged in a directory and
written into the image. `media_argv` decides the command, `write_media` runs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from archkernel.host.files import temporary_directory
from archkernel.host.run import run

TOOL = "genisoimage"
# The volume label Azure's provisioning media carry.
LABEL = "rd_rdfe_stable"


def media_argv(staging: Path, image: Path, label: str = LABEL) -> list[str]:
    """The command that writes the UDF (+ ISO 9660) image `image` of directory `staging`."""
    return [
        TOOL, "-quiet", "-udf", "-rational-rock", "-joliet", "-input-charset", "utf-8",
        "-volid", label, "-output", os.fspath(image), os.fspath(staging),
    ]  # fmt: skip


def write_media(files: Mapping[str, bytes], image: Path, label: str = LABEL) -> Path:
    """Write a DVD image `image` holding `files` (name -> content) at its root."""
    image.parent.mkdir(parents=True, exist_ok=True)
    with temporary_directory(prefix="archkernel-dvd-") as staging:
        for name, content in files.items():
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"not a plain file name: {name!r}")
            (staging / name).write_bytes(content)
            (staging / name).chmod(0o644)
        run(media_argv(staging, image, label))
    udf_only(image)
    return image


SECTOR = 2048
FIRST_DESCRIPTOR = 16  # ISO 9660's volume descriptors start at sector 16
PRIMARY, TERMINATOR = 1, 255


def udf_only(image: Path) -> None:
    """Hide the ISO 9660 side of the bridged image `image`: its primary volume descriptor
    becomes a set terminator. ValueError if sector 16 is not that descriptor."""
    with open(image, "r+b") as f:
        f.seek(FIRST_DESCRIPTOR * SECTOR)
        head = f.read(7)
        if head[1:6] != b"CD001" or head[0] != PRIMARY:
            raise ValueError(f"{image}: no ISO 9660 primary volume descriptor at sector 16")
        f.seek(FIRST_DESCRIPTOR * SECTOR)
        f.write(bytes([TERMINATOR]))
