"""The EFI system partition: mkfs.fat and mtools commands (pure), then FATs made for real.

The real tests make the FAT inside a partitioned image file and read it back with tools
archkernel does not use to write it (blkid, minfo, sgdisk, fsck.fat on a copy made with
dd), and check that nothing outside the partition changed and nothing was mounted.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.run import missing_tools, run
from archkernel.image import disk, esp
from archkernel.image.disk import Layout
from archkernel.plan import Run
from archkernel.units import GiB, MiB
from tests.support.grub import no_leftovers

IMAGE = Path("/w/disk.raw")
# The ESP of a hybrid disk: after the 1 MiB BIOS boot partition, 256 MiB from 2 MiB.
ESP = disk.plan_layout(GiB, "gpt", boot="hybrid").esp

# --- pure -------------------------------------------------------------------------------------


def test_the_esp_partition_these_tests_use() -> None:
    assert (ESP.start, ESP.size, ESP.role) == (2 * MiB, 256 * MiB, "esp")


@pytest.mark.parametrize(
    ("given", "expected"),
    [("1234-ABCD", "1234ABCD"), ("1234abcd", "1234ABCD"), ("0000-0001", "00000001")],
)
def test_volume_ids_are_8_hex_digits(given: str, expected: str) -> None:
    assert esp.volume_id(given) == expected


@pytest.mark.parametrize("bad", ["", "1234", "1234-ABCDE", "12-34ABCD", "XYZW-1234", "1234 ABCD"])
def test_volume_ids_that_are_not(bad: str) -> None:
    with pytest.raises(UserError, match="is not a FAT volume ID") as err:
        esp.volume_id(bad)
    assert "8 hex digits" in (err.value.hint or "")


def test_mtools_names_the_partition_by_its_byte_offset() -> None:
    assert esp.mtools_image(IMAGE, ESP) == "/w/disk.raw@@2097152"
    with pytest.raises(UserError, match="contains '@@'"):
        esp.mtools_image(Path("/w/a@@b.raw"), ESP)


def test_mkfs_argv_pins_fat32_and_places_it_at_the_partition() -> None:
    assert esp.mkfs_argv(IMAGE, ESP, volume="1234-abcd") == [
        "mkfs.fat", "-F", "32", "-S", "512", "-s", "2",
        "-h", "4096", "--offset=4096", "-n", "ESP", "-i", "1234ABCD",
        "/w/disk.raw", "262144",
    ]  # fmt: skip
    # No volume ID: mkfs.fat makes one up; another label.
    argv = esp.mkfs_argv(IMAGE, ESP, label="EFI-SYSTEM")
    assert "-i" not in argv and argv[argv.index("-n") + 1] == "EFI-SYSTEM"


def test_an_invariant_fat_keeps_the_volume_id_given() -> None:
    argv = esp.mkfs_argv(IMAGE, ESP, volume="AC7C-CFA3", invariant=True)
    # --invariant sets the ID 1234-ABCD: the -i after it overrides that.
    assert argv[:2] == ["mkfs.fat", "--invariant"]
    assert argv.index("--invariant") < argv.index("-i") and "AC7CCFA3" in argv


def test_with_an_epoch_the_fat_takes_no_time_from_the_clock() -> None:
    _, mkfs = esp.make_ops(IMAGE, ESP, volume="AC7C-CFA3", epoch=1_700_000_000)
    assert isinstance(mkfs, Run) and "--invariant" in mkfs.argv
    assert mkfs.env == {"TZ": "UTC"}
    _, mkfs = esp.make_ops(IMAGE, ESP, volume="AC7C-CFA3")
    assert isinstance(mkfs, Run) and "--invariant" not in mkfs.argv
    assert esp.MTOOLS_ENV["TZ"] == "UTC"


def test_date_tree_dates_files_and_directories(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "EFI/BOOT").mkdir(parents=True)
    (tree / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ")
    esp.date_tree(tree, 1_700_000_000)
    assert {p.stat().st_mtime for p in [tree, *tree.rglob("*")]} == {1_700_000_000}


@pytest.mark.parametrize("label", ["", "esp", "TWELVE-CHARS", " ESP", "A/B", "ÉSP"])
def test_labels_fat_cannot_hold_are_refused(label: str) -> None:
    with pytest.raises(UserError, match="is not a FAT volume label"):
        esp.mkfs_argv(IMAGE, ESP, label=label)


def test_mtools_commands() -> None:
    dev = "/w/disk.raw@@2097152"
    assert esp.copy_argv(IMAGE, ESP, [Path("/t/EFI"), Path("/t/loader")]) == [
        "mcopy", "-s", "-m", "-Q", "-D", "o", "-i", dev, "/t/EFI", "/t/loader", "::/",
    ]  # fmt: skip
    assert esp.copy_argv(IMAGE, ESP, [Path("/t/a.efi")], "/EFI/arch/")[-2:] == [
        "/t/a.efi",
        "::/EFI/arch/",
    ]
    assert esp.read_argv(IMAGE, ESP, "/EFI/BOOT/BOOTX64.EFI") == [
        "mcopy", "-n", "-i", dev, "::/EFI/BOOT/BOOTX64.EFI", "-",
    ]  # fmt: skip
    assert esp.list_argv(IMAGE, ESP) == ["mdir", "-/", "-b", "-i", dev, "::/"]
    assert esp.fsck_argv(Path("/t/esp.img")) == ["fsck.fat", "-n", "/t/esp.img"]


def test_parse_listing() -> None:
    out = "::/EFI/\n::/EFI/BOOT/\n::/EFI/BOOT/BOOTX64.EFI\n::/startup.nsh\n"
    assert esp.parse_listing(out) == ["EFI/", "EFI/BOOT/", "EFI/BOOT/BOOTX64.EFI", "startup.nsh"]
    assert esp.parse_listing("") == []


def test_the_removable_path_is_where_uefi_looks_without_nvram() -> None:
    assert esp.REMOVABLE_PATH_X64 == "EFI/BOOT/BOOTX64.EFI"


def test_a_partition_too_small_for_fat32_is_refused(tmp_path: Path) -> None:
    small = disk.Partition(1, MiB, 64 * MiB, disk.ESP_GUID, "EFI system", "esp")
    with pytest.raises(UserError, match="too small for FAT32") as err:
        esp.make_fat(tmp_path / "disk.raw", small)
    assert "at least 72 MiB" in (err.value.hint or "")


# --- real -------------------------------------------------------------------------------------

TOOLS = ("sfdisk", "sgdisk", "mkfs.fat", "fsck.fat", "mcopy", "mdir", "minfo", "blkid")
fat_tools = pytest.mark.skipif(
    bool(missing_tools(TOOLS)), reason="needs dosfstools, mtools, fdisk, gdisk, util-linux"
)

PATTERN = b"\xa5" * 4096


def hybrid_disk(tmp_path: Path, size: int = 300 * MiB) -> tuple[Path, Layout]:
    """A sparse hybrid disk whose BIOS boot and root partitions are filled with a pattern,
    so writes outside the ESP show."""
    image = tmp_path / "disk.raw"
    layout = disk.plan_layout(size, "gpt", boot="hybrid")
    disk.create_disk(image, layout)
    with open(image, "r+b") as f:
        for part in (layout.by_role("bios_boot"), layout.root):
            f.seek(part.start)
            f.write(PATTERN)
            f.seek(part.end - len(PATTERN))
            f.write(PATTERN)
    return image, layout


def outside_unchanged(image: Path, layout: Layout) -> None:
    with open(image, "rb") as f:
        for part in (layout.by_role("bios_boot"), layout.root):
            f.seek(part.start)
            assert f.read(len(PATTERN)) == PATTERN, part
            f.seek(part.end - len(PATTERN))
            assert f.read(len(PATTERN)) == PATTERN, part
    assert "No problems found" in run(["sgdisk", "--verify", image], capture=True).stdout
    assert image.stat().st_size == layout.disk_size


def dd_partition(image: Path, part: disk.Partition, dest: Path) -> Path:
    run(
        [
            "dd", f"if={image}", f"of={dest}", "bs=1M", "conv=sparse", "status=none",
            f"skip={part.start // MiB}", f"count={part.size // MiB}",
        ]
    )  # fmt: skip
    return dest


@pytest.mark.integration
@fat_tools
def test_make_fat_makes_a_fat32_inside_the_esp_and_nothing_else(tmp_path: Path) -> None:
    image, layout = hybrid_disk(tmp_path)
    esp.make_fat(image, layout.esp, volume="ABCD-1234")
    outside_unchanged(image, layout)
    part = layout.esp
    assert disk.fs_type(image, part) == "vfat"
    assert disk.fs_uuid(image, part) == "ABCD-1234"
    assert disk.fs_type(image, layout.root) is None
    probe = run(["blkid", "-p", "-O", str(part.start), "-o", "export", image], capture=True).stdout
    assert "VERSION=FAT32" in probe and "LABEL=ESP" in probe
    info = run(["minfo", "-i", f"{image}@@{part.start}", "::"], capture=True, env=esp.MTOOLS_ENV)
    assert "cluster size: 2 sectors" in info.stdout
    assert f"hidden sectors: {part.start // 512}" in info.stdout
    clusters = int(info.stdout.split("free clusters=")[1].split()[0])
    assert clusters > esp.FAT32_MIN_CLUSTERS, "a FAT32 by cluster count, not only by name"
    # A second implementation, on a copy made by dd, finds it sound.
    copy = dd_partition(image, part, tmp_path / "esp.img")
    run(["fsck.fat", "-n", copy])
    esp.check_fat(image, part)
    assert esp.list_files(image, part) == []
    assert image.stat().st_blocks * 512 < 16 * MiB, "the image stays sparse"
    no_leftovers(tmp_path)


@pytest.mark.integration
@fat_tools
def test_make_fat_fills_it_from_a_tree_and_files_are_added_and_replaced(tmp_path: Path) -> None:
    image, layout = hybrid_disk(tmp_path)
    tree = tmp_path / "tree"
    (tree / "EFI/BOOT").mkdir(parents=True)
    (tree / "EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ first" + os.urandom(70_000))
    (tree / "EFI/Linux").mkdir()
    (tree / "loader.conf").write_text("timeout 3\n")
    esp.make_fat(image, layout.esp, tree=tree)
    assert esp.list_files(image, layout.esp) == [
        "EFI/",
        "EFI/BOOT/",
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/Linux/",
        "loader.conf",
    ]
    first = (tree / "EFI/BOOT/BOOTX64.EFI").read_bytes()
    assert esp.read_file(image, layout.esp, "EFI/BOOT/BOOTX64.EFI") == first
    assert esp.read_file(image, layout.esp, "/loader.conf") == b"timeout 3\n"

    second = tmp_path / "second.efi"
    second.write_bytes(b"MZ second")
    long_name = tmp_path / "a long name.conf"
    long_name.write_text("x")
    esp.add_files(
        image,
        layout.esp,
        {"EFI/BOOT/BOOTX64.EFI": second, "/EFI/arch/deep/er/a long name.conf": long_name},
    )
    assert esp.read_file(image, layout.esp, "EFI/BOOT/BOOTX64.EFI") == b"MZ second"
    assert esp.read_file(image, layout.esp, "EFI/arch/deep/er/a long name.conf") == b"x"
    assert "loader.conf" in esp.list_files(image, layout.esp), "other files are kept"
    esp.check_fat(image, layout.esp)
    outside_unchanged(image, layout)
    no_leftovers(tmp_path)


@pytest.mark.integration
@fat_tools
def test_reading_what_is_not_there(tmp_path: Path) -> None:
    image, layout = hybrid_disk(tmp_path)
    with pytest.raises(UserError, match="cannot read the FAT") as err:
        esp.list_files(image, layout.esp)
    assert "esp.make_fat" in (err.value.hint or "")
    esp.make_fat(image, layout.esp)
    with pytest.raises(UserError, match=re.escape("cannot read EFI/BOOT/BOOTX64.EFI")):
        esp.read_file(image, layout.esp, "EFI/BOOT/BOOTX64.EFI")
    with pytest.raises(UserError, match="is not a path on the ESP"):
        esp.add_files(image, layout.esp, {"../x": image})


@pytest.mark.integration
@fat_tools
def test_check_fat_finds_a_damaged_fat(tmp_path: Path) -> None:
    image, layout = hybrid_disk(tmp_path)
    esp.make_fat(image, layout.esp)
    esp.check_fat(image, layout.esp)
    # The first FAT starts after the 32 reserved sectors: make its first entries differ
    # from the second FAT's.
    with open(image, "r+b") as f:
        f.seek(layout.esp.start + 32 * 512 + 12)
        f.write(b"\x77" * 16)
    with pytest.raises(UserError, match=re.escape("fsck.fat found problems in partition 2")):
        esp.check_fat(image, layout.esp)


@pytest.mark.integration
@fat_tools
def test_with_an_epoch_the_same_files_make_the_same_fat_whenever_it_is_made(
    tmp_path: Path,
) -> None:
    made = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        image, layout = hybrid_disk(tmp_path / name)
        loader = tmp_path / name / "core.efi"
        loader.write_bytes(b"MZ" + bytes(range(256)) * 64)
        esp.make_fat(image, layout.esp, volume="AC7C-CFA3", epoch=1_700_000_000)
        esp.add_files(image, layout.esp, {"EFI/BOOT/BOOTX64.EFI": loader}, epoch=1_700_000_000)
        made.append(image.read_bytes()[layout.esp.start : layout.esp.end])
        time.sleep(2.1)  # FAT counts time in two seconds
    assert made[0] == made[1]
    listing = run(
        ["mdir", "-/", "-i", f"{tmp_path / 'one/disk.raw'}@@{ESP.start}", "::/"],
        capture=True,
        env=esp.MTOOLS_ENV,
    ).stdout
    dated = [line for line in listing.splitlines() if line.startswith(("EFI", "BOOT", "."))]
    assert dated and all("2023-11-14  22:13" in line for line in dated), listing


@pytest.mark.integration
@fat_tools
def test_make_fat_refuses_what_fat_cannot_hold_and_a_short_image(tmp_path: Path) -> None:
    image, layout = hybrid_disk(tmp_path)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "link").symlink_to("/etc/hostname")
    with pytest.raises(UserError, match="not a regular file or directory"):
        esp.make_fat(image, layout.esp, tree=tree)
    with pytest.raises(UserError, match="is not a directory"):
        esp.copy_tree(image, layout.esp, tmp_path / "missing")
    os.truncate(image, 100 * MiB)
    with pytest.raises(UserError, match="beyond the end of"):
        esp.make_fat(image, layout.esp)


def test_missing_tools_are_named_with_their_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", os.fspath(tmp_path))
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    os.truncate(image, GiB)
    with pytest.raises(UserError, match=re.escape("command not found: mkfs.fat")) as err:
        esp.make_fat(image, ESP)
    assert "dosfstools" in (err.value.hint or "")
    with pytest.raises(UserError, match="command not found: mdir") as err:
        esp.list_files(image, ESP)
    assert "mtools" in (err.value.hint or "")
