"""The root file system: ext4 made from a directory tree inside a partition of the image.

`make_ops` are the operations that build it with `mkfs.ext4 -d DIR -E offset=...`, so
nothing is mounted and no loop device is needed: mkfs copies files, directories,
symlinks, device nodes, FIFOs and hard links with their owners, modes, timestamps and
extended attributes. `check_op` (e2fsck) and the debugfs commands read it back the same
way: e2fsprogs tools accept `IMAGE?offset=BYTES` as a device name (the `offset` I/O option
of libext2fs). Block size, inode size and inode ratio are pinned, so `required_disk_size`
can count how big a disk a tree needs whatever the host's /etc/mke2fs.conf says.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from archkernel.errors import UserError
from archkernel.host.files import temporary_directory
from archkernel.host.run import command_error
from archkernel.image.disk import Partition, disk_size_for, size_text
from archkernel.plan import Do, Op, Plan, Run, execute
from archkernel.units import KiB, MiB

EXT4_BLOCK = 4096
EXT4_INODE_SIZE = 256
EXT4_INODE_RATIO = 16384
EXT4_RESERVED_PERCENT = 5
DEFAULT_LABEL = "archroot"


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def device(image: Path, partition: Partition) -> str:
    """`image` with the partition's offset in libext2fs's `NAME?offset=BYTES` syntax."""
    name = os.fspath(image)
    if "?" in name:
        # libext2fs splits the device name at the first '?'.
        raise UserError(f"the image path {name} contains '?'", "use a path without '?'")
    return f"{name}?offset={partition.start}"


# --- making it --------------------------------------------------------------------------------


def mkfs_argv(
    image: Path, partition: Partition, rootdir: Path, *, uuid: str, label: str
) -> list[str]:
    """The mkfs.ext4 command that fills `partition` of `image` with the tree `rootdir`."""
    argv = ["mkfs.ext4", "-F", "-q"]
    argv += ["-b", str(EXT4_BLOCK), "-I", str(EXT4_INODE_SIZE), "-i", str(EXT4_INODE_RATIO)]
    argv += ["-m", str(EXT4_RESERVED_PERCENT), "-U", uuid, "-L", label]
    argv += ["-d", os.fspath(rootdir), "-E", f"offset={partition.start}"]
    # Without a suffix mke2fs would read the size in blocks or KiB depending on -b.
    argv += [os.fspath(image), f"{partition.size // KiB}k"]
    return argv


def _check_inputs(partition: Partition, rootdir: Path, uuid: str) -> None:
    if not rootdir.is_dir():
        raise UserError(
            f"the root tree {rootdir} is not a directory",
            "run the step that builds the root tree first",
        )
    try:
        UUID(uuid)
    except ValueError as exc:
        raise UserError(f"file system UUID {uuid!r} is not a UUID", "use uuidgen") from exc
    if partition.size % KiB:
        raise UserError(
            f"partition {partition.number} is not a whole number of KiB",
            "use a layout from plan_layout",
        )


def make_ops(
    image: Path, partition: Partition, rootdir: Path, *, uuid: str, label: str = DEFAULT_LABEL
) -> list[Op]:
    """Make an ext4 file system filling `partition` of `image` from the tree at `rootdir`
    (the root directory itself becomes root:root 0755)."""
    rootdir = Path(rootdir)

    def explain(argv: list[str], code: int, stderr: str) -> UserError:
        # mkfs says "Could not allocate block" or the like; say what it means.
        failed = command_error(argv, code, stderr)
        need = ext4_size_for(tree_usage(rootdir))
        if need <= partition.size:
            return failed
        return UserError(
            f"partition {partition.number} ({size_text(partition.size)}) is too small for the "
            f"root tree {rootdir}: it needs about {need // MiB} MiB; {failed.message}",
            "make the disk larger (disk_size)",
        )

    return [
        Do(
            f"check that {rootdir} is a directory and {uuid} a UUID",
            lambda: _check_inputs(partition, rootdir, uuid),
        ),
        Run.of(mkfs_argv(image, partition, rootdir, uuid=uuid, label=label), error=explain),
    ]


def make_ext4(
    image: Path, partition: Partition, rootdir: Path, *, uuid: str, label: str = DEFAULT_LABEL
) -> None:
    """Carry out `make_ops`: an ext4 filling `partition` of `image` from `rootdir`."""
    execute(Plan(make_ops(image, partition, rootdir, uuid=uuid, label=label)))


# --- reading it back --------------------------------------------------------------------------


def e2fsck_argv(image: Path, partition: Partition) -> list[str]:
    """The e2fsck command that checks the file system in `partition` without changing it."""
    return ["e2fsck", "-f", "-n", device(image, partition)]


def check_op(image: Path, partition: Partition) -> Run:
    """`e2fsck -fn` on the file system in `partition`; UserError on any problem."""

    def judge(proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode == 0:
            return
        # e2fsck reports the problems on its standard output.
        lines = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        tail = "\n".join(f"    {line}" for line in lines)
        raise UserError(
            f"e2fsck found problems in partition {partition.number} of {image} "
            f"(exit code {proc.returncode}):\n{tail}",
            "rebuild the image from this step on",
        )

    return Run.of(e2fsck_argv(image, partition), check=False, capture=True, then=judge)


def check_ext4(image: Path, partition: Partition) -> None:
    """Run `e2fsck -fn` on the file system in `partition`; raise UserError on any problem."""
    execute(Plan([check_op(image, partition)]))


def _plain(path: str) -> str:
    if not path.startswith("/") or any(c.isspace() or c in "\"'" for c in path):
        raise ValueError(f"debugfs needs a plain absolute path, not {path!r}")
    return path


def dump_argv(image: Path, partition: Partition, path: str, out: str) -> list[str]:
    """The debugfs command that copies the file `path` of the file system to `out`,
    relative to the directory it runs in (debugfs's own parsing then never sees our
    paths); it exits 0 even when there is no such file."""
    return ["debugfs", "-R", f"dump {_plain(path)} {out}", device(image, partition)]


def rdump_argv(image: Path, partition: Partition, directory: str, out: str) -> list[str]:
    """The debugfs command that copies the directory `directory` of the file system, with
    everything in it, into `out` (relative, as for `dump_argv`; it must exist)."""
    return ["debugfs", "-R", f"rdump {_plain(directory)} {out}", device(image, partition)]


def dump_op(
    image: Path, partition: Partition, path: str, dest: Path, *, missing: UserError | None = None
) -> Run:
    """Copy the file `path` of the file system in `partition` to `dest` (a name not taken
    in an existing directory); `missing` (or a UserError saying so) if there is no such
    file."""
    dest = Path(dest)

    def found(proc: subprocess.CompletedProcess[str]) -> None:
        # debugfs exits 0 when the path does not exist; only the missing output tells.
        if proc.returncode != 0 or not dest.is_file():
            raise missing or UserError(
                f"the file system in partition {partition.number} of {image} has no file {path}",
                "check that the file was in the tree the file system was made from",
            )

    argv = dump_argv(image, partition, path, dest.name)
    return Run.of(argv, check=False, capture=True, cwd=os.fspath(dest.parent), then=found)


def read_ext4_file(image: Path, partition: Partition, path: str) -> bytes:
    """The content of the regular file at `path` in the ext4 file system in `partition`.

    Read with `debugfs` through libext2fs's offset option: no mount, no loop device.
    UserError if there is no such file.
    """
    _plain(path)
    with temporary_directory(prefix="archkernel-ext4-") as tmp:
        execute(Plan([dump_op(image, partition, path, tmp / "out")]))
        return (tmp / "out").read_bytes()


# --- how big it must be -----------------------------------------------------------------------


@dataclass(frozen=True)
class TreeUsage:
    """What a directory tree takes in ext4: data and directory blocks, and inodes."""

    bytes: int
    inodes: int


def tree_usage(rootdir: Path) -> TreeUsage:
    """Count the blocks and inodes the tree at `rootdir` needs in ext4 (4 KiB blocks).

    Files count their size rounded up to blocks (hard links once), directories their
    entries (8 bytes plus the name, 4-byte aligned) in whole blocks, symlinks of 60 bytes
    or more one block; device nodes, FIFOs and short symlinks live in the inode.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    inodes = 1  # rootdir itself
    todo = [os.fspath(rootdir)]
    try:
        while todo:
            directory = todo.pop()
            dir_bytes = 24  # "." and ".."
            with os.scandir(directory) as entries:
                for entry in entries:
                    dir_bytes += 8 + _round_up(len(os.fsencode(entry.name)), 4)
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
                    elif st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    inodes += 1
                    if stat.S_ISREG(st.st_mode):
                        total += _round_up(st.st_size, EXT4_BLOCK)
                    elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:
                        total += EXT4_BLOCK
            total += _round_up(dir_bytes, EXT4_BLOCK)
    except OSError as exc:
        raise UserError(
            f"cannot read the root tree {rootdir}: {exc}",
            "run as root so every file of the tree is readable",
        ) from exc
    return TreeUsage(total, inodes)


def tree_size(rootdir: Path) -> int:
    """Bytes of data and directory blocks the tree at `rootdir` takes in ext4."""
    return tree_usage(rootdir).bytes


def ext4_journal_size(fs_size: int) -> int:
    """The journal mke2fs makes by default for a file system of `fs_size` bytes."""
    blocks = fs_size // EXT4_BLOCK
    # (fewer blocks than, journal blocks), as libext2fs's ext2fs_default_journal_size.
    for limit, journal in (
        (2048, 0),
        (32768, 1024),
        (256 * 1024, 4096),
        (512 * 1024, 8192),
        (4096 * 1024, 16384),
        (8192 * 1024, 32768),
        (16384 * 1024, 65536),
        (32768 * 1024, 131072),
    ):
        if blocks < limit:
            return journal * EXT4_BLOCK
    return 262144 * EXT4_BLOCK


def ext4_size_for(usage: TreeUsage) -> int:
    """The smallest ext4 size, in whole MiB, that holds `usage` with room to spare.

    Counts the inode tables (one 256-byte inode per 16 KiB), the journal, about 2% for
    bitmaps, group descriptors and their reserve, the 5% root reserve, and 10% margin.
    """
    size = _round_up(usage.bytes + 16 * MiB, MiB)
    # The overhead grows with the size; a few rounds settle it (it only ever grows).
    for _ in range(20):
        metadata = size * EXT4_INODE_SIZE // EXT4_INODE_RATIO + size // 50 + 4 * MiB
        need = (usage.bytes + metadata + ext4_journal_size(size)) * 100
        need //= 100 - EXT4_RESERVED_PERCENT
        need = max(need * 11 // 10, usage.inodes * EXT4_INODE_RATIO * 11 // 10)
        need = _round_up(need, MiB)
        if need <= size:
            break
        size = need
    return size


def required_disk_size(rootdir: Path, table: str, *, boot: str = "bios") -> int:
    """An estimate of the smallest disk (whole MiB) whose root partition holds `rootdir`."""
    return disk_size_for(ext4_size_for(tree_usage(rootdir)), table, boot=boot)


def check_disk_size(rootdir: Path, disk_size: int, table: str, *, boot: str = "bios") -> None:
    """Raise UserError when a `disk_size`-byte disk cannot hold the tree at `rootdir`."""
    need = required_disk_size(rootdir, table, boot=boot)
    if disk_size < need:
        raise UserError(
            f"disk_size {size_text(disk_size)} is too small for the root tree {rootdir}: "
            f"it needs at least {need // MiB} MiB",
            f"set disk_size to {need // MiB}MiB or more (Azure's default OS disk is 30720MiB)",
        )
