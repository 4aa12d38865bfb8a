"""The EFI system partition: a FAT32 file system made and filled inside the disk image.

Nothing is mounted and no loop device is attached (this machine's kernel cannot even mount
vfat). `mkfs.fat --offset=SECTOR` writes the file system straight into the partition of
the image file, and mtools reach it as `IMAGE@@OFFSET` (the byte offset of the
partition): `mcopy -s` fills it (making directories as needed), `mdir` lists it,
`mcopy ::/PATH DEST` reads a file back.
`fsck.fat` has no offset option, so `check_ops` check a sparse copy of the partition.

FAT records local times: every command here runs with TZ=UTC, so the bytes do not depend
on the host's time zone. Given an epoch, the file system is the same bytes whenever it is
made: `mkfs.fat --invariant` dates the volume label 2015-03-14 rather than now (dosfstools
4.2 ignores SOURCE_DATE_EPOCH; the volume ID given after it still counts), and mcopy -m
copies the times of the files and directories it copies (`date_tree` sets them to the
epoch), so no time comes from the clock.

The `*_argv` functions decide the commands (pure); the `*_ops` functions are the
operations of a plan (archkernel.plan) that run them, and `make_fat`, `list_files`,
`check_fat` ... carry those out at once. Only the `Partition` of a layout from
archkernel.image.disk is needed to find the file system.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.files import remove_path, temporary_directory
from archkernel.image.disk import Partition, check_failure
from archkernel.plan import Do, Op, Plan, Run, execute
from archkernel.units import SECTOR, KiB, MiB

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

# mtools refuses a FAT whose sector count is not a multiple of its (made-up) track size;
# the check protects floppies and means nothing for a partition. FAT holds local times:
# UTC's, whatever the host's zone.
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
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
    image: Path,
    partition: Partition,
    *,
    label: str = DEFAULT_LABEL,
    volume: str | None = None,
    invariant: bool = False,
) -> list[str]:
    """The mkfs.fat command that makes a FAT32 filling `partition` of `image`.

    `-h` records the partition's start as the hidden sectors, as a formatter working on
    the partition device would; `volume` is the volume ID (random when None);
    `invariant` takes no time from the clock (`--invariant`, before `-i`, which it would
    otherwise override with 1234-ABCD).
    """
    first = partition.start // SECTOR
    argv = ["mkfs.fat", *(["--invariant"] if invariant else [])]
    argv += ["-F", str(FAT_BITS), "-S", str(SECTOR), "-s", str(CLUSTER_SECTORS)]
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


def read_argv(image: Path, partition: Partition, path: str, dest: str = "-") -> list[str]:
    """The mcopy command that copies the file `path` of the FAT to the file `dest`
    (standard output: `-`)."""
    return ["mcopy", "-n", "-i", mtools_image(image, partition), "::/" + path.lstrip("/"), dest]


def list_argv(image: Path, partition: Partition) -> list[str]:
    """The mdir command that lists every file and directory of the FAT, one path a line."""
    return ["mdir", "-/", "-b", "-i", mtools_image(image, partition), "::/"]


def fsck_argv(fat_image: Path) -> list[str]:
    """The fsck.fat command that checks the FAT in `fat_image` without changing it."""
    return ["fsck.fat", "-n", os.fspath(fat_image)]


def parse_listing(text: str) -> list[str]:
    """`mdir -/ -b` output as paths from the FAT's root, directories ending in '/'."""
    return [line.removeprefix("::/") for line in text.splitlines() if line.startswith("::/")]


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


# --- making and filling it --------------------------------------------------------------------


def make_ops(
    image: Path,
    partition: Partition,
    *,
    label: str = DEFAULT_LABEL,
    volume: str | None = None,
    epoch: int | None = None,
) -> list[Op]:
    """Make a FAT32 file system filling `partition` of `image`.

    The image file must already hold the partition (disk.create_ops); nothing outside the
    partition is written. `volume` is the volume ID (see `volume_id`); with an `epoch`
    (seconds since 1970, for the files `copy_op` adds) the FAT itself takes no time from
    the clock (`mkfs_argv`'s `invariant`).
    """
    if partition.size < MIN_FAT_SIZE:
        raise UserError(
            f"partition {partition.number} ({partition.size // MiB} MiB) is too small for FAT32",
            f"use a partition of at least {-(-MIN_FAT_SIZE // MiB)} MiB (plan_layout's ESP)",
        )
    argv = mkfs_argv(image, partition, label=label, volume=volume, invariant=epoch is not None)
    return [
        Do(
            f"check that partition {partition.number} lies inside {image}",
            lambda: _check_inside(image, partition),
        ),
        # Captured: mkfs.fat prints its version on stdout even when all goes well.
        Run.of(argv, capture=True, env={"TZ": "UTC"}),
    ]


def copy_op(
    image: Path, partition: Partition, sources: Sequence[Path], directory: str = "/"
) -> Run:
    """Copy `sources` (files or whole directories) into `directory` of the FAT: directories
    are made as needed and merged with existing ones, files of the same name replaced,
    modification times kept."""
    argv = copy_argv(image, partition, sources, directory)
    return Run.of(argv, capture=True, env=MTOOLS_ENV)


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


def date_tree(tree: Path, epoch: int) -> None:
    """Date `tree` and every file and directory in it `epoch` (what `mcopy -m` copies)."""
    for directory, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            os.utime(os.path.join(directory, name), (epoch, epoch), follow_symlinks=False)
    os.utime(tree, (epoch, epoch))


def copy_tree(
    image: Path, partition: Partition, tree: Path, directory: str = "/", epoch: int | None = None
) -> None:
    """Copy everything in `tree` into `directory` of the FAT in `partition` of `image`,
    dated `epoch` when given (otherwise with the times the files have)."""
    entries = _tree_entries(Path(tree))
    if epoch is not None:
        date_tree(Path(tree), epoch)
    if entries:
        execute(Plan([copy_op(image, partition, entries, directory)]))


def make_fat(
    image: Path,
    partition: Partition,
    *,
    label: str = DEFAULT_LABEL,
    volume: str | None = None,
    tree: Path | None = None,
    epoch: int | None = None,
) -> None:
    """Carry out `make_ops`, then copy the files of `tree` (if any) onto the new FAT."""
    execute(Plan(make_ops(image, partition, label=label, volume=volume, epoch=epoch)))
    if tree is not None:
        copy_tree(image, partition, tree, epoch=epoch)


def _stage_files(staging: Path, files: Mapping[str, Path]) -> None:
    """Copy each source file to its path on the FAT under `staging` (`{"EFI/BOOT/BOOTX64.EFI":
    src}`), a fresh directory whose entries `copy_op` then copies."""
    remove_path(staging)
    staging.mkdir(parents=True)
    for dest, source in files.items():
        parts = Path(dest.strip("/")).parts
        if not parts or ".." in parts:
            raise UserError(f"{dest!r} is not a path on the ESP", "give it from the root")
        staged = staging.joinpath(*parts)
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, staged)


def add_files(
    image: Path, partition: Partition, files: Mapping[str, Path], epoch: int | None = None
) -> None:
    """Copy each source file to its path on the FAT (`{"EFI/BOOT/BOOTX64.EFI": src}`),
    dated `epoch` when given."""
    with temporary_directory(prefix="archkernel-esp-") as tmp:
        _stage_files(tmp / "tree", files)
        copy_tree(image, partition, tmp / "tree", epoch=epoch)


# --- reading it back --------------------------------------------------------------------------


def _unreadable(image: Path, partition: Partition, err: str, code: int) -> UserError:
    return UserError(
        f"cannot read the FAT in partition {partition.number} of {image}: "
        f"{err.strip() or f'mdir failed with exit code {code}'}",
        "make the EFI system partition first (esp.make_fat)",
    )


def listing(proc: subprocess.CompletedProcess[str], image: Path, partition: Partition) -> list[str]:
    """What `mdir` (`list_argv`) answered: every path on the FAT, sorted, directories
    ending in '/'; UserError if it could not read the FAT."""
    if proc.returncode == 0:
        return sorted(parse_listing(proc.stdout))
    # mdir fails on a FAT with nothing in it, saying the root was "not found".
    if not proc.stdout.strip() and 'File "::/" not found' in proc.stderr:
        return []
    raise _unreadable(image, partition, proc.stderr, proc.returncode)


def list_op(image: Path, partition: Partition, into: list[str]) -> Run:
    """Put every path on the FAT (see `listing`) into `into`."""

    def listed(proc: subprocess.CompletedProcess[str]) -> None:
        into[:] = listing(proc, image, partition)

    return Run.of(
        list_argv(image, partition), check=False, capture=True, env=MTOOLS_ENV, then=listed
    )


def list_files(image: Path, partition: Partition) -> list[str]:
    """Every path on the FAT in `partition` of `image`, sorted, directories ending in '/'."""
    found: list[str] = []
    execute(Plan([list_op(image, partition, found)]))
    return found


def read_op(image: Path, partition: Partition, path: str, dest: Path) -> Run:
    """Copy the file `path` on the FAT to the file `dest`; UserError if it cannot."""

    def unreadable(argv: list[str], code: int, err: str) -> UserError:
        return UserError(
            f"cannot read {path} from the FAT in partition {partition.number} of {image}: "
            f"{err.strip()}",
            "list the files with esp.list_files",
        )

    argv = read_argv(image, partition, path, os.fspath(dest))
    return Run.of(argv, capture=True, env=MTOOLS_ENV, error=unreadable)


def read_file(image: Path, partition: Partition, path: str) -> bytes:
    """The content of the file `path` on the FAT in `partition` of `image`."""
    with temporary_directory(prefix="archkernel-esp-") as tmp:
        execute(Plan([read_op(image, partition, path, tmp / "out")]))
        return (tmp / "out").read_bytes()


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


def check_ops(image: Path, partition: Partition, copy: Path) -> list[Op]:
    """Run `fsck.fat -n` on the FAT in `partition` of `image`, copied to `copy` first
    (fsck.fat has no offset option); UserError on any problem. The caller removes `copy`."""
    judge = check_failure("fsck.fat", partition, image, "rebuild the image from the disk step on")
    return [
        Do(
            f"copy partition {partition.number} of {image} to {copy}, a sparse file",
            lambda: extract_partition(image, partition, copy),
        ),
        Run.of(fsck_argv(copy), check=False, capture=True, then=judge),
    ]


def check_fat(image: Path, partition: Partition) -> None:
    """Run `fsck.fat -n` on the FAT in `partition` of `image`; UserError on any problem."""
    with temporary_directory(prefix="archkernel-esp-") as tmp:
        execute(Plan(check_ops(image, partition, tmp / "esp.img")))
