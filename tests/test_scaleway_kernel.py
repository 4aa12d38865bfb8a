"""Which kernel scaleway_kexec boots: pacman's local database, pkgbase, the image's version.

Roots laid out as Arch Linux ARM's (pacman's database names `linux-armv7` as the owner of
`boot/zImage` and `usr/lib/modules/<version>/`, no `pkgbase`) and as Arch Linux x86_64's
(`pkgbase`), made with plain file writes; the kernel images carry their version the way
real ones do (a bzImage setup header, an xz- or gzip-compressed banner).
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.scaleway import kernel, pacman
from archkernel.scaleway.kernel import Evidence, Owner

ALARM = "6.2.10-1-ARCH"
DESC = "%NAME%\n{name}\n\n%VERSION%\n{version}\n\n%BASE%\n{name}\n\n%ARCH%\narmv7h\n\n"


def db_entry(root: Path, name: str, version: str, files: list[str]) -> Path:
    """A pacman local database entry as pacman writes it (directories end in '/')."""
    entry = root / pacman.LOCAL_DB / f"{name}-{version}"
    entry.mkdir(parents=True)
    (entry / "desc").write_text(DESC.format(name=name, version=version))
    (entry / "files").write_text("%FILES%\n" + "".join(f"{f}\n" for f in files) + "\n")
    return entry


def alarm_root(root: Path, version: str = ALARM, package: str = "linux-armv7") -> Path:
    """linux-armv7 owning boot/zImage and usr/lib/modules/<version>/, no pkgbase."""
    (root / "boot").mkdir(parents=True, exist_ok=True)
    (root / "boot/zImage").write_bytes(b"\x00" * 64)  # a zImage whose version cannot be read
    (root / "usr/lib/modules" / version / "kernel").mkdir(parents=True)
    db_entry(
        root,
        package,
        version.rsplit("-", 1)[0],
        [
            "boot/",
            "boot/zImage",
            "usr/",
            "usr/lib/",
            "usr/lib/modules/",
            f"usr/lib/modules/{version}/",
            f"usr/lib/modules/{version}/kernel/",
            f"usr/lib/modules/{version}/modules.builtin",
        ],
    )
    return root


# --- pacman's database, parsed ------------------------------------------------------------


def test_parse_package_reads_name_version_and_safe_files() -> None:
    files = (
        "%FILES%\nboot/\nboot/zImage\nusr/lib/modules/6.2.10-1-ARCH/\n../../etc/shadow\n"
        "/etc/passwd\nusr/./lib/x\nusr//lib/y\n\n%BACKUP%\netc/mkinitcpio.d/linux.preset\tabc\n"
    )
    desc = DESC.format(name="linux-armv7", version="6.2.10-1")
    package = pacman.parse_package("linux-armv7-6.2.10-1", desc, files)
    assert package.label == "linux-armv7 6.2.10-1"
    assert package.files == {"boot", "boot/zImage", "usr/lib/modules/6.2.10-1-ARCH"}
    assert package.owns("/boot/zImage") and not package.owns("etc/shadow")
    assert package.module_versions() == ["6.2.10-1-ARCH"]


@pytest.mark.parametrize("brk", ["\x85", "\u2028", "\x1c", "\x0b"])
def test_a_file_name_with_another_line_break_names_no_second_path(brk: str) -> None:
    # pacman ends a line at "\n" only: this entry is one odd file name, not boot/zImage.
    files = f"%FILES%\netc/x{brk}boot/zImage\nusr/lib/modules/6.2.10-1-ARCH/\n\n"
    package = pacman.parse_package("evil-1-1", "", files)
    assert not package.owns("boot/zImage")
    assert package.files == {"usr/lib/modules/6.2.10-1-ARCH"}


def test_parse_package_without_desc_names_it_from_the_directory() -> None:
    package = pacman.parse_package("linux-armv7-rc-6.3.0rc1-1", "", "%FILES%\nboot/zImage\n")
    assert (package.name, package.version) == ("linux-armv7-rc", "6.3.0rc1-1")


def test_module_versions_leave_out_extramodules() -> None:
    files = (
        "%FILES%\nusr/lib/modules/extramodules-4.4-ARCH/version\nusr/lib/modules/4.4.1-1-ARCH/\n"
    )
    package = pacman.parse_package("linux-armv7-4.4.1-1", "", files)
    assert package.module_versions() == ["4.4.1-1-ARCH"]


def test_owners_read_the_kernel_packages_first(tmp_path: Path) -> None:
    alarm_root(tmp_path)
    # Reading this entry would fail: it must not be read once a linux* package owns it.
    other = db_entry(tmp_path, "bash", "5.2-1", ["usr/bin/bash"])
    (other / "files").unlink()
    os.mkfifo(other / "files")
    (owner,) = pacman.owners(tmp_path, "boot/zImage")
    assert owner.label == "linux-armv7 6.2.10-1"


def test_owners_look_at_every_package_when_no_kernel_one_owns_it(tmp_path: Path) -> None:
    db_entry(tmp_path, "linux-firmware", "1-1", ["usr/lib/firmware/"])
    db_entry(tmp_path, "uboot-c1", "2016.01-1", ["boot/zImage"])
    assert [p.label for p in pacman.owners(tmp_path, "boot/zImage")] == ["uboot-c1 2016.01-1"]
    assert pacman.owners(tmp_path / "nowhere", "boot/zImage") == []


def test_a_database_file_that_is_too_large_is_refused(tmp_path: Path) -> None:
    entry = db_entry(tmp_path, "linux-armv7", "6.2.10-1", [])
    with (entry / "files").open("wb") as handle:
        handle.truncate(pacman.MAX_FILES + 1)
    with pytest.raises(UserError, match=r"files is larger than \d+ bytes") as info:
        pacman.owners(tmp_path, "boot/zImage")
    assert "pacman -Dk" in (info.value.hint or "")


def test_a_database_file_that_is_a_symbolic_link_is_not_followed(tmp_path: Path) -> None:
    entry = db_entry(tmp_path, "linux-armv7", "6.2.10-1", [])
    (entry / "files").unlink()
    (entry / "files").symlink_to("/dev/zero")
    with pytest.raises(UserError, match="cannot read pacman's database file"):
        pacman.owners(tmp_path, "boot/zImage")


# --- choosing ---------------------------------------------------------------------------------


def test_choose_the_version_the_owning_package_ships() -> None:
    ev = Evidence(
        "/boot/zImage",
        ("4.5.0-provider", ALARM),
        owners=(Owner("linux-armv7 6.2.10-1", (ALARM,)),),
    )
    found = kernel.choose(ev, None)
    assert (found.version, found.package) == (ALARM, "linux-armv7 6.2.10-1")
    assert found.how == "pacman: linux-armv7 6.2.10-1 owns /boot/zImage"


def test_choose_the_setting_first() -> None:
    ev = Evidence("/boot/zImage", ("6.8.0-1-ARCH", ALARM), owners=(Owner("l 1", (ALARM,)),))
    assert kernel.choose(ev, "6.8.0-1-ARCH").version == "6.8.0-1-ARCH"
    with pytest.raises(UserError, match=r"kernel_version '6\.7': usr/lib/modules/6\.7 does not"):
        kernel.choose(ev, "6.7")


def test_choose_pkgbase_when_no_package_owns_the_image() -> None:
    ev = Evidence("/boot/zImage", ("6.9.1-1-ARCH", "4.5.0-provider"), pkgbase=("6.9.1-1-ARCH",))
    assert kernel.choose(ev, None).version == "6.9.1-1-ARCH"


def test_choose_says_the_owner_ships_no_modules_rather_than_that_none_owns_it() -> None:
    # The image's package and its modules' package are two (a split kernel package).
    ev = Evidence("/boot/zImage", (ALARM,), owners=(Owner("linux-armv7-image 6.2.10-1", ()),))
    found = kernel.choose(ev, None)
    assert found.version == ALARM
    assert found.notes == (
        "linux-armv7-image 6.2.10-1 owns it but ships no usr/lib/modules/<version>/",
    )


def test_choose_the_single_module_directory() -> None:
    assert kernel.choose(Evidence("/boot/zImage", (ALARM,)), None).version == ALARM


def test_choose_by_the_image_version_among_several() -> None:
    ev = Evidence("/boot/zImage", ("6.9.1-1-ARCH", "6.9.2-1-ARCH"), image_version="6.9.2-1-ARCH")
    assert kernel.choose(ev, None).version == "6.9.2-1-ARCH"
    ev = Evidence("/boot/zImage", ("6.9.1-1-ARCH", "6.9.2-1-ARCH"), same_image=("6.9.1-1-ARCH",))
    assert kernel.choose(ev, None).version == "6.9.1-1-ARCH"


def test_choose_refuses_an_image_that_does_not_match_the_only_directory() -> None:
    ev = Evidence("/boot/zImage", ("6.9.1-1-ARCH",), image_version="6.10.0-1-ARCH")
    with pytest.raises(UserError, match=r"is Linux 6\.10\.0-1-ARCH but the only module"):
        kernel.choose(ev, None)


@pytest.mark.parametrize(
    ("ev", "listed"),
    [
        (
            Evidence(
                "/boot/zImage",
                (ALARM, "6.3.0-rc1-1-ARCH"),
                owners=(
                    Owner("linux-armv7 6.2.10-1", (ALARM,)),
                    Owner("linux-armv7-rc 6.3.0rc1-1", ("6.3.0-rc1-1-ARCH",)),
                ),
            ),
            f"{ALARM} (linux-armv7 6.2.10-1), 6.3.0-rc1-1-ARCH (linux-armv7-rc 6.3.0rc1-1)",
        ),
        (
            Evidence(
                "/boot/zImage",
                (ALARM, "6.2.11-1-ARCH"),
                owners=(Owner("linux-armv7 6.2.10-1", (ALARM, "6.2.11-1-ARCH")),),
            ),
            f"{ALARM} (linux-armv7 6.2.10-1), 6.2.11-1-ARCH (linux-armv7 6.2.10-1)",
        ),
        (Evidence("/boot/zImage", ("6.9.1-1-ARCH", "6.9.2-1-ARCH")), "6.9.1-1-ARCH, 6.9.2-1-ARCH"),
        (
            Evidence("/boot/zImage", ("a", "b", "c"), pkgbase=("a", "b")),
            "a, b",
        ),
    ],
    ids=["two packages own it", "its package ships two", "two directories", "two with pkgbase"],
)
def test_choose_lists_every_candidate_when_nothing_chooses(ev: Evidence, listed: str) -> None:
    with pytest.raises(UserError) as info:
        kernel.choose(ev, None)
    assert info.value.message == (
        f"several kernels are installed ({listed}) and none is known to be /boot/zImage"
    )
    assert info.value.hint == "set scaleway.kernel_version to the one to boot"


def test_choose_with_no_module_directory() -> None:
    with pytest.raises(UserError, match="no kernel found"):
        kernel.choose(Evidence("/boot/zImage", ()), None)


# --- reading the root -------------------------------------------------------------------------


def test_find_on_an_arch_linux_arm_root_without_pkgbase(tmp_path: Path) -> None:
    root = alarm_root(tmp_path)
    (root / "usr/lib/modules/6.1.0-1-ARCH").mkdir()  # a leftover of an older kernel
    assert not list(root.glob("usr/lib/modules/*/pkgbase"))
    found = kernel.find(root, "/boot/zImage", None)
    assert (found.version, found.package) == (ALARM, "linux-armv7 6.2.10-1")


def test_find_with_two_kernels_and_nothing_to_choose_lists_both(tmp_path: Path) -> None:
    root = alarm_root(tmp_path)
    other = "6.3.0-rc1-1-ARCH"
    (root / "usr/lib/modules" / other).mkdir()
    db_entry(root, "linux-armv7-rc", "6.3.0rc1-1", ["boot/zImage", f"usr/lib/modules/{other}/"])
    with pytest.raises(UserError) as info:
        kernel.find(root, "/boot/zImage", None)
    assert ALARM in info.value.message and other in info.value.message
    assert "linux-armv7 6.2.10-1" in info.value.message
    assert "linux-armv7-rc 6.3.0rc1-1" in info.value.message


def test_find_with_two_kernels_picks_the_one_the_image_names(tmp_path: Path) -> None:
    root = alarm_root(tmp_path)
    other = "6.3.0-rc1-1-ARCH"
    (root / "usr/lib/modules" / other).mkdir()
    db_entry(root, "linux-armv7-rc", "6.3.0rc1-1", ["boot/zImage", f"usr/lib/modules/{other}/"])
    (root / "boot/zImage").write_bytes(zimage(other, "xz"))
    assert kernel.find(root, "/boot/zImage", None).version == other


def banner(version: str) -> bytes:
    return f"Linux version {version} (builduser@leming) (gcc 13.2.1) #1 SMP\n".encode()


def zimage(version: str, compression: str) -> bytes:
    """A zImage-like file: decompressor code, then the kernel compressed (the banner deep
    inside), then the 4-byte size the decompressor reads."""
    image = os.urandom(3000) + banner(version) + b"\x00" * 5000
    if compression == "xz":
        packed = lzma.compress(image, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    else:
        packed = gzip.compress(image, mtime=0)
    return b"\x00\x00\xa0\xe1" * 200 + packed + struct.pack("<I", len(image))


@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_image_version_of_a_compressed_zimage(compression: str) -> None:
    assert kernel.image_version(zimage("6.2.10-1-ARCH", compression)) == "6.2.10-1-ARCH"


@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_image_version_stops_decompressing_at_the_bound(
    compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A few KiB that unpack to megabytes of zeros before the banner: read no further
    # than MAX_UNPACKED, however small the compressed input that holds them.
    monkeypatch.setattr(kernel, "MAX_UNPACKED", 4 * 1024 * 1024)
    image = b"\x00" * (24 * 1024 * 1024) + banner("6.2.10-1-ARCH")
    if compression == "xz":
        packed = lzma.compress(image, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    else:
        packed = gzip.compress(image, mtime=0)
    assert len(packed) < 1024 * 1024  # one read of the old code's 1 MiB input chunks
    assert kernel.image_version(b"\x00\x00\xa0\xe1" * 200 + packed) is None


@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_image_version_finds_a_banner_across_two_decompressed_chunks(compression: str) -> None:
    image = os.urandom(1024 * 1024 - 20) + banner("6.2.10-1-ARCH") + os.urandom(4096)
    if compression == "xz":
        packed = lzma.compress(image, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    else:
        packed = gzip.compress(image, mtime=0)
    assert kernel.image_version(b"\x00\x00\xa0\xe1" * 200 + packed) == "6.2.10-1-ARCH"


def test_image_version_of_an_uncompressed_image_and_of_nothing() -> None:
    assert kernel.image_version(b"\x00" * 100 + banner("6.9.1-arch1-1")) == "6.9.1-arch1-1"
    assert kernel.image_version(b"\x00\x01" * 4096) is None
    assert kernel.image_version(b"\x1f\x8b\x08 not gzip \xfd7zXZ\x00 not xz") is None


@pytest.mark.integration
def test_image_version_of_a_real_bzimage() -> None:
    from tests.support.kernel import debian_kernel_tree, kernel_image, kernel_version

    tree = debian_kernel_tree()
    assert kernel.image_version(kernel_image(tree).read_bytes()) == kernel_version(tree)
