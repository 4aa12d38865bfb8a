"""Disk images: partition layouts (pure), then tables, ext4 and loop devices for real.

Expected layouts are literals worked out by hand in 512-byte sectors; the real tests read
the results back with tools archkernel does not use to write them (sgdisk, debugfs).
Everything that touches the kernel (loop devices, mounts) checks that it left nothing
behind under the test's own directory: other work on this machine may have its own.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from archkernel.errors import UserError
from archkernel.host import mounts
from archkernel.host.run import missing_tools, run
from archkernel.image import disk, ext4
from archkernel.image.disk import Layout, Partition
from archkernel.plan import Run
from archkernel.units import GiB, MiB

UUID = "0b9e2c1a-5a3f-4d7e-9c41-2f6d8e7a1b3c"
SEED = "4f9990f5-b478-4c74-bfc6-38bfc0c4c293"
SIZES = {"64MiB": 64 * MiB, "1GiB": GiB, "30GiB": 30 * GiB}

needs_root = pytest.mark.root  # loop devices, mounts, device nodes


# --- plan_layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["gpt", "mbr"])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_partitions_are_aligned_inside_the_disk_and_do_not_overlap(table: str, size: int) -> None:
    layout = disk.plan_layout(size, table)
    assert layout.table == table
    assert layout.disk_size == size
    previous_end = MiB  # the first MiB holds the table (and for MBR GRUB's core.img)
    for part in layout.partitions:
        assert part.start % MiB == 0 and part.size % MiB == 0, part
        assert part.start >= previous_end, "overlaps the previous partition or the table"
        assert part.end <= size
        previous_end = part.end
    assert [p.number for p in layout.partitions] == list(range(1, len(layout.partitions) + 1))


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_gpt_has_a_bios_boot_partition_and_leaves_room_for_the_backup_gpt(size: int) -> None:
    layout = disk.plan_layout(size, "gpt")
    bios, root = layout.partitions
    assert (bios.start, bios.size, bios.role) == (MiB, MiB, "bios_boot")
    assert bios.type == "21686148-6449-6E6F-744E-656564454649"
    assert root.role == "root" and root.start == 2 * MiB
    # The backup header and its 128 entries take the last 33 sectors.
    assert root.end <= size - 33 * 512
    # ... and nothing more than the 1 MiB that holds them is left unused.
    assert root.end == size - MiB


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_mbr_root_fills_the_disk_after_the_first_mib(size: int) -> None:
    layout = disk.plan_layout(size, "mbr")
    (root,) = layout.partitions
    assert (root.start, root.end, root.type, root.role) == (MiB, size, "83", "root")


def test_the_64mib_gpt_layout_by_hand() -> None:
    assert disk.plan_layout(64 * MiB, "gpt", disk_guid="1C2B3A49-5E6D-4F80-9A1B-2C3D4E5F6071") == (
        Layout(
            "gpt",
            67_108_864,
            (
                Partition(
                    1,
                    1_048_576,
                    1_048_576,
                    "21686148-6449-6E6F-744E-656564454649",
                    "BIOS boot",
                    "bios_boot",
                ),
                Partition(
                    2, 2_097_152, 63_963_136, "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "root", "root"
                ),
            ),
            "1C2B3A49-5E6D-4F80-9A1B-2C3D4E5F6071",
        )
    )


EFI_SIZES = {"512MiB": 512 * MiB, "1GiB": GiB, "30GiB": 30 * GiB}


@pytest.mark.parametrize("boot", ["uefi", "hybrid"])
@pytest.mark.parametrize("size", EFI_SIZES.values(), ids=EFI_SIZES.keys())
def test_efi_layouts_are_aligned_typed_and_inside_the_disk(size: int, boot: str) -> None:
    layout = disk.plan_layout(size, "gpt", boot=boot)
    assert layout.boot == boot
    previous_end = MiB
    for part in layout.partitions:
        assert part.start % MiB == 0 and part.size % MiB == 0, part
        assert part.start == previous_end, "partitions follow each other without gaps"
        previous_end = part.end
    assert layout.root.end == size - MiB  # the last MiB holds the backup GPT
    esp = layout.esp
    assert (esp.size, esp.type, esp.name) == (
        256 * MiB,
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "EFI system",
    )
    assert layout.partitions[-1] == layout.root
    if boot == "hybrid":
        bios = layout.by_role("bios_boot")
        assert [p.role for p in layout.partitions] == ["bios_boot", "esp", "root"]
        assert (bios.start, bios.size, esp.start) == (MiB, MiB, 2 * MiB)
    else:
        assert [p.role for p in layout.partitions] == ["esp", "root"]
        assert esp.start == MiB and not layout.has("bios_boot")


def test_the_512mib_efi_layouts_by_hand() -> None:
    esp_type, root_type = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", disk.ROOT_X86_64_GUID
    assert disk.plan_layout(512 * MiB, "gpt", boot="uefi").partitions == (
        Partition(1, 1_048_576, 268_435_456, esp_type, "EFI system", "esp"),
        Partition(2, 269_484_032, 266_338_304, root_type, "root", "root"),
    )
    assert disk.plan_layout(512 * MiB, "gpt", boot="hybrid").partitions == (
        Partition(1, 1_048_576, 1_048_576, disk.BIOS_BOOT_GUID, "BIOS boot", "bios_boot"),
        Partition(2, 2_097_152, 268_435_456, esp_type, "EFI system", "esp"),
        Partition(3, 270_532_608, 265_289_728, root_type, "root", "root"),
    )


@pytest.mark.parametrize(
    ("table", "boot", "bios", "uefi"),
    [
        ("mbr", "bios", True, False),
        ("gpt", "bios", True, False),
        ("gpt", "uefi", False, True),
        ("gpt", "hybrid", True, True),
    ],
)
def test_what_a_layout_boots_is_read_from_its_partitions(
    table: str, boot: str, bios: bool, uefi: bool
) -> None:
    layout = disk.plan_layout(GiB, table, boot=boot)
    assert (layout.boot, layout.boots_bios, layout.boots_uefi) == (boot, bios, uefi)
    assert layout.has("esp") == uefi
    if not uefi:
        with pytest.raises(KeyError, match="no esp partition"):
            _ = layout.esp


@pytest.mark.parametrize(
    ("size", "table", "boot", "words"),
    [
        (64 * MiB + 512, "gpt", "bios", "not a whole number of MiB"),
        (0, "mbr", "bios", "not a whole number of MiB"),
        (8 * MiB, "gpt", "bios", "no room for a root partition"),
        (16 * MiB, "gpt", "bios", "no room for a root partition"),
        (3 * 1024 * GiB, "mbr", "bios", "too large for an MBR"),
        (64 * MiB, "gpt", "uefi", "no room for a root partition"),
        (274 * MiB, "gpt", "hybrid", "no room for a root partition"),
        (GiB, "mbr", "uefi", "needs a GPT partition table"),
        (GiB, "mbr", "hybrid", "needs a GPT partition table"),
        (64 * MiB, "gpt", "coreboot", "unknown boot mode"),
        (64 * MiB, "apm", "bios", "unknown partition table"),
    ],
)
def test_impossible_layouts_are_user_errors(size: int, table: str, boot: str, words: str) -> None:
    with pytest.raises(UserError) as err:
        disk.plan_layout(size, table, boot=boot)
    assert words in err.value.message
    assert err.value.hint


def test_the_smallest_disks_that_fit() -> None:
    assert disk.plan_layout(19 * MiB, "gpt").root.size == 16 * MiB
    assert disk.plan_layout(17 * MiB, "mbr").root.size == 16 * MiB
    assert disk.plan_layout(274 * MiB, "gpt", boot="uefi").root.size == 16 * MiB
    assert disk.plan_layout(275 * MiB, "gpt", boot="hybrid").root.size == 16 * MiB
    with pytest.raises(UserError, match="no room") as err:
        disk.plan_layout(273 * MiB, "gpt", boot="uefi")
    assert err.value.hint == "use a disk of at least 274 MiB"
    with pytest.raises(UserError, match="no room"):
        disk.plan_layout(16 * MiB, "mbr")


def test_a_disk_guid_needs_gpt_and_must_be_a_guid() -> None:
    with pytest.raises(UserError, match="GPT"):
        disk.plan_layout(64 * MiB, "mbr", disk_guid="1C2B3A49-5E6D-4F80-9A1B-2C3D4E5F6071")
    with pytest.raises(UserError, match="is not a GUID"):
        disk.plan_layout(64 * MiB, "gpt", disk_guid="disk-1")


# --- sfdisk_script ----------------------------------------------------------------------------


def test_sfdisk_script_for_gpt() -> None:
    layout = disk.plan_layout(64 * MiB, "gpt", disk_guid="1c2b3a49-5e6d-4f80-9a1b-2c3d4e5f6071")
    assert disk.sfdisk_script(layout) == (
        "label: gpt\n"
        "label-id: 1C2B3A49-5E6D-4F80-9A1B-2C3D4E5F6071\n"
        "unit: sectors\n"
        "sector-size: 512\n"
        "\n"
        'start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name="BIOS boot"\n'
        'start=4096, size=124928, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"\n'
    )


def test_sfdisk_script_for_a_hybrid_gpt() -> None:
    assert disk.sfdisk_script(disk.plan_layout(GiB, "gpt", boot="hybrid")) == (
        "label: gpt\n"
        "unit: sectors\n"
        "sector-size: 512\n"
        "\n"
        'start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name="BIOS boot"\n'
        'start=4096, size=524288, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system"\n'
        'start=528384, size=1566720, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"\n'
    )


def test_sfdisk_script_for_mbr_marks_root_active() -> None:
    assert disk.sfdisk_script(disk.plan_layout(1 * GiB, "mbr")) == (
        "label: dos\nunit: sectors\nsector-size: 512\n\n"
        "start=2048, size=2095104, type=83, bootable\n"
    )


def test_sfdisk_script_with_the_partitions_guids() -> None:
    layout = disk.plan_layout(
        64 * MiB,
        "gpt",
        disk_guid="1c2b3a49-5e6d-4f80-9a1b-2c3d4e5f6071",
        partition_guids={
            "bios_boot": "0699ce14-1328-4a32-b3f6-25fdc85f73a0",
            "root": "fb29d6e8-4c0e-4109-920d-b7cccd697739",
        },
    )
    assert [p.guid for p in layout.partitions] == [
        "0699CE14-1328-4A32-B3F6-25FDC85F73A0",
        "FB29D6E8-4C0E-4109-920D-B7CCCD697739",
    ]
    assert disk.sfdisk_script(layout).splitlines()[-2:] == [
        'start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name="BIOS boot", '
        "uuid=0699CE14-1328-4A32-B3F6-25FDC85F73A0",
        'start=4096, size=124928, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root", '
        "uuid=FB29D6E8-4C0E-4109-920D-B7CCCD697739",
    ]


def test_sfdisk_script_with_an_mbr_disk_signature() -> None:
    layout = disk.plan_layout(GiB, "mbr", disk_signature="0x7e9a0b18")
    assert disk.sfdisk_script(layout) == (
        "label: dos\nlabel-id: 0x7e9a0b18\nunit: sectors\nsector-size: 512\n\n"
        "start=2048, size=2095104, type=83, bootable\n"
    )


@pytest.mark.parametrize(
    ("table", "given", "words"),
    [
        ("mbr", {"partition_guids": {"root": UUID}}, "need a GPT"),
        ("gpt", {"partition_guids": {"esp": UUID}}, "a bios layout does not have: esp"),
        ("gpt", {"partition_guids": {"root": "nope"}}, "root partition GUID 'nope' is not"),
        ("gpt", {"disk_signature": "0x12345678"}, "is for an MBR partition table"),
        ("mbr", {"disk_signature": "12345678"}, "is not 0x and 8 hex digits"),
    ],
)
def test_identities_a_layout_cannot_take(table: str, given: dict[str, object], words: str) -> None:
    with pytest.raises(UserError, match=words):
        disk.plan_layout(GiB, table, **given)  # type: ignore[arg-type]


def test_mkfs_argv_pins_the_ext4_geometry_and_places_it_at_the_partition() -> None:
    root = disk.plan_layout(64 * MiB, "gpt").root
    assert ext4.mkfs_argv(Path("/w/d.raw"), root, Path("/w/root"), uuid=UUID, label="r") == [
        "mkfs.ext4", "-F", "-q", "-b", "4096", "-I", "256", "-i", "16384", "-m", "5",
        "-U", UUID, "-L", "r", "-d", "/w/root", "-E", "offset=2097152",
        "/w/d.raw", "62464k",
    ]  # fmt: skip


def test_mkfs_argv_with_a_directory_hash_seed() -> None:
    root = disk.plan_layout(64 * MiB, "gpt").root
    argv = ext4.mkfs_argv(
        Path("/w/d.raw"), root, Path("/w/root"), uuid=UUID, label="r", hash_seed=SEED
    )
    assert argv[argv.index("-E") + 1] == f"offset=2097152,hash_seed={SEED}"


def test_times_script_dates_the_root_and_every_inode_from_the_first_unreserved() -> None:
    assert ext4.times_script([1, 2, 7, 8, 11, 12, 40], 1700000000) == (
        "sif <2> atime @1700000000\nsif <2> ctime @1700000000\n"
        "sif <11> atime @1700000000\nsif <11> ctime @1700000000\n"
        "sif <12> atime @1700000000\nsif <12> ctime @1700000000\n"
        "sif <40> atime @1700000000\nsif <40> ctime @1700000000\n"
    )


def test_clamp_times_moves_only_later_times_back(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "old").write_text("")
    os.utime(tree / "old", (1_000_000_000, 1_000_000_000))
    (tree / "dir/new").write_text("")
    os.symlink("nowhere", tree / "link")
    assert ext4.clamp_times(tree, 1_600_000_000) == 4  # tree, dir, dir/new, link
    mtimes = {str(p.relative_to(tmp_path)): p.lstat().st_mtime for p in [tree, *tree.rglob("*")]}
    assert mtimes == {
        "tree": 1_600_000_000,
        "tree/dir": 1_600_000_000,
        "tree/dir/new": 1_600_000_000,
        "tree/old": 1_000_000_000,
        "tree/link": 1_600_000_000,
    }


def test_a_reproducible_ext4_needs_a_place_for_its_debugfs_script(tmp_path: Path) -> None:
    root = disk.plan_layout(64 * MiB, "gpt").root
    with pytest.raises(ValueError, match="scratch"):
        ext4.make_ops(tmp_path / "d.raw", root, tmp_path, uuid=UUID, epoch=1_700_000_000)
    ops = ext4.make_ops(
        tmp_path / "d.raw", root, tmp_path, uuid=UUID, epoch=1_700_000_000, scratch=tmp_path / "s"
    )
    runs = [op for op in ops if isinstance(op, Run)]
    assert [r.argv[0] for r in runs] == ["mkfs.ext4", "debugfs"]
    assert runs[0].env == {"E2FSPROGS_FAKE_TIME": "1700000000", "SOURCE_DATE_EPOCH": "1700000000"}
    assert runs[1].argv[1:4] == ("-w", "-f", str(tmp_path / "s/inode-times.debugfs"))


def test_make_ext4_refuses_a_bad_uuid(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is not a UUID"):
        ext4.make_ext4(
            tmp_path / "d.raw", disk.plan_layout(64 * MiB, "gpt").root, tmp_path, uuid="root"
        )


# --- size estimates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fs_size", "journal"),
    [
        (4 * MiB, 0),
        (64 * MiB, 4 * MiB),
        (512 * MiB, 16 * MiB),
        (30 * GiB, 128 * MiB),
        (200 * GiB, 1 * GiB),
    ],
)
def test_journal_sizes_follow_mke2fs(fs_size: int, journal: int) -> None:
    assert ext4.ext4_journal_size(fs_size) == journal


def test_the_ext4_estimate_covers_data_metadata_and_inodes() -> None:
    small = ext4.ext4_size_for(ext4.TreeUsage(bytes=10 * MiB, inodes=100))
    assert small % MiB == 0
    assert 10 * MiB < small < 64 * MiB
    big = ext4.ext4_size_for(ext4.TreeUsage(bytes=1500 * MiB, inodes=60_000))
    # 1.5 GiB of data: journal 64 MiB, inode tables ~1.6%, reserve 5%, margin 10%.
    assert 1500 * MiB * 1.15 < big < 1500 * MiB * 1.5
    # Many tiny files need inodes (one per 16 KiB) more than blocks.
    tiny = ext4.ext4_size_for(ext4.TreeUsage(bytes=10 * MiB, inodes=200_000))
    assert tiny >= 200_000 * 16384


@pytest.mark.parametrize("table", ["gpt", "mbr"])
@pytest.mark.parametrize("fs_size", [MiB, 100 * MiB, 3000 * MiB + 4096])
def test_disk_size_for_is_the_smallest_disk_whose_root_is_that_big(
    table: str, fs_size: int
) -> None:
    size = disk.disk_size_for(fs_size, table)
    assert size % MiB == 0
    assert disk.plan_layout(size, table).root.size >= fs_size
    if fs_size > 16 * MiB:
        assert disk.plan_layout(size - MiB, table).root.size < fs_size
    else:  # the smallest root plan_layout makes is 16 MiB
        with pytest.raises(UserError):
            disk.plan_layout(size - MiB, table)


@pytest.mark.parametrize("boot", ["uefi", "hybrid"])
@pytest.mark.parametrize("fs_size", [MiB, 100 * MiB, 3000 * MiB + 4096])
def test_disk_size_for_counts_the_esp(boot: str, fs_size: int) -> None:
    size = disk.disk_size_for(fs_size, "gpt", boot=boot)
    bios_size = disk.disk_size_for(fs_size, "gpt")
    # The ESP replaces (uefi) or joins (hybrid) the 1 MiB BIOS boot partition.
    assert size - bios_size == (255 * MiB if boot == "uefi" else 256 * MiB)
    assert disk.plan_layout(size, "gpt", boot=boot).root.size >= fs_size
    if fs_size > 16 * MiB:
        assert disk.plan_layout(size - MiB, "gpt", boot=boot).root.size < fs_size
    with pytest.raises(UserError, match="needs a GPT"):
        disk.disk_size_for(fs_size, "mbr", boot=boot)


def make_tree(root: Path) -> Path:
    """A small root tree with every kind of file mkfs.ext4 -d has to carry over."""
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "etc/shadow").write_text("root:*:19000::::::\n")
    os.chmod(root / "etc/shadow", 0o600)
    os.chown(root / "etc/shadow", 0, 42)
    (root / "etc/owned").write_text("x")
    os.chown(root / "etc/owned", 1234, 4321)
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + b"\0" * 5000)
    os.chmod(root / "usr/bin/tool", 0o4755)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")
    os.symlink("../../etc/shadow", root / "usr/bin/short-link")
    os.symlink("/" + "x" * 70, root / "usr/bin/long-link")
    os.symlink("usr/bin", root / "bin")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "dev/initctl", 0o600)
    return root


@needs_root
def test_tree_usage_counts_blocks_inodes_and_hard_links_once(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    usage = ext4.tree_usage(root)
    # inodes: / etc usr usr/bin dev, shadow owned tool (hard-linked: once), 3 symlinks,
    # null, initctl
    assert usage.inodes == 5 + 3 + 3 + 2
    # blocks: 5 directories, shadow, owned, tool (5004 bytes: 2 blocks), the long symlink
    assert usage.bytes == (5 + 1 + 1 + 2 + 1) * 4096
    assert ext4.tree_size(root) == usage.bytes


def test_a_missing_tree_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read the root tree"):
        ext4.tree_usage(tmp_path / "missing")


def test_a_too_small_disk_says_how_much_the_tree_needs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with open(root / "big", "wb") as f:
        f.truncate(100 * MiB)
    need = ext4.required_disk_size(root, "gpt")
    assert 100 * MiB < need < 200 * MiB
    with pytest.raises(UserError) as err:
        ext4.check_disk_size(root, 64 * MiB, "gpt")
    assert err.value.message == (
        f"disk_size 64 MiB is too small for the root tree {root}: "
        f"it needs at least {need // MiB} MiB"
    )
    ext4.check_disk_size(root, need, "gpt")  # exactly enough is enough
    # The ESP takes its share of the disk.
    assert ext4.required_disk_size(root, "gpt", boot="hybrid") == need + 256 * MiB
    with pytest.raises(UserError, match="too small"):
        ext4.check_disk_size(root, need, "gpt", boot="uefi")


# --- real images ------------------------------------------------------------------------------


def loops_under(directory: Path) -> list[mounts.LoopInfo]:
    return mounts.loops_under(mounts.list_loop_devices(), os.path.realpath(directory))


def mounts_below(directory: Path) -> list[str]:
    return mounts.mounts_under(
        Path("/proc/self/mountinfo").read_text(), os.path.realpath(directory)
    )


@pytest.fixture
def clean_kernel_state(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, checked afterwards for loop devices and mounts the test left behind."""
    yield tmp_path
    left = [d.name for d in loops_under(tmp_path)] + mounts_below(tmp_path)
    mounts.cleanup_stale(tmp_path)
    assert left == [], f"left behind: {left}"


def needs_tools(*tools: str) -> pytest.MarkDecorator:
    missing = missing_tools(tools)
    return pytest.mark.skipif(bool(missing), reason=f"missing tools: {missing}")


@pytest.mark.integration
@needs_tools("sfdisk", "sgdisk")
@pytest.mark.parametrize("table", ["gpt", "mbr"])
def test_create_disk_writes_the_planned_table(tmp_path: Path, table: str) -> None:
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(
        1 * GiB,
        table,
        disk_guid=("1C2B3A49-5E6D-4F80-9A1B-2C3D4E5F6071" if table == "gpt" else None),
    )
    disk.create_disk(image, layout)
    assert image.stat().st_size == GiB
    assert image.stat().st_blocks * 512 < 4 * MiB, "the image should stay sparse"

    listed = json.loads(run(["sfdisk", "--json", image], capture=True).stdout)["partitiontable"]
    assert listed["label"] == ("gpt" if table == "gpt" else "dos")
    assert [(p["start"], p["size"]) for p in listed["partitions"]] == (
        [(2048, 2048), (4096, 2091008)] if table == "gpt" else [(2048, 2095104)]
    )
    assert disk.read_partitions(image) == listed["partitions"]
    if table == "gpt":
        assert listed["id"] == "1C2B3A49-5E6D-4F80-9A1B-2C3D4E5F6071"
        # A second implementation agrees the GPT (both headers) is sound.
        verify = run(["sgdisk", "--verify", image], capture=True).stdout
        assert "No problems found" in verify
        printed = run(["sgdisk", "--print", image], capture=True).stdout
        assert "EF02" in printed and "BIOS boot" in printed
    else:
        assert listed["partitions"][0]["type"] == "83"
        assert listed["partitions"][0].get("bootable") is True


@pytest.mark.integration
@needs_tools("sfdisk", "sgdisk")
@pytest.mark.parametrize("boot", ["uefi", "hybrid"])
def test_create_disk_writes_efi_layouts_that_sgdisk_agrees_with(tmp_path: Path, boot: str) -> None:
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(GiB, "gpt", boot=boot)
    disk.create_disk(image, layout)
    assert "No problems found" in run(["sgdisk", "--verify", image], capture=True).stdout
    printed = run(["sgdisk", "--print", image], capture=True).stdout
    rows = [line.split() for line in printed.splitlines() if line[:4].strip().isdigit()]
    # number, first and last sector, size, unit, type code, name
    expected = [
        [str(p.number), str(p.start // 512), str(p.end // 512 - 1)] for p in layout.partitions
    ]
    assert [row[:3] for row in rows] == expected
    codes = {"bios_boot": "EF02", "esp": "EF00", "root": "8304"}
    assert [row[5] for row in rows] == [codes[p.role] for p in layout.partitions]


@pytest.mark.integration
@needs_root
@needs_tools("sfdisk", "sgdisk", "mkfs.ext4", "e2fsck", "debugfs", "blkid")
def test_make_ext4_carries_the_tree_over_without_mounting(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(64 * MiB, "gpt")
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, root, uuid=UUID, label="testroot")

    ext4.check_ext4(image, layout.root)
    assert disk.fs_uuid(image, layout.root) == UUID
    label = run(
        ["blkid", "-p", "-O", str(layout.root.start), "-s", "LABEL", "-o", "value", image],
        capture=True,
    ).stdout.strip()
    assert label == "testroot"
    # mkfs stayed inside its partition: both GPT headers are intact.
    assert "No problems found" in run(["sgdisk", "--verify", image], capture=True).stdout

    device = f"{image}?offset={layout.root.start}"

    def debugfs(command: str) -> str:
        return run(["debugfs", "-R", command, device], capture=True).stdout

    shadow = debugfs("stat /etc/shadow")
    assert "Mode:  0600" in shadow and "User:     0   Group:    42" in shadow
    assert "User:  1234   Group:  4321" in debugfs("stat /etc/owned")
    tool = debugfs("stat /usr/bin/tool")
    assert "Mode:  04755" in tool and "Links: 2" in tool
    assert (
        debugfs("stat /usr/bin/tool").split("\n")[0]
        == debugfs("stat /usr/bin/tool-again").split("\n")[0]
    ), "hard link became a copy"
    assert 'Fast link dest: "../../etc/shadow"' in debugfs("stat /usr/bin/short-link")
    assert "Type: symlink" in debugfs("stat /usr/bin/long-link")
    assert "Type: symlink" in debugfs("stat /bin")
    null = debugfs("stat /dev/null")
    assert "Type: character special" in null and "01:03" in null
    assert "Type: FIFO" in debugfs("stat /dev/initctl")
    dumped = tmp_path / "tool.out"
    run(["debugfs", "-R", f"dump /usr/bin/tool {dumped}", device])
    assert dumped.read_bytes() == (root / "usr/bin/tool").read_bytes()


@pytest.mark.integration
@needs_root
@needs_tools("sfdisk", "mkfs.ext4", "e2fsck", "debugfs")
def test_the_same_tree_makes_the_same_ext4_whenever_it_is_made(tmp_path: Path) -> None:
    epoch = 1_700_000_000
    layout = disk.plan_layout(64 * MiB, "gpt")
    images = []
    for name in ("one", "two"):
        # Two copies of one tree, made seconds apart: other change times, other inodes.
        root = make_tree(tmp_path / name / "root")
        os.utime(root / "etc/owned", (1_000_000_000, 1_000_000_000))
        image = tmp_path / name / "disk.raw"
        disk.create_disk(image, layout)
        ext4.make_ext4(image, layout.root, root, uuid=UUID, hash_seed=SEED, epoch=epoch)
        ext4.check_ext4(image, layout.root)
        images.append(image)
        time.sleep(1.1)
    one, two = (i.read_bytes()[layout.root.start : layout.root.end] for i in images)
    assert one == two

    device = f"{images[0]}?offset={layout.root.start}"
    stats = run(["debugfs", "-R", "stat /usr/bin/tool", device], capture=True).stdout
    times = [line.split(" -- ")[0].strip() for line in stats.splitlines() if "time:" in line]
    assert times == [f"{t}: 0x6553f100:00000000" for t in ("ctime", "atime", "mtime", "crtime")]
    kept = run(["debugfs", "-R", "stat /etc/owned", device], capture=True).stdout
    assert " mtime: 0x3b9aca00:" in kept, "an earlier time than the epoch stays"
    header = run(["dumpe2fs", "-h", device], capture=True, env={"TZ": "UTC"}).stdout
    assert f"Directory Hash Seed:      {SEED}" in header
    assert "Filesystem created:       Tue Nov 14 22:13:20 2023" in header


@pytest.mark.integration
@needs_root
@needs_tools("sfdisk", "mkfs.ext4", "debugfs", "blkid")
def test_files_are_read_back_from_ext4_without_mounting(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(300 * MiB, "gpt", boot="uefi")
    disk.create_disk(image, layout)
    assert disk.fs_type(image, layout.root) is None
    ext4.make_ext4(image, layout.root, root, uuid=UUID)
    assert disk.fs_type(image, layout.root) == "ext4"
    assert disk.fs_type(image, layout.esp) is None
    tool = (root / "usr/bin/tool").read_bytes()
    assert ext4.read_ext4_file(image, layout.root, "/usr/bin/tool") == tool
    with pytest.raises(UserError, match="has no file /usr/bin/missing"):
        ext4.read_ext4_file(image, layout.root, "/usr/bin/missing")
    with pytest.raises(ValueError, match="plain absolute path"):
        ext4.read_ext4_file(image, layout.root, "usr/bin/tool")
    assert loops_under(tmp_path) == [] and mounts_below(tmp_path) == []


@pytest.mark.integration
@needs_root
@needs_tools("sfdisk", "mkfs.ext4", "e2fsck")
def test_check_ext4_reads_the_partition_not_the_start_of_the_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(64 * MiB, "mbr")
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, make_tree(tmp_path / "root"), uuid=UUID)
    ext4.check_ext4(image, layout.root)
    # Break the root directory's inode (inode table of group 0) and e2fsck must notice.
    block = run(
        ["debugfs", "-R", "imap <2>", f"{image}?offset={layout.root.start}"], capture=True
    ).stdout
    number = int(block.split("located at block ")[1].split(",")[0])
    offset = int(block.split("offset ")[1].split()[0], 16)
    with open(image, "r+b") as f:
        f.seek(layout.root.start + number * 4096 + offset)
        f.write(b"\xff" * 128)
    with pytest.raises(UserError, match="e2fsck found problems"):
        ext4.check_ext4(image, layout.root)


@pytest.mark.integration
@needs_root
@needs_tools("sfdisk", "mkfs.ext4", "e2fsck")
def test_the_estimate_is_enough_for_a_tree_of_many_small_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in range(40):
        sub = root / f"d{d:02}"
        sub.mkdir(parents=True)
        for f in range(100):
            (sub / f"file-with-a-longish-name-{f:03}").write_bytes(b"z" * (f * 97))
    (root / "big").write_bytes(os.urandom(3 * MiB))
    size = ext4.required_disk_size(root, "gpt")
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(size, "gpt")
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, root, uuid=UUID)
    ext4.check_ext4(image, layout.root)


@pytest.mark.integration
@needs_root
@needs_tools("sfdisk", "mkfs.ext4")
def test_a_tree_that_does_not_fit_fails_with_mkfs_output(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "big").write_bytes(os.urandom(20 * MiB))
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(19 * MiB, "gpt")
    disk.create_disk(image, layout)
    with pytest.raises(UserError) as err:
        ext4.make_ext4(image, layout.root, root, uuid=UUID)
    assert "partition 2 (16 MiB) is too small for the root tree" in err.value.message
    assert "mkfs.ext4" in err.value.message  # what mkfs said is kept
    with pytest.raises(UserError, match="is not a directory"):
        ext4.make_ext4(image, layout.root, tmp_path / "nothing", uuid=UUID)


@pytest.mark.integration
def test_fs_uuid_of_an_empty_partition_is_a_user_error(tmp_path: Path) -> None:
    if missing_tools(["blkid"]):
        pytest.skip("no blkid")
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(20 * MiB)
    with pytest.raises(UserError, match="no file system found"):
        disk.fs_uuid(image, disk.plan_layout(19 * MiB, "gpt").root)


# --- mounts: pure parts -----------------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
60 27 7:0 / /srv/tmp/build/mnt rw,relatime - ext4 /dev/loop0 rw
61 60 0:5 / /srv/tmp/build/mnt/dev rw,relatime - devtmpfs devtmpfs rw
62 60 0:21 / /srv/tmp/build/mnt/proc rw,relatime - proc proc rw
63 61 0:24 / /srv/tmp/build/mnt/dev/pts rw,relatime - devpts devpts rw
64 27 7:1 / /srv/tmp/build\\040two/mnt rw,relatime - ext4 /dev/loop1 rw
65 60 7:2 / /srv/tmp/build/mnt rw,relatime - ext4 /dev/loop2 rw
66 27 7:3 / /srv/tmp/builder rw,relatime - ext4 /dev/loop3 rw
"""


def test_mounts_under_lists_deepest_and_latest_first() -> None:
    assert mounts.mounts_under(MOUNTINFO, "/srv/tmp/build") == [
        "/srv/tmp/build/mnt/dev/pts",
        "/srv/tmp/build/mnt/proc",
        "/srv/tmp/build/mnt/dev",
        "/srv/tmp/build/mnt",  # mounted over the one below: goes first
        "/srv/tmp/build/mnt",
    ]
    assert mounts.mounts_under(MOUNTINFO, "/srv/tmp/build two") == ["/srv/tmp/build two/mnt"]
    assert mounts.mounts_under(MOUNTINFO, "/opt") == []


def test_losetup_json_and_backing_files_under_a_directory() -> None:
    text = json.dumps(
        {
            "loopdevices": [
                {
                    "name": "/dev/loop0",
                    "back-file": "/srv/a/disk.raw",
                    "offset": 2097152,
                    "sizelimit": 63963136,
                },
                {
                    "name": "/dev/loop1",
                    "back-file": "/srv/a/old.raw (deleted)",
                    "offset": 0,
                    "sizelimit": 0,
                },
                {
                    "name": "/dev/loop2",
                    "back-file": "/srv/ab/disk.raw",
                    "offset": 0,
                    "sizelimit": 0,
                },
                {"name": "/dev/loop3", "back-file": None, "offset": None, "sizelimit": None},
            ]
        }
    )
    devices = mounts.parse_losetup_json(text)
    assert devices[0] == mounts.LoopInfo("/dev/loop0", "/srv/a/disk.raw", 2097152, 63963136)
    assert [d.name for d in mounts.loops_under(devices, "/srv/a")] == ["/dev/loop0", "/dev/loop1"]
    assert mounts.parse_losetup_json("") == []


# --- mounts: for real -------------------------------------------------------------------------


def ext4_image(tmp_path: Path, table: str = "gpt") -> tuple[Path, Layout]:
    root = tmp_path / "tree"
    root.mkdir()
    (root / "hello").write_text("hello from the image\n")
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(64 * MiB, table)
    disk.create_disk(image, layout)
    ext4.make_ext4(image, layout.root, root, uuid=UUID)
    return image, layout


Marked = TypeVar("Marked", bound=Callable[..., None])


def real_kernel(fn: Marked) -> Marked:
    """Marks for tests that attach loop devices and mount: integration, root, tools."""
    tools = needs_tools("losetup", "partx", "mount", "umount", "sfdisk", "mkfs.ext4")
    marked: Marked = pytest.mark.integration(needs_root(tools(fn)))
    return marked


@real_kernel
def test_loop_device_with_offset_mounts_the_root_partition(clean_kernel_state: Path) -> None:
    image, layout = ext4_image(clean_kernel_state)
    with mounts.loop_device(
        image, offset=layout.root.start, sizelimit=layout.root.size, read_only=True
    ) as dev:
        (info,) = loops_under(clean_kernel_state)
        assert (info.name, info.offset, info.sizelimit) == (
            os.fspath(dev),
            layout.root.start,
            layout.root.size,
        )
        with mounts.mounted(dev, clean_kernel_state / "mnt", fstype="ext4", options=("ro",)) as mnt:
            assert (mnt / "hello").read_text() == "hello from the image\n"
            assert mounts_below(clean_kernel_state) == [os.fspath(mnt)]
        assert mounts_below(clean_kernel_state) == []
    assert loops_under(clean_kernel_state) == []


@real_kernel
def test_loop_device_with_partitions_makes_partition_devices(clean_kernel_state: Path) -> None:
    image, _ = ext4_image(clean_kernel_state)
    with mounts.loop_device(image, partitions=True) as dev:
        part1, part2 = Path(f"{dev}p1"), Path(f"{dev}p2")
        assert part1.is_block_device() and part2.is_block_device()
        blkid = run(["blkid", "-p", "-s", "UUID", "-o", "value", part2], capture=True)
        assert blkid.stdout.strip() == UUID
    assert not part1.exists() and not part2.exists()
    assert loops_under(clean_kernel_state) == []


@real_kernel
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_inside_the_blocks_leaves_nothing_behind(
    clean_kernel_state: Path, error: type[BaseException]
) -> None:
    image, layout = ext4_image(clean_kernel_state)
    with (
        pytest.raises(error),
        mounts.loop_device(image, partitions=True) as whole,
        mounts.loop_device(image, offset=layout.root.start, sizelimit=layout.root.size) as dev,
        mounts.mounted(dev, clean_kernel_state / "mnt") as mnt,
    ):
        assert len(loops_under(clean_kernel_state)) == 2
        assert Path(f"{whole}p2").exists()
        assert mounts_below(clean_kernel_state) == [os.fspath(mnt)]
        raise error()
    assert mounts_below(clean_kernel_state) == []
    assert loops_under(clean_kernel_state) == []
    assert not Path(f"{whole}p2").exists()


@real_kernel
def test_a_busy_mount_is_detached_lazily(clean_kernel_state: Path) -> None:
    image, layout = ext4_image(clean_kernel_state)
    with mounts.loop_device(image, offset=layout.root.start, sizelimit=layout.root.size) as dev:
        with mounts.mounted(dev, clean_kernel_state / "mnt") as mnt:
            busy = open(mnt / "hello")  # noqa: SIM115 - held open across the unmount
        busy.close()
        assert mounts_below(clean_kernel_state) == []


@real_kernel
def test_bind_mounts_are_undone_in_reverse(clean_kernel_state: Path) -> None:
    root = clean_kernel_state / "chroot"
    host_dir = clean_kernel_state / "host"
    (host_dir / "inner").mkdir(parents=True)
    (host_dir / "inner/file").write_text("bound")
    with mounts.bind_mounts(root, [host_dir, host_dir / "inner"]) as points:
        inside = root / host_dir.relative_to("/")
        assert points == [inside, inside / "inner"]
        assert (inside / "inner/file").read_text() == "bound"
        assert len(mounts_below(root)) == 2
    assert mounts_below(clean_kernel_state) == []
    with pytest.raises(UserError, match="not absolute"), mounts.bind_mounts(root, ["proc"]):
        pass


@real_kernel
def test_cleanup_stale_undoes_what_a_killed_run_left(clean_kernel_state: Path) -> None:
    image, layout = ext4_image(clean_kernel_state)
    # What a `kill -9` in the middle of the blocks above would leave behind.
    whole = run(["losetup", "--find", "--show", image], capture=True).stdout.strip()
    run(["partx", "--add", whole])
    dev = run(
        [
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(layout.root.start),
            "--sizelimit",
            str(layout.root.size),
            image,
        ],
        capture=True,
    ).stdout.strip()
    (clean_kernel_state / "mnt").mkdir()
    run(["mount", dev, clean_kernel_state / "mnt"])
    (clean_kernel_state / "mnt/tmp").mkdir()
    run(["mount", "-t", "tmpfs", "tmpfs", clean_kernel_state / "mnt/tmp"])
    assert len(mounts_below(clean_kernel_state)) == 2

    undone = mounts.cleanup_stale(clean_kernel_state)
    assert undone[:2] == [
        f"unmounted {os.path.realpath(clean_kernel_state)}/mnt/tmp",
        f"unmounted {os.path.realpath(clean_kernel_state)}/mnt",
    ]
    assert sorted(u.split()[1] for u in undone[2:]) == sorted([whole, dev])
    assert mounts_below(clean_kernel_state) == []
    assert loops_under(clean_kernel_state) == []
    assert not Path(f"{whole}p1").exists()
    assert mounts.cleanup_stale(clean_kernel_state) == []  # nothing left: nothing to do


def test_loop_device_of_a_missing_image_is_a_user_error(tmp_path: Path) -> None:
    with (
        pytest.raises(UserError, match="no such file"),
        mounts.loop_device(tmp_path / "missing.raw"),
    ):
        pass


@real_kernel
@pytest.mark.parametrize("command", ["losetup", "mount"])
def test_ctrl_c_right_after_attaching_or_mounting_leaves_nothing_behind(
    clean_kernel_state: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, layout = ext4_image(clean_kernel_state)

    def interrupted_run(argv, **kwargs):
        result = run(argv, **kwargs)
        if argv[0] == command and ("--find" in argv or command == "mount"):
            raise KeyboardInterrupt  # after the kernel did it, before we learned of it
        return result

    monkeypatch.setattr(mounts, "run", interrupted_run)
    with (
        pytest.raises(KeyboardInterrupt),
        mounts.loop_device(image, offset=layout.root.start, sizelimit=layout.root.size) as dev,
        mounts.mounted(dev, clean_kernel_state / "mnt"),
    ):
        pytest.fail("the block must not run")
    assert mounts_below(clean_kernel_state) == []
    assert loops_under(clean_kernel_state) == []
