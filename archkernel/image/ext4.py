"""The root file system: ext4 made from a directory tree inside a partition of the image.

`make_ops` are the operations that build it with `mkfs.ext4 -d DIR -E offset=...`, so
nothing is mounted and no loop device is needed: mkfs copies files, directories,
symlinks, device nodes, FIFOs and hard links with their owners, modes, timestamps and
extended attributes.

Given a UUID, a directory hash seed and an epoch, the file system is the same bytes from the
same tree whenever it is made (`reproducible_ops`): mkfs takes the superblock's times and
each inode's creation time from E2FSPROGS_FAKE_TIME, but an inode's access and change
times from the tree's files, where the change time is the clock's. So the tree's
modification times are clamped to the epoch first, and afterwards debugfs sets every
inode's access and change time to it (`times_script`), finding the inodes in use in the
inode bitmaps (`used_inodes`). The order of the inodes follows the order in which the
host's file system lists each directory: the same on one file system, not across file
system types. `check_op` (e2fsck) and the debugfs commands read it back the same
way: e2fsprogs tools accept `IMAGE?offset=BYTES` as a device name (the `offset` I/O option
of libext2fs). Block size, inode size and inode ratio are pinned, so `required_disk_size`
can count how big a disk a tree needs whatever the host's /etc/mke2fs.conf says.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from archkernel.errors import UserError
from archkernel.formats.ext4_inodes import used_inodes
from archkernel.host.files import temporary_directory, write_text
from archkernel.host.run import command_error
from archkernel.image.disk import Partition, check_failure, disk_size_for, size_text
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
    image: Path,
    partition: Partition,
    rootdir: Path,
    *,
    uuid: str,
    label: str,
    hash_seed: str | None = None,
) -> list[str]:
    """The mkfs.ext4 command that fills `partition` of `image` with the tree `rootdir`;
    `hash_seed` is the directory hash seed (a UUID; random when None)."""
    extended = f"offset={partition.start}"
    if hash_seed is not None:
        extended += f",hash_seed={hash_seed}"
    argv = ["mkfs.ext4", "-F", "-q"]
    argv += ["-b", str(EXT4_BLOCK), "-I", str(EXT4_INODE_SIZE), "-i", str(EXT4_INODE_RATIO)]
    argv += ["-m", str(EXT4_RESERVED_PERCENT), "-U", uuid, "-L", label]
    argv += ["-d", os.fspath(rootdir), "-E", extended]
    # Without a suffix mke2fs would read the size in blocks or KiB depending on -b.
    argv += [os.fspath(image), f"{partition.size // KiB}k"]
    return argv


def _check_inputs(
    partition: Partition, rootdir: Path, uuid: str, hash_seed: str | None = None
) -> None:
    if not rootdir.is_dir():
        raise UserError(
            f"the root tree {rootdir} is not a directory",
            "run the step that builds the root tree first",
        )
    for what, value in (("file system UUID", uuid), ("directory hash seed", hash_seed)):
        try:
            if value is not None:
                UUID(value)
        except ValueError as exc:
            raise UserError(f"{what} {value!r} is not a UUID", "use uuidgen") from exc
    if partition.size % KiB:
        raise UserError(
            f"partition {partition.number} is not a whole number of KiB",
            "use a layout from plan_layout",
        )


def make_ops(
    image: Path,
    partition: Partition,
    rootdir: Path,
    *,
    uuid: str,
    label: str = DEFAULT_LABEL,
    hash_seed: str | None = None,
    epoch: int | None = None,
    scratch: Path | None = None,
) -> list[Op]:
    """Make an ext4 file system filling `partition` of `image` from the tree at `rootdir`
    (the root directory itself becomes root:root 0755).

    With an `epoch` (seconds since 1970) the file system carries no time after it, and with
    a `hash_seed` too it is the same bytes from the same tree whenever it is made: see
    `reproducible_ops`, which keeps its debugfs script in the directory `scratch`.
    """
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

    argv = mkfs_argv(image, partition, rootdir, uuid=uuid, label=label, hash_seed=hash_seed)
    check = Do(
        f"check that {rootdir} is a directory and {uuid} a UUID",
        lambda: _check_inputs(partition, rootdir, uuid, hash_seed),
    )
    if epoch is None:
        return [check, Run.of(argv, error=explain)]
    if scratch is None:
        raise ValueError("make_ops with an epoch needs a scratch directory for its debugfs script")
    clamp, times = reproducible_ops(image, partition, rootdir, epoch, Path(scratch))
    return [check, clamp, Run.of(argv, error=explain, env=fake_time_env(epoch)), *times]


def make_ext4(
    image: Path,
    partition: Partition,
    rootdir: Path,
    *,
    uuid: str,
    label: str = DEFAULT_LABEL,
    hash_seed: str | None = None,
    epoch: int | None = None,
) -> None:
    """Carry out `make_ops`: an ext4 filling `partition` of `image` from `rootdir`."""
    with temporary_directory(prefix="archkernel-ext4-") as tmp:
        ops = make_ops(
            image,
            partition,
            rootdir,
            uuid=uuid,
            label=label,
            hash_seed=hash_seed,
            epoch=epoch,
            scratch=tmp,
        )
        execute(Plan(ops))


# --- the same bytes every time ----------------------------------------------------------------

# ext4's reserved inodes end at s_first_ino (11, lost+found); the root directory is 2.
ROOT_INODE = 2


def fake_time_env(epoch: int) -> dict[str, str]:
    """The environment in which e2fsprogs takes `epoch` for the clock's time."""
    return {"E2FSPROGS_FAKE_TIME": str(epoch), "SOURCE_DATE_EPOCH": str(epoch)}


def clamp_times(rootdir: Path, epoch: int) -> int:
    """Set the modification time of every entry of the tree `rootdir` (itself included,
    symlinks not followed) that is later than `epoch` to `epoch`. Returns how many."""
    limit = epoch * 1_000_000_000
    changed = 0
    todo = [os.fspath(rootdir)]
    try:
        st = os.lstat(todo[0])
        if st.st_mtime_ns > limit:
            os.utime(todo[0], ns=(st.st_atime_ns, limit), follow_symlinks=False)
            changed += 1
        while todo:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        todo.append(entry.path)
                    if st.st_mtime_ns > limit:
                        os.utime(entry.path, ns=(st.st_atime_ns, limit), follow_symlinks=False)
                        changed += 1
    except OSError as exc:
        raise UserError(
            f"cannot set the times of the tree {rootdir}: {exc}",
            "run as root, on a file system that keeps modification times",
        ) from exc
    return changed


def read_partition(image: Path, partition: Partition) -> Callable[[int, int], bytes]:
    """A `read(offset, size)` of `partition` of `image` (for `used_inodes`)."""

    def read(offset: int, size: int) -> bytes:
        with open(image, "rb") as f:
            return os.pread(f.fileno(), size, partition.start + offset)

    return read


def times_script(inodes: list[int], epoch: int, first_ino: int = 11) -> str:
    """The debugfs commands that set the access and change times of `inodes` to `epoch`:
    the root directory and every inode from `first_ino` on (mkfs copied those times from
    the tree); the other reserved inodes are left as mkfs made them."""
    lines = []
    for ino in inodes:
        if ino == ROOT_INODE or ino >= first_ino:
            lines += [f"sif <{ino}> atime @{epoch}", f"sif <{ino}> ctime @{epoch}"]
    return "".join(line + "\n" for line in lines)


def debugfs_script_argv(image: Path, partition: Partition, script: Path) -> list[str]:
    """The debugfs command that runs the commands in the file `script` on the file system
    in `partition`, writing."""
    return ["debugfs", "-w", "-f", os.fspath(script), device(image, partition)]


def _debugfs_failed(proc: subprocess.CompletedProcess[str]) -> None:
    # debugfs exits 0 when a command fails; it says so on stderr, after its version line.
    lines = proc.stderr.splitlines()
    problems = [ln for ln in lines if ln.strip() and not ln.startswith("debugfs ")]
    if problems:
        shown = "\n".join(f"    {line}" for line in problems[:12])
        raise UserError(f"debugfs could not set the inodes' times:\n{shown}", "report this")


def reproducible_ops(
    image: Path, partition: Partition, rootdir: Path, epoch: int, scratch: Path
) -> tuple[Op, list[Op]]:
    """What makes mkfs's file system the same bytes from the same tree: the op that clamps
    the tree's times before mkfs (run mkfs itself with `fake_time_env`), and the ops that
    set every inode's access and change time after it."""
    script = scratch / "inode-times.debugfs"

    def write_script() -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        inodes = used_inodes(read_partition(image, partition))
        write_text(script, times_script(inodes, epoch))

    clamp = Do(
        f"set every modification time in {rootdir} later than {epoch} to {epoch}",
        lambda: clamp_times(rootdir, epoch),
    )
    times: list[Op] = [
        Do(
            f"write {script}: set the access and change time of every inode in use (read "
            f"from the inode bitmaps of partition {partition.number}) to {epoch}",
            write_script,
        ),
        Run.of(
            debugfs_script_argv(image, partition, script),
            capture=True,
            env=fake_time_env(epoch),
            then=_debugfs_failed,
        ),
    ]
    return clamp, times


# --- reading it back --------------------------------------------------------------------------


def e2fsck_argv(image: Path, partition: Partition) -> list[str]:
    """The e2fsck command that checks the file system in `partition` without changing it."""
    return ["e2fsck", "-f", "-n", device(image, partition)]


def check_op(image: Path, partition: Partition) -> Run:
    """`e2fsck -fn` on the file system in `partition`; UserError on any problem."""
    judge = check_failure("e2fsck", partition, image, "rebuild the image from this step on")
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
