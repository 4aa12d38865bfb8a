"""archkernel.host.files: atomic writes, removing paths, hashing, temporary directories.

A target is always the old file, the new file or absent: these tests break writes on
purpose (an exception, Ctrl-C, a process killed with SIGKILL in the middle) and look at
what is left in the directory. The last ones mount a tmpfs for real, to prove that nothing
is ever deleted through a mount.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.files import (
    atomic_path,
    is_under,
    mount_points_under,
    remove_path,
    remove_stale_temporaries,
    replace_tree,
    sha256_file,
    temporary_directory,
    write_bytes,
    write_if_changed,
    write_text,
)

REPO = Path(__file__).resolve().parent.parent


def entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


# --- atomic_path -------------------------------------------------------------------------------


def test_the_temporary_path_is_a_new_hidden_name_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.img"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent  # the same file system: the rename is atomic
        assert tmp.name.startswith(".out.img.")
        assert not tmp.exists() and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert entries(target.parent) == ["out.img"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_inside_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, error: BaseException
) -> None:
    target = tmp_path / "out.img"
    target.write_bytes(b"old")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_bytes(b"half written")
        raise error
    assert target.read_bytes() == b"old"
    assert entries(tmp_path) == ["out.img"]


def test_an_error_inside_leaves_no_target_when_there_was_none(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "out.img") as tmp:
        tmp.write_bytes(b"half written")
        raise KeyboardInterrupt
    assert entries(tmp_path) == []


def test_an_error_inside_keeps_the_old_directory_whole(tmp_path: Path) -> None:
    target = tmp_path / "tree"
    target.mkdir()
    (target / "a").write_text("old a\n")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new b\n")
        raise KeyboardInterrupt
    assert entries(target) == ["a"]
    assert (target / "a").read_text() == "old a\n"
    assert entries(tmp_path) == ["tree"]


def test_a_directory_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "tree"
    target.mkdir()
    (target / "a").write_text("old a\n")
    (target / "sub").mkdir()
    (target / "sub" / "c").write_text("old c\n")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new b\n")
    assert entries(target) == ["b"]
    assert entries(tmp_path) == ["tree"]


def test_a_reader_of_the_old_file_keeps_reading_the_old_bytes(tmp_path: Path) -> None:
    target = tmp_path / "out.img"
    target.write_bytes(b"old contents")
    old_inode = target.stat().st_ino
    with open(target, "rb") as reader:
        write_bytes(target, b"new contents")
        assert reader.read() == b"old contents"  # replaced by a rename, not rewritten
    assert target.read_bytes() == b"new contents"
    assert target.stat().st_ino != old_inode


def _killed_inside_atomic_path(target: Path, directory: bool) -> subprocess.CompletedProcess[str]:
    """A separate process that dies by SIGKILL halfway through writing `target`."""
    if directory:
        body = "tmp.mkdir()\n    (tmp / 'half').write_text('half')\n"
    else:
        body = "tmp.write_bytes(b'half written')\n"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from archkernel.host.files import atomic_path\n"
        "with atomic_path(Path(sys.argv[1])) as tmp:\n"
        f"    {body}"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(target)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_a_killed_writer_leaves_the_old_target_and_the_next_write_clears_its_leftover(
    tmp_path: Path, directory: bool
) -> None:
    target = tmp_path / "out"
    write_text(target, "old\n")
    killed = _killed_inside_atomic_path(target, directory)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert target.read_text() == "old\n"
    (leftover,) = set(entries(tmp_path)) - {"out"}  # what SIGKILL did not let it clean up
    assert leftover.startswith(".out.")
    write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert entries(tmp_path) == ["out"]


# --- remove_stale_temporaries ------------------------------------------------------------------


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The PID of a process that is running for the length of the test."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_and_our_own_are_removed(
    tmp_path: Path, live_pid: int
) -> None:
    gone = dead_pid()
    (tmp_path / "out.img").write_text("target\n")
    (tmp_path / f".out.img.tmp-{gone}").write_text("killed writer\n")
    (tmp_path / f".out.img.old-{gone}").mkdir()  # killed between the two renames
    (tmp_path / f".out.img.old-{gone}" / "f").write_text("old tree\n")
    (tmp_path / f".out.img.tmp-{os.getpid()}").write_text("ours, from before\n")
    kept = [
        f".out.img.tmp-{live_pid}",  # another process is writing it right now
        f".other.img.tmp-{gone}",  # another target's
        ".out.img.tmp-notapid",
        f".out.img.bak-{gone}",
    ]
    for name in kept:
        (tmp_path / name).write_text("keep\n")
    remove_stale_temporaries(tmp_path / "out.img")
    assert entries(tmp_path) == sorted(["out.img", *kept])


def test_a_write_leaves_the_temporary_of_a_live_writer_alone(tmp_path: Path, live_pid: int) -> None:
    theirs = tmp_path / f".out.img.tmp-{live_pid}"
    theirs.write_text("being written by someone else\n")
    write_text(tmp_path / "out.img", "ours\n")
    assert theirs.read_text() == "being written by someone else\n"
    assert entries(tmp_path) == sorted(["out.img", theirs.name])


# --- write_bytes, write_text, write_if_changed -------------------------------------------------


def test_write_text_creates_parents_and_writes_utf8(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "motd"
    assert write_text(target, "grüß dich\n") == target
    assert target.read_bytes() == b"gr\xc3\xbc\xc3\x9f dich\n"


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o755])
def test_the_mode_is_the_one_asked_for_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old_umask = os.umask(0o077)
    try:
        write_bytes(tmp_path / "f", b"x", mode=mode)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode


def test_the_default_mode_is_0644(tmp_path: Path) -> None:
    write_bytes(tmp_path / "f", b"x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_write_if_changed_keeps_an_identical_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "modules.txt"
    assert write_if_changed(target, b"virtio_net\nnbd\n") is True  # created
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    before = target.stat()
    assert write_if_changed(target, b"virtio_net\nnbd\n") is False
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, 1_000_000_000)


@pytest.mark.parametrize("new", [b"virtio_net\nnbe\n", b"virtio_net\n", b"virtio_net\nnbd\n\n"])
def test_write_if_changed_writes_any_difference(tmp_path: Path, new: bytes) -> None:
    target = tmp_path / "modules.txt"
    target.write_bytes(b"virtio_net\nnbd\n")
    assert write_if_changed(target, new, mode=0o600) is True
    assert target.read_bytes() == new
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert entries(tmp_path) == ["modules.txt"]


# --- remove_path -------------------------------------------------------------------------------


def test_remove_path_removes_a_file_a_tree_and_accepts_a_missing_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "tree" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "tree" / "deep" / "er" / "f").write_text("x")
    (tmp_path / "tree" / "ro").mkdir(mode=0o500)  # its parent is writable: it can go
    remove_path(tmp_path / "file")
    remove_path(tmp_path / "tree")
    remove_path(tmp_path / "never-was")
    assert entries(tmp_path) == []


def test_remove_path_removes_a_symlink_and_not_what_it_points_to(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep").write_text("x")
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "dangling").symlink_to("nowhere")
    remove_path(tmp_path / "link")
    remove_path(tmp_path / "dangling")
    assert entries(tmp_path) == ["real"]
    assert entries(tmp_path / "real") == ["keep"]


# --- sha256_file -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "digest"),
    [
        (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    ],
)
def test_sha256_file_known_digests(tmp_path: Path, data: bytes, digest: str) -> None:
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == digest


@pytest.mark.parametrize("size", [(1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 17])
def test_sha256_file_across_block_boundaries(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"\x01" * (size % 256)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# --- temporary_directory -----------------------------------------------------------------------


def test_temporary_directory_is_made_under_parent_and_removed_after(tmp_path: Path) -> None:
    with temporary_directory(prefix="work-", parent=str(tmp_path)) as work:
        assert work.parent == tmp_path and work.name.startswith("work-")
        assert work.is_dir() and entries(work) == []
        (work / "sub").mkdir()
        (work / "sub" / "f").write_text("x")
    assert entries(tmp_path) == []


def test_temporary_directory_is_removed_on_ctrl_c(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), temporary_directory(parent=str(tmp_path)) as work:
        (work / "f").write_text("x")
        raise KeyboardInterrupt
    assert entries(tmp_path) == []


# --- is_under, mount_points_under --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "directory", "expected"),
    [
        ("/w/a", "/w/a", True),
        ("/w/a/b/c", "/w/a", True),
        ("/w/a/b", "/w/a/", True),
        ("/w/ab", "/w/a", False),  # a sibling that shares the prefix
        ("/w", "/w/a", False),
        ("/anything", "/", True),
    ],
)
def test_is_under_compares_whole_names(path: str, directory: str, expected: bool) -> None:
    assert is_under(path, directory) is expected


def test_mount_points_under_a_plain_directory_is_empty(tmp_path: Path) -> None:
    assert mount_points_under(tmp_path) == []


def test_mount_points_under_root_lists_root_and_proc() -> None:
    points = mount_points_under("/")
    assert "/" in points and "/proc" in points


# --- with a real mount ---------------------------------------------------------------------------


def listed_in_mountinfo(point: Path) -> bool:
    """Whether /proc/self/mountinfo lists `point` (field 5, octal escapes undone here)."""
    wanted = os.fsencode(os.path.realpath(point))
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        field = line.split(b" ")[4]
        for char in b" \t\n\\":
            field = field.replace(b"\\%03o" % char, bytes([char]))
        if field == wanted:
            return True
    return False


@pytest.fixture
def tmpfs_mounts() -> Iterator[list[Path]]:
    """The tmpfs mounts a test made with `mount_tmpfs`: any still mounted at teardown is
    unmounted, and the test fails."""
    mounted: list[Path] = []
    yield mounted
    left = [p for p in mounted if listed_in_mountinfo(p)]
    for point in reversed(left):
        subprocess.run(["umount", point], check=False)
    assert left == [], f"left mounted: {left}"


def mount_tmpfs(point: Path, mounted: list[Path]) -> None:
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", point], check=True)
    mounted.append(point)
    assert listed_in_mountinfo(point)


def umount(point: Path) -> None:
    subprocess.run(["umount", point], check=True)
    assert not listed_in_mountinfo(point)


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.parametrize("name", ["plain", "with space", "with\ttab", "back\\slash"])
def test_mount_points_under_finds_a_real_mount_whatever_its_name(
    tmp_path: Path, tmpfs_mounts: list[Path], name: str
) -> None:
    point = tmp_path / "dir" / name / "mnt"
    mount_tmpfs(point, tmpfs_mounts)
    try:
        assert mount_points_under(tmp_path / "dir") == [str(point)]
        assert mount_points_under(tmp_path / "dir" / name) == [str(point)]
        (tmp_path / "link").symlink_to(tmp_path / "dir")
        assert mount_points_under(tmp_path / "link") == [str(point)]  # found by its real path
        assert mount_points_under(tmp_path / "dir" / "other") == []
    finally:
        umount(point)
    assert mount_points_under(tmp_path) == []


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.parametrize("name", ["chroot", "chroot with space", "chroot\\2"])
def test_remove_path_refuses_a_tree_with_a_mount_inside(
    tmp_path: Path, tmpfs_mounts: list[Path], name: str
) -> None:
    tree = tmp_path / name
    point = tree / "dev"
    mount_tmpfs(point, tmpfs_mounts)
    (point / "on-the-mount").write_text("would be lost\n")
    (tree / "beside").write_text("x")
    try:
        with pytest.raises(UserError, match="is mounted inside it") as err:
            remove_path(tree)
        assert f"umount -R {point}" in (err.value.hint or "")
        assert (point / "on-the-mount").read_text() == "would be lost\n"
        assert (tree / "beside").is_file()
    finally:
        umount(point)
    remove_path(tree)
    assert entries(tmp_path) == []


@pytest.mark.integration
@pytest.mark.root
def test_temporary_directory_with_a_mount_left_inside_is_not_deleted_through_it(
    tmp_path: Path, tmpfs_mounts: list[Path]
) -> None:
    with temporary_directory(parent=str(tmp_path)) as work:
        point = work / "mnt"
        mount_tmpfs(point, tmpfs_mounts)
        (point / "f").write_text("on the mount\n")
    try:
        assert (point / "f").read_text() == "on the mount\n"  # neither it nor `work` went
        assert work.is_dir()
    finally:
        umount(point)
    remove_path(work)
    assert entries(tmp_path) == []


def test_replace_tree_puts_the_new_tree_over_a_non_empty_one(tmp_path: Path) -> None:
    target, staged, old = tmp_path / "root", tmp_path / ".root.new", tmp_path / ".root.old"
    (target / "etc").mkdir(parents=True)
    (target / "etc" / "old-file").write_text("old")
    (staged / "etc").mkdir(parents=True)
    (staged / "etc" / "new-file").write_text("new")
    old.mkdir()  # left by a killed run: cleared first
    replace_tree(staged, target, old)
    assert sorted(p.name for p in (target / "etc").iterdir()) == ["new-file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_replace_tree_without_an_old_tree_renames(tmp_path: Path) -> None:
    staged, target = tmp_path / "new", tmp_path / "root"
    staged.mkdir()
    (staged / "f").write_text("x")
    replace_tree(staged, target, tmp_path / "old")
    assert (target / "f").read_text() == "x"
    assert not staged.exists() and not (tmp_path / "old").exists()
