"""Step 9's hygiene rules: no build log, no package cache, no path of the work directory.

The rules read a copy of the image's files (archkernel.azure.hygiene fills the facts,
archkernel.azure.rules judges them): the unit tests make such trees by hand; the last test
plants the files in a real image from the offline repository and runs the whole check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from archkernel.azure.hygiene import WorkdirSearch
from archkernel.azure.rules import Report, check_tree
from archkernel.azure.verify import check_image, inspect_tree
from archkernel.demo import offline
from archkernel.settings import AzureSettings, load
from tests.support.azure import Build

HYGIENE = (
    "no build-host leftovers",
    "no build log in /var/log",
    "no pacman package cache",
    "no work directory path",
)
WORKDIR = Path("/srv/ci/build")  # never created: the search looks for its path only
FILESYSTEM_FILES = """\
%FILES%
etc/
etc/hostname
var/
var/log/
var/log/btmp
var/log/old/
var/log/wtmp

"""


def clean_tree(root: Path) -> Path:
    """An image root as step 3 leaves it: what packages ship in /var/log, empty."""
    for directory in ("etc", "var/log/old", "var/log/journal", "var/cache/pacman/pkg"):
        (root / directory).mkdir(parents=True)
    (root / "etc/hostname").write_text("archlinux\n")
    (root / "etc/machine-id").write_text("")
    (root / "var/log/btmp").write_text("")
    (root / "var/log/wtmp").write_text("")
    local = root / "var/lib/pacman/local/filesystem-2025.05.03-1"
    local.mkdir(parents=True)
    (local / "desc").write_text("%NAME%\nfilesystem\n\n%VERSION%\n2025.05.03-1\n\n")
    (local / "files").write_text(FILESYSTEM_FILES)
    return root


def hygiene(root: Path, workdir: Path = WORKDIR) -> dict[str, tuple[bool, str]]:
    """The hygiene checks of the tree `root`: name -> (passed, detail)."""
    facts = inspect_tree(root, WorkdirSearch.of(workdir))
    report = Report("test")
    check_tree(report, facts, AzureSettings(), "0b6d3c3e-5a8f-4f3e-9d7e-1c2b3a4d5e6f")
    return {c.name: (c.ok, c.detail) for c in report.checks if c.name in HYGIENE}


def test_a_clean_tree_passes_and_each_line_says_what_was_looked_for(tmp_path: Path) -> None:
    root = clean_tree(tmp_path / "root")
    assert hygiene(root) == {
        "no build-host leftovers": (
            True,
            "looked for a set machine-id, SSH host keys, a copied /etc/resolv.conf and pacman "
            "keyring secrets: none",
        ),
        "no build log in /var/log": (
            True,
            "looked at 2 file(s) in /var/log (/var/log/btmp, /var/log/wtmp: shipped empty by "
            "their packages): none written at build time",
        ),
        "no pacman package cache": (True, "looked in /var/cache/pacman/pkg: no file"),
        "no work directory path": (
            True,
            "looked for /srv/ci/build in 6 file(s) under /etc, /var: in none",
        ),
    }


def test_a_planted_pacman_log_fails(tmp_path: Path) -> None:
    root = clean_tree(tmp_path / "root")
    (root / "var/log/pacman.log").write_text(
        "[2026-12-01T10:00:00+0000] [PACMAN] Running 'pacman -r /srv/ci/build/azure/"
        ".root.tmp-new -Sy --noconfirm base'\n"
    )
    found = hygiene(root)
    assert found["no build log in /var/log"] == (
        False,
        "written at build time: /var/log/pacman.log (111 bytes)",
    )
    assert found["no work directory path"] == (
        False,
        "/srv/ci/build is named in /var/log/pacman.log",
    )


def test_log_files_are_judged_by_what_the_packages_ship(tmp_path: Path) -> None:
    root = clean_tree(tmp_path / "root")
    (root / "var/log/btmp").write_text("x")  # shipped, but written to
    (root / "var/log/journal/empty.log").write_text("")  # empty, but no package ships it
    ok, detail = hygiene(root)["no build log in /var/log"]
    assert (ok, detail) == (
        False,
        "written at build time: /var/log/btmp (1 bytes), /var/log/journal/empty.log (0 bytes)",
    )


def test_a_file_naming_the_work_directory_fails(tmp_path: Path) -> None:
    root = clean_tree(tmp_path / "root")
    (root / "etc/pacman.d").mkdir()
    (root / "etc/pacman.d/mirrorlist").write_text("Server = file:///srv/ci/build/azure/repo\n")
    (root / "etc/cache-link").symlink_to("/srv/ci/build")  # a link into it counts too
    assert hygiene(root)["no work directory path"] == (
        False,
        "/srv/ci/build is named in /etc/cache-link, /etc/pacman.d/mirrorlist",
    )


def test_a_package_cache_fails(tmp_path: Path) -> None:
    root = clean_tree(tmp_path / "root")
    (root / "var/cache/pacman/pkg/linux-6.12.1-1-x86_64.pkg.tar.zst").write_bytes(b"\x28\xb5")
    assert hygiene(root)["no pacman package cache"] == (
        False,
        "1 file(s) in /var/cache/pacman/pkg: linux-6.12.1-1-x86_64.pkg.tar.zst",
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (b"pacman -r /build/azure/.root.tmp-new -Sy", True),  # a path in it
        (b"'/build'", True),  # the directory itself
        (b"cd /build/ && make", True),
        (b"Server = file:///build/buildenv/repo", True),
        (b"-fdebug-prefix-map=/build/python/src=/usr/src/debug", False),  # a package's build
        (b"/buildx/azure", False),  # another directory
        (b"/build/azurex", False),
        (b"/srv/build/azure", True),  # `/build/azure` inside it still names ours
    ],
)
def test_what_names_a_work_directory(text: bytes, named: bool) -> None:
    search = WorkdirSearch.of(Path("/build"), names=["azure", "buildenv"])
    assert search.named_in(text) is named


def test_the_work_directory_is_found_by_each_of_its_spellings(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "azure").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    search = WorkdirSearch.of(tmp_path / "link")
    assert search.shown == str(real)
    assert search.named_in(f"{tmp_path}/link/azure/root".encode())
    assert search.named_in(f"{real}/azure/root".encode())
    assert not search.named_in(f"{real}/other".encode())


# --- a real image -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.root
def test_verify_fails_an_image_with_a_planted_log_and_a_work_directory_path(
    repo: offline.OfflineRepo, tmp_path: Path
) -> None:
    build = Build(repo, tmp_path / "w")
    result = build.run()
    assert build.vhd.is_file(), result.stderr[-3000:]
    planted = tmp_path / "planted.vhd"
    shutil.copyfile(build.vhd, planted)
    # Planted with debugfs in the copy's root file system, as a careless build would leave it.
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", planted], capture_output=True, text=True, check=True
        ).stdout
    )
    device = f"{planted}?offset={int(table['partitiontable']['partitions'][-1]['start']) * 512}"
    log = tmp_path / "pacman.log"
    log.write_text(f"[PACMAN] Running 'pacman -r {build.workdir}/azure/.root.tmp-new -Sy'\n")
    conf = tmp_path / "planted.conf"
    conf.write_text(f"CacheDir = {build.workdir}/azure/cache/\n")
    commands = tmp_path / "commands"
    commands.write_text(
        f"rm /var/log/pacman.log\ncd /var/log\nwrite {log} pacman.log\n"
        f"cd /etc\nwrite {conf} planted.conf\n"
    )
    subprocess.run(["debugfs", "-w", "-f", commands, device], capture_output=True, check=True)
    az = load(build.settings_path, env={}).settings.azure
    report = check_image(planted, az, build.root_uuid(), build.workdir)
    failed = {c.name: c.detail for c in report.failed}
    assert failed == {
        "no build log in /var/log": f"written at build time: /var/log/pacman.log "
        f"({log.stat().st_size} bytes)",
        "no work directory path": f"{build.workdir} is named in /etc/planted.conf, "
        "/var/log/pacman.log",
    }
    # The image as built passes them.
    passed = check_image(build.vhd, az, build.root_uuid(), build.workdir)
    assert {c.name for c in passed.checks} >= set(HYGIENE)
    assert [c.name for c in passed.failed if c.name in HYGIENE] == []


# --- today's VM sizes, on a real image ------------------------------------------------------


def _debugfs(device: str, *requests: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", " ".join(requests), device], capture_output=True, text=True, check=True
    )
    return out.stdout


@pytest.mark.integration
@pytest.mark.root
def test_verify_fails_an_image_lacking_what_todays_vm_sizes_need(
    repo: offline.OfflineRepo, tmp_path: Path
) -> None:
    """The built image passes every rule for today's VM sizes; a copy with the Azure disk
    rules, the MANA driver and the NVMe driver taken away, `quiet` added and timesyncd
    enabled fails exactly the rules that check them (the initramfs read from the VHD)."""
    build = Build(repo, tmp_path / "w")
    result = build.run()
    assert build.vhd.is_file(), result.stderr[-3000:]
    az = load(build.settings_path, env={}).settings.azure
    built = check_image(build.vhd, az, build.root_uuid(), build.workdir)
    names = {c.name: c.ok for c in built.checks}
    for rule in (
        "kernel command line without quiet",
        "NVMe: nvme and pci-hyperv in initramfs-linux.img",
        "NVMe: kernel command line",
        "Azure disk names (/dev/disk/azure) on SCSI and NVMe",
        "accelerated networking: VF drivers in the image",
        "Hyper-V clock: chronyd enabled, timesyncd not",
    ):
        assert names[rule] is True, built.summary()

    planted = tmp_path / "planted.vhd"
    shutil.copyfile(build.vhd, planted)
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", planted], capture_output=True, text=True, check=True
        ).stdout
    )
    device = f"{planted}?offset={int(table['partitiontable']['partitions'][-1]['start']) * 512}"
    mana_dir = f"/usr/lib/modules/{repo.kernel_release}/kernel/drivers/net/ethernet/microsoft/mana"
    mana = [n for n in _debugfs(device, "ls", "-p", mana_dir).split("/") if n.startswith("mana.ko")]
    assert mana
    initramfs = [
        n for n in _debugfs(device, "ls", "-p", "/boot").split("/") if n.startswith("initramfs-")
    ]
    assert "initramfs-linux.img" in initramfs
    # An initramfs with the Hyper-V drivers but no nvme or pci-hyperv, made by cpio.
    staged = tmp_path / "initramfs"
    moddir = staged / "usr/lib/modules" / repo.kernel_release / "kernel/drivers"
    for name in ("hv/hv_vmbus.ko", "scsi/hv_storvsc.ko", "net/hyperv/hv_netvsc.ko"):
        (moddir / name).parent.mkdir(parents=True, exist_ok=True)
        (moddir / name).write_bytes(b"\0")
    listing = subprocess.run(["find", "."], cwd=staged, capture_output=True, check=True).stdout
    cpio = tmp_path / "initramfs.img"
    with open(cpio, "wb") as out:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=staged,
            input=listing,
            stdout=out,
            check=True,
        )
    grub_cfg = tmp_path / "grub.cfg"
    original = _debugfs(device, "cat", "/boot/grub/grub.cfg")
    grub_cfg.write_text(original.replace(" rw ", " rw quiet ", 1))
    commands = tmp_path / "commands"
    lines = [
        "rm /etc/udev/rules.d/66-archkernel-azure-disk.rules",
        f"rm {mana_dir}/{mana[0]}",
        "cd /boot",
        *[f"rm /boot/{n}\nwrite {cpio} {n}" for n in initramfs],
        "cd /boot/grub",
        f"rm /boot/grub/grub.cfg\nwrite {grub_cfg} grub.cfg",
        "mkdir /etc/systemd/system/sysinit.target.wants",
        "symlink /etc/systemd/system/sysinit.target.wants/systemd-timesyncd.service "
        "/usr/lib/systemd/system/systemd-timesyncd.service",
    ]
    commands.write_text("\n".join(lines) + "\n")
    subprocess.run(["debugfs", "-w", "-f", commands, device], capture_output=True, check=True)
    report = check_image(planted, az, build.root_uuid(), build.workdir)
    failed = sorted(c.name for c in report.failed)
    assert failed == sorted(
        [
            "kernel command line without quiet",
            *[f"NVMe: nvme and pci-hyperv in {n}" for n in initramfs],
            "Azure disk names (/dev/disk/azure) on SCSI and NVMe",
            "accelerated networking: VF drivers in the image",
            "Hyper-V clock: chronyd enabled, timesyncd not",
        ]
    ), report.summary()
