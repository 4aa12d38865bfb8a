"""archkernel.host.mounts: the kernel's lists read (pure), then loop devices and mounts for real.

The pure part feeds hand-written `losetup --json` and /proc/self/mountinfo texts to the
parsers. The real part attaches small image files and mounts ext4 and tmpfs as root, and
checks what the kernel lists before, during and after each block with readers of its own
(tests/support/kernel_state.py), not with the code under test. Every real test looks only
at its own directory: other work on this machine may have loop devices and mounts too.
(tests/test_disk.py proves the same context managers on the disks archkernel makes.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.mounts import LoopInfo
from archkernel.log import log
from archkernel.units import MiB
from tests.support.kernel_state import (
    leftovers,
    loops_in,
    mount_points,
    mounts_in,
    undo_leftovers,
)

# --- losetup --json ----------------------------------------------------------------------------


def test_losetup_json_with_numbers_strings_nulls_and_a_deleted_file() -> None:
    text = json.dumps(
        {
            "loopdevices": [
                {
                    "name": "/dev/loop0",
                    "back-file": "/w/build/disk.raw",
                    "offset": 1048576,
                    "sizelimit": 536870912,
                },
                # Older util-linux prints the numbers as strings.
                {
                    "name": "/dev/loop1",
                    "back-file": "/w/a b.raw",
                    "offset": "512",
                    "sizelimit": "0",
                },
                {"name": "/dev/loop2", "back-file": "/w/old.raw (deleted)"},
                {"name": "/dev/loop3", "back-file": None, "offset": None, "sizelimit": None},
            ]
        }
    )
    assert mounts.parse_losetup_json(text) == [
        LoopInfo("/dev/loop0", "/w/build/disk.raw", 1048576, 536870912),
        LoopInfo("/dev/loop1", "/w/a b.raw", 512, 0),
        LoopInfo("/dev/loop2", "/w/old.raw", 0, 0),
        LoopInfo("/dev/loop3", "", 0, 0),
    ]


@pytest.mark.parametrize(
    "text", ["", "\n", '{"loopdevices": []}', '{\n   "loopdevices": [\n\n   ]\n}\n']
)
def test_losetup_json_without_devices(text: str) -> None:
    assert mounts.parse_losetup_json(text) == []


def test_loops_under_compares_whole_names_and_skips_devices_without_a_file() -> None:
    devices = [
        LoopInfo("/dev/loop0", "/w/build/disk.raw", 0, 0),
        LoopInfo("/dev/loop1", "/w/build2/disk.raw", 0, 0),  # shares the prefix only
        LoopInfo("/dev/loop2", "", 0, 0),
        LoopInfo("/dev/loop3", "/w/build/azure/.root.tmp-7/x.img", 0, 0),
        LoopInfo("/dev/loop4", "/w/disk.raw", 0, 0),
    ]
    assert [d.name for d in mounts.loops_under(devices, "/w/build")] == ["/dev/loop0", "/dev/loop3"]
    assert [d.name for d in mounts.loops_under(devices, "/w/build/")] == [
        "/dev/loop0",
        "/dev/loop3",
    ]
    assert mounts.loops_under(devices, "/elsewhere") == []


# --- /proc/self/mountinfo ----------------------------------------------------------------------

# The kernel writes a space, a tab, a newline and a backslash in a mount point as \040,
# \011, \012 and \134; so a name that really holds the four characters `\040` shows
# as `\134040`.
MOUNTINFO = r"""22 1 0:21 / / rw,relatime shared:1 - overlay overlay rw
30 22 0:25 / /proc rw,nosuid shared:2 - proc proc rw
40 22 7:0 / /w/build/.root.tmp-42 rw,relatime shared:3 - ext4 /dev/loop0p2 rw
41 40 0:5 / /w/build/.root.tmp-42/dev rw,nosuid shared:4 - devtmpfs udev rw
42 41 0:26 / /w/build/.root.tmp-42/dev/pts rw,nosuid shared:5 - devpts devpts rw
43 40 0:27 / /w/build/.root.tmp-42/proc rw,nosuid shared:6 - proc proc rw
44 22 0:28 / /w/build-other rw,relatime shared:7 - tmpfs tmpfs rw
45 41 0:29 / /w/build/.root.tmp-42/dev rw,relatime shared:8 - tmpfs tmpfs rw
46 22 0:30 / /w/build/with\040space rw,relatime shared:9 - tmpfs tmpfs rw
47 22 0:31 / /w/build/tab\011and\012newline rw,relatime shared:10 - tmpfs tmpfs rw
48 22 0:32 / /w/build/back\134slash\134040 rw,relatime shared:11 - tmpfs tmpfs rw
49 22 0:33 / /w/build\040x/mnt rw,relatime shared:12 - tmpfs tmpfs rw
"""


def test_mounts_under_unescapes_names_and_lists_deepest_then_latest_first() -> None:
    assert mounts.mounts_under(MOUNTINFO, "/w/build") == [
        "/w/build/.root.tmp-42/dev/pts",
        "/w/build/.root.tmp-42/dev",  # 45, mounted over 41: unmounted first
        "/w/build/.root.tmp-42/proc",
        "/w/build/.root.tmp-42/dev",  # 41
        "/w/build/back\\slash\\040",
        "/w/build/tab\tand\nnewline",
        "/w/build/with space",
        "/w/build/.root.tmp-42",
    ]


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        ("/w/build/with space", ["/w/build/with space"]),
        ("/w/build/tab\tand\nnewline", ["/w/build/tab\tand\nnewline"]),
        ("/w/build/back\\slash\\040", ["/w/build/back\\slash\\040"]),
        ("/w/build x", ["/w/build x/mnt"]),
        (
            "/w/build/.root.tmp-42/dev/",
            ["/w/build/.root.tmp-42/dev/pts"] + 2 * ["/w/build/.root.tmp-42/dev"],
        ),
        ("/w/buil", []),
        ("/w/build/.root.tmp-4", []),
    ],
)
def test_mounts_under_one_directory(directory: str, expected: list[str]) -> None:
    assert mounts.mounts_under(MOUNTINFO, directory) == expected


def test_mounts_under_everything_lists_root_last() -> None:
    found = mounts.mounts_under(MOUNTINFO, "/")
    assert len(found) == len(MOUNTINFO.splitlines())
    assert found[-1] == "/"


# --- for real ------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, checked at teardown for mounts and loop devices a test left in it (which
    are then undone, and the test fails)."""
    assert leftovers(tmp_path) == []
    yield tmp_path
    left = undo_leftovers(tmp_path)
    assert left == [], f"left behind: {left}"


def image_file(path: Path, size: int = 16 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sh(*argv: str | os.PathLike[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def sysfs(dev: Path | str, name: str) -> str:
    return Path(f"/sys/block/{Path(dev).name}/{name}").read_text().strip()


def ext4_file(path: Path, size: int = 16 * MiB) -> Path:
    image_file(path, size)
    sh("mkfs.ext4", "-q", "-F", path)
    return path


@pytest.mark.integration
@pytest.mark.root
def test_loop_device_is_attached_inside_the_block_and_detached_after(workdir: Path) -> None:
    image = image_file(workdir / "disk.img")
    before = loops_in(workdir)
    with mounts.loop_device(image) as dev:
        (attached,) = loops_in(workdir)
        assert (attached.name, attached.back_file) == (str(dev), str(image.resolve()))
        assert (attached.offset, attached.sizelimit, attached.read_only) == (0, 0, False)
        assert dev.is_block_device()
        assert int(sysfs(dev, "size")) * 512 == 16 * MiB
    assert loops_in(workdir) == before == []


@pytest.mark.integration
@pytest.mark.root
def test_loop_device_with_offset_sizelimit_and_read_only(workdir: Path) -> None:
    image = image_file(workdir / "disk.img")
    with open(image, "r+b") as f:
        f.seek(1 * MiB)
        f.write(b"ARCHKERNEL-AT-1MiB")
    with mounts.loop_device(image, offset=1 * MiB, sizelimit=4 * MiB, read_only=True) as dev:
        (attached,) = loops_in(workdir)
        assert (attached.offset, attached.sizelimit, attached.read_only) == (1 * MiB, 4 * MiB, True)
        assert int(sysfs(dev, "size")) * 512 == 4 * MiB
        assert sysfs(dev, "ro") == "1"
        with open(dev, "rb") as device:
            assert device.read(18) == b"ARCHKERNEL-AT-1MiB"  # the device starts at the offset
        with pytest.raises(OSError), open(dev, "r+b") as device:
            device.write(b"x")
            device.flush()
    assert loops_in(workdir) == []


@pytest.mark.integration
@pytest.mark.root
def test_loop_device_with_partitions_makes_and_removes_the_partition_devices(
    workdir: Path,
) -> None:
    image = image_file(workdir / "disk.img")
    subprocess.run(
        ["sfdisk", "--quiet", image], input="label: gpt\n,4MiB\n,\n", text=True, check=True
    )
    with mounts.loop_device(image, partitions=True) as dev:
        part1, part2 = Path(f"{dev}p1"), Path(f"{dev}p2")
        assert part1.is_block_device() and part2.is_block_device()
        assert int(sysfs(dev, f"{dev.name}p1/size")) * 512 == 4 * MiB
        assert int(sysfs(dev, f"{dev.name}p1/start")) * 512 == 1 * MiB  # sfdisk's alignment
    assert not part1.exists() and not part2.exists()
    assert not Path(f"/sys/block/{dev.name}/{dev.name}p1").exists()
    assert loops_in(workdir) == []


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_inside_loop_device_detaches_it(workdir: Path, error: BaseException) -> None:
    image = image_file(workdir / "disk.img")
    subprocess.run(["sfdisk", "--quiet", image], input="label: dos\n,\n", text=True, check=True)
    with pytest.raises(type(error)), mounts.loop_device(image, partitions=True) as dev:
        assert Path(f"{dev}p1").is_block_device()
        raise error
    assert not Path(f"{dev}p1").exists()
    assert loops_in(workdir) == []


def test_loop_device_of_a_directory_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file") as err, mounts.loop_device(tmp_path):
        pytest.fail("the block must not run")
    assert "create the image first" in (err.value.hint or "")


@pytest.mark.integration
@pytest.mark.root
def test_mounted_ext4_is_listed_inside_and_gone_after_and_the_data_stays(workdir: Path) -> None:
    image = ext4_file(workdir / "fs.img")
    target = workdir / "not-yet" / "mnt"  # created by mounted()
    with mounts.loop_device(image) as dev, mounts.mounted(dev, target, fstype="ext4") as point:
        assert point == target
        assert mounts_in(workdir) == [str(target)]
        (point / "hello").write_text("written through the mount\n")
    assert str(target) not in mount_points()
    assert mounts_in(workdir) == []
    assert os.listdir(target) == []  # the file went to the file system, not the directory
    assert sh("debugfs", "-R", "cat /hello", image) == "written through the mount\n"
    assert loops_in(workdir) == []


@pytest.mark.integration
@pytest.mark.root
def test_mounted_passes_its_options(workdir: Path) -> None:
    image = ext4_file(workdir / "fs.img")
    with (
        mounts.loop_device(image) as dev,
        mounts.mounted(dev, workdir / "mnt", options=("ro", "noexec")) as point,
    ):
        with pytest.raises(OSError, match="Read-only file system"):
            (point / "f").write_text("x")
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        (line,) = [ln for ln in mountinfo if ln.split(" ")[4] == str(point)]
        assert {"ro", "noexec"} <= set(line.split(" ")[5].split(","))
    assert leftovers(workdir) == []


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_inside_mounted_unmounts(workdir: Path, error: BaseException) -> None:
    with pytest.raises(type(error)), mounts.mounted("tmpfs", workdir / "mnt", fstype="tmpfs"):
        assert mounts_in(workdir) == [str(workdir / "mnt")]
        raise error
    assert mounts_in(workdir) == []


@pytest.mark.integration
@pytest.mark.root
def test_a_mount_that_fails_leaves_nothing(workdir: Path) -> None:
    not_a_file_system = image_file(workdir / "zeros.img", 1 * MiB)
    with (
        pytest.raises(UserError, match="mount"),
        mounts.loop_device(not_a_file_system) as dev,
        mounts.mounted(dev, workdir / "mnt", fstype="ext4"),
    ):
        pytest.fail("the block must not run")
    assert leftovers(workdir) == []


@pytest.mark.integration
@pytest.mark.root
def test_a_busy_tmpfs_is_detached_lazily_with_a_warning(
    workdir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "propagate", True)  # let caplog see archkernel's log
    with (
        caplog.at_level(logging.WARNING),
        mounts.mounted("tmpfs", workdir / "mnt", fstype="tmpfs") as point,
    ):
        busy = open(point / "open-file", "w")  # noqa: SIM115 - held open across the unmount
    try:
        assert mounts_in(workdir) == []
        busy.write("still writable through the open file\n")
    finally:
        busy.close()
    assert f"{point} is busy" in caplog.text and "lazily" in caplog.text


@pytest.mark.integration
@pytest.mark.root
def test_bind_mounts_show_the_host_paths_at_the_same_place_under_the_root(workdir: Path) -> None:
    host = workdir / "host"
    (host / "etc").mkdir(parents=True)
    (host / "etc" / "resolv.conf").write_text("nameserver 192.0.2.1\n")
    (host / "var").mkdir()
    root = workdir / "root"
    with mounts.bind_mounts(root, [host / "etc", host / "var"]) as points:
        inside = root / host.relative_to("/")
        assert points == [inside / "etc", inside / "var"]
        assert (inside / "etc" / "resolv.conf").read_text() == "nameserver 192.0.2.1\n"
        (inside / "var" / "written-inside").write_text("x")
        assert mounts_in(root) == [str(inside / "etc"), str(inside / "var")]
    assert mounts_in(workdir) == []
    assert (host / "var" / "written-inside").read_text() == "x"  # it went to the host's


@pytest.mark.integration
@pytest.mark.root
def test_a_relative_bind_source_undoes_the_binds_made_before_it(workdir: Path) -> None:
    (workdir / "host").mkdir()
    with (
        pytest.raises(UserError, match="is not absolute"),
        mounts.bind_mounts(workdir / "root", [workdir / "host", "dev"]),
    ):
        pytest.fail("the block must not run")
    assert mounts_in(workdir) == []


def killed_run_leaves(workdir: Path) -> tuple[str, str, Path]:
    """What `kill -9` inside the blocks would leave: (partitioned loop device, loop device
    of a deleted image, mount point with a tmpfs mounted on a tmpfs), made with the tools."""
    image = image_file(workdir / "disk.img")
    subprocess.run(["sfdisk", "--quiet", image], input="label: dos\n,\n", text=True, check=True)
    whole = sh("losetup", "--find", "--show", image).strip()
    sh("partx", "--add", whole)
    deleted = image_file(workdir / "deleted.img", 1 * MiB)
    gone = sh("losetup", "--find", "--show", deleted).strip()
    deleted.unlink()
    point = workdir / "mnt"
    point.mkdir()
    sh("mount", "-t", "tmpfs", "tmpfs", point)
    (point / "tmp").mkdir()
    sh("mount", "-t", "tmpfs", "tmpfs", point / "tmp")
    return whole, gone, point


@pytest.mark.integration
@pytest.mark.root
def test_cleanup_stale_undoes_a_killed_runs_mounts_and_loop_devices(workdir: Path) -> None:
    work = workdir / "work"
    work.mkdir()
    beside = workdir / "work-beside"  # shares the prefix: not the workdir's
    beside.mkdir()
    sh("mount", "-t", "tmpfs", "tmpfs", beside)
    try:
        whole, gone, point = killed_run_leaves(work)
        assert len(loops_in(work)) == 2 and len(mounts_in(work)) == 2
        undone = mounts.cleanup_stale(work)
        assert undone[:2] == [f"unmounted {point}/tmp", f"unmounted {point}"]
        assert sorted(undone[2:]) == sorted(
            [f"detached {whole} ({work}/disk.img)", f"detached {gone} ({work}/deleted.img)"]
        )
        assert leftovers(work) == []
        assert not Path(f"{whole}p1").exists()
        assert mounts_in(beside) == [str(beside)]  # left alone
        assert mounts.cleanup_stale(work) == []  # nothing left, nothing to do
    finally:
        sh("umount", beside)
