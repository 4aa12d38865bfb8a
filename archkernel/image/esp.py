"""The EFI system partition: a FAT32 file system made and filled inside the disk image.

Nothing is mounted and no loop device is attached (this machine's kernel cannot even mount
vfat). `mkfs.fat --offset=SECTOR` writes the file system straight into the partition of
the image file, and mtools reach it as `IMAGE@@OFFSET` (the byte offset of the
partition): `mcopy -s` fills it (making directories as needed), `mdir` lists it,
`mcopy ... -` reads a file back.
`fsck.fat` has no offset option, so `check_fat` checks a sparse copy of the partition.

The `*_argv` functions decide the commands (pure); the others run them. Only the
`Partition` of a layout from archkernel.image.disk is needed to find the file system.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from archkernel.errors import UserError
from archkernel.host.files import temporary_directory
from archkernel.host.run import run
from archkernel.image.disk import SECTOR, KiB, MiB, Partition

# FAT32 with 1 KiB clusters, pinned so the result does not depend on mkfs.fat's defaults:
# its choice for 256 MiB (4 KiB clusters) gives fewer than the 65525 clusters a FAT32
# must have, and a driver that counts clusters would then take it for FAT16.
FAT_BITS = 32
CLUSTER_SECTORS = 2
FAT32_MIN_CLUSTERS = 65525
# Room for the reserved sectors and both FATs (4 bytes per cluster each) on top.
MIN_FAT_SIZE = FAT32_MIN_CLUSTERS * CLUSTER_SECTORS * SECTOR * 9 // 8
DEFAULT_LABEL = "ESP"
# Where UEFI firmware looks for a boot loader on a removable (or any NVRAM-less) disk.
REMOVABLE_PATH_X64 = "EFI/BOOT/BOOTX64.EFI"

# Debian and Arch name both packages alike.
_PACKAGE = {
    "mkfs.fat": "dosfstools",
    "fsck.fat": "dosfstools",
    "mcopy": "mtools",
    "mdir": "mtools",
}
# mtools refuses a FAT whose sector count is not a multiple of its (made-up) track size;
# the check protects floppies and means nothing for a partition.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}
_LABEL = re.compile(r"[A-Z0-9_-][A-Z0-9 _-]{0,10}")
_VOLUME_ID = re.compile(r"([0-9A-Fa-f]{4})-?([0-9A-Fa-f]{4})")


def volume_id(value: str) -> str:
    """A FAT volume ID ('1234-ABCD' or '1234abcd') as mkfs.fat takes it: 8 hex digits."""
    match = _VOLUME_ID.fullmatch(value)
    if not match:
        raise UserError(
            f"{value!r} is not a FAT volume ID",
            "give 8 hex digits, e.g. 1234-ABCD (blkid shows it as the file system's UUID)",
        )
    return (match[1] + match[2]).upper()


def _check_label(label: str) -> str:
    if not _LABEL.fullmatch(label):
        raise UserError(
            f"{label!r} is not a FAT volume label",
            "use up to 11 upper-case letters, digits, '_' or '-', e.g. ESP",
        )
    return label


def mtools_image(image: Path, partition: Partition) -> str:
    """`image` with the partition's byte offset in mtools' `IMAGE@@OFFSET` syntax."""
    name = os.fspath(image)
    if "@@" in name:
        # mtools splits the name at '@@'.
        raise UserError(f"the image path {name} contains '@@'", "use a path without '@@'")
    return f"{name}@@{partition.start}"


def mkfs_argv(
    image: Path, partition: Partition, *, label: str = DEFAULT_LABEL, volume: str | None = None
) -> list[str]:
    """The mkfs.fat command that makes a FAT32 filling `partition` of `image`.

    `-h` records the partition's start as the hidden sectors, as a formatter working on
    the partition device would; `volume` is the volume ID (random when None).
    """
    first = partition.start // SECTOR
    argv = ["mkfs.fat", "-F", str(FAT_BITS), "-S", str(SECTOR), "-s", str(CLUSTER_SECTORS)]
    argv += ["-h", str(first), f"--offset={first}", "-n", _check_label(label)]
    if volume is not None:
        argv += ["-i", volume_id(volume)]
    # The size is in 1 KiB blocks; without it mkfs.fat would run to the end of the file.
    return [*argv, os.fspath(image), str(partition.size // KiB)]


def copy_argv(
    image: Path, partition: Partition, sources: Sequence[Path], directory: str = "/"
) -> list[str]:
    """The mcopy command that copies `sources` (files or whole directories) into
    `directory` of the FAT, replacing files of the same name and keeping their times."""
    argv = ["mcopy", "-s", "-m", "-Q", "-D", "o", "-i", mtools_image(image, partition)]
    target = "::/" + directory.strip("/")
    return [*argv, *(os.fspath(s) for s in sources), target.rstrip("/") + "/"]


def read_argv(image: Path, partition: Partition, path: str) -> list[str]:
    """The mcopy command that writes the file `path` of the FAT to standard output."""
    return ["mcopy", "-n", "-i", mtools_image(image, partition), "::/" + path.lstrip("/"), "-"]


def list_argv(image: Path, partition: Partition) -> list[str]:
    """The mdir command that lists every file and directory of the FAT, one path a line."""
    return ["mdir", "-/", "-b", "-i", mtools_image(image, partition), "::/"]


def fsck_argv(fat_image: Path) -> list[str]:
    """The fsck.fat command that checks the FAT in `fat_image` without changing it."""
    return ["fsck.fat", "-n", os.fspath(fat_image)]


def parse_listing(text: str) -> list[str]:
    """`mdir -/ -b` output as paths from the FAT's root, directories ending in '/'."""
    return [line.removeprefix("::/") for line in text.splitlines() if line.startswith("::/")]


def _mtools(
    argv: list[str], *, check: bool = True, stdout_file: int | None = None
) -> tuple[int, str, str]:
    proc = _run_tool(
        argv, env=MTOOLS_ENV, capture=stdout_file is None, stdout_file=stdout_file, check=check
    )
    return proc.returncode, proc.stdout, proc.stderr


def _run_tool(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """run(), with the package to install when the tool is missing (run.PACKAGES does not
    know them all)."""
    try:
        return run(argv, **kwargs)
    except UserError as exc:
        if not exc.message.startswith("command not found"):
            raise
        package = _PACKAGE.get(argv[0], argv[0])
        raise UserError(
            exc.message, f"install '{package}' (so named on Arch Linux and Debian/Ubuntu)"
        ) from exc


def _check_inside(image: Path, partition: Partition) -> None:
    try:
        size = os.stat(image).st_size
    except OSError as exc:
        raise UserError(f"cannot read {image}: {exc.strerror}", "create the disk first") from exc
    if partition.end > size:
        raise UserError(
            f"partition {partition.number} ends at byte {partition.end}, beyond the end of "
            f"{image} ({size} bytes)",
            "use the layout the disk was created with",
        )


def make_fat(
    image: Path,
    partition: Partition,
    *,
    label: str = DEFAULT_LABEL,
    volume: str | None = None,
    tree: Path | None = None,
) -> None:
    """Make a FAT32 file system filling `partition` of `image`, with the files of `tree`.

    The image file must already hold the partition (create_disk); nothing outside the
    partition is written. `volume` is the volume ID (see `volume_id`).
    """
    if partition.size < MIN_FAT_SIZE:
        raise UserError(
            f"partition {partition.number} ({partition.size // MiB} MiB) is too small for FAT32",
            f"use a partition of at least {-(-MIN_FAT_SIZE // MiB)} MiB (plan_layout's ESP)",
        )
    _check_inside(image, partition)
    argv = mkfs_argv(image, partition, label=label, volume=volume)
    # Captured: mkfs.fat prints its version on stdout even when all goes well.
    _run_tool(argv, capture=True)
    if tree is not None:
        copy_tree(image, partition, tree)


def _tree_entries(tree: Path) -> list[Path]:
    """The top-level entries of `tree`; UserError for anything FAT cannot hold."""
    if not tree.is_dir():
        raise UserError(f"{tree} is not a directory", "give the tree to copy onto the FAT")
    for directory, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = Path(directory, name)
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise UserError(
                    f"{path} is not a regular file or directory; FAT cannot hold it",
                    "put only files and directories in the tree for the ESP",
                )
    return sorted(tree.iterdir())


def copy_tree(image: Path, partition: Partition, tree: Path, directory: str = "/") -> None:
    """Copy everything in `tree` into `directory` of the FAT in `partition` of `image`.

    Directories are made as needed and merged with existing ones; files of the same name
    are replaced. Modification times are kept.
    """
    entries = _tree_entries(Path(tree))
    if entries:
        _mtools(copy_argv(image, partition, entries, directory))


def add_files(image: Path, partition: Partition, files: Mapping[str, Path]) -> None:
    """Copy each source file to its path on the FAT (`{"EFI/BOOT/BOOTX64.EFI": src}`)."""
    with temporary_directory(prefix="archkernel-esp-") as tmp:
        for dest, source in files.items():
            parts = Path(dest.strip("/")).parts
            if not parts or ".." in parts:
                raise UserError(f"{dest!r} is not a path on the ESP", "give it from the root")
            staged = tmp.joinpath(*parts)
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, staged)
        copy_tree(image, partition, tmp)


def list_files(image: Path, partition: Partition) -> list[str]:
    """Every path on the FAT in `partition` of `image`, sorted, directories ending in '/'."""
    code, out, err = _mtools(list_argv(image, partition), check=False)
    if code == 0:
        return sorted(parse_listing(out))
    # mdir fails on a FAT with nothing in it, saying the root was "not found".
    if not out.strip() and 'File "::/" not found' in err:
        return []
    raise UserError(
        f"cannot read the FAT in partition {partition.number} of {image}: "
        f"{err.strip() or f'mdir failed with exit code {code}'}",
        "make the EFI system partition first (esp.make_fat)",
    )


def read_file(image: Path, partition: Partition, path: str) -> bytes:
    """The content of the file `path` on the FAT in `partition` of `image`."""
    with temporary_directory(prefix="archkernel-esp-") as tmp:
        out = tmp / "out"
        with open(out, "wb") as f:
            code, _, err = _mtools(
                read_argv(image, partition, path), check=False, stdout_file=f.fileno()
            )
        if code != 0:
            raise UserError(
                f"cannot read {path} from the FAT in partition {partition.number} of {image}: "
                f"{err.strip()}",
                "list the files with esp.list_files",
            )
        return out.read_bytes()


def extract_partition(image: Path, partition: Partition, dest: Path) -> None:
    """Copy `partition` of `image` to the file `dest`, keeping all-zero MiBs as holes."""
    with open(image, "rb") as src, open(dest, "wb") as out:
        done = 0
        while done < partition.size:
            chunk = os.pread(src.fileno(), min(MiB, partition.size - done), partition.start + done)
            if not chunk:
                raise UserError(
                    f"{image} ends inside partition {partition.number}",
                    "use the layout the disk was created with",
                )
            if chunk.count(0) != len(chunk):
                os.pwrite(out.fileno(), chunk, done)
            done += len(chunk)
        out.truncate(partition.size)


def check_fat(image: Path, partition: Partition) -> None:
    """Run `fsck.fat -n` on the FAT in `partition` of `image`; UserError on any problem."""
    with temporary_directory(prefix="archkernel-esp-") as tmp:
        copy = tmp / "esp.img"
        extract_partition(image, partition, copy)
        proc = _run_tool(fsck_argv(copy), capture=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(
            f"    {line}" for line in (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        )
        raise UserError(
            f"fsck.fat found problems in partition {partition.number} of {image} "
            f"(exit code {proc.returncode}):\n{tail}",
            "rebuild the image from the disk step on",
        )
