"""azure_vhd end to end: a real build from an offline repository, checked and booted.

Read this as the workflow's documentation. No Arch mirror is reachable from the test
machines, so `archkernel.demo.offline` first builds a small but real pacman repository
(Debian's kernel and busybox under Arch's package names, plus stand-ins for the rest) and
`DIR/settings.toml` pointing at it. Then, exactly as a user would:

    python -m doit -f REPO/dodo.py -d DIR run azure_vhd settings=DIR/settings.toml
    archkernel vhd check DIR/build/azure/archlinux-azure.vhd
    archkernel run azure_boottest --settings DIR/settings.toml

The build runs once per module; many small tests then look at what it left in
`DIR/build/azure` (the VHD, `verify.json`, `packages.txt`, `ids.json`, the serial console
of the boot). Later tests re-run it (nothing to do), force it from step 6, and build two
variants: waagent provisioning and an MBR disk. Every run is a separate process.

The stand-in init in the image prints, on the serial console,
`ARCHKERNEL-TEST-BOOT hostname=H root=DEV rootuuid=U fstab=F` and `H login:`: U is read
from the superblock of the file system the initramfs mounted as root, F is /'s entry in the
image's /etc/fstab.

The helpers (`archkernel`, `outcomes`, `leftovers` ...) are in tests/support/azure.py; the
offline repository is the `repo` fixture of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from archkernel.demo import offline
from tests.support.azure import (
    OUTCOME,
    STEPS,
    WORKFLOW,
    Build,
    archkernel,
    boot_facts,
    built,
    doit,
    image_file,
    outcomes,
    run_boottest,
)
from tests.support.kernel_state import leftovers

pytestmark = [pytest.mark.integration, pytest.mark.root]


# --- one build ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(repo: offline.OfflineRepo) -> tuple[Build, subprocess.CompletedProcess[str]]:
    """The build, run once by plain doit with the offline settings as they are."""
    result = doit(repo.dir, "run", WORKFLOW, f"settings={repo.settings}")
    return Build(repo, repo.dir / "build"), result


@pytest.fixture(scope="module")
def build(first_run: tuple[Build, subprocess.CompletedProcess[str]]) -> Build:
    build, result = first_run
    assert result.returncode == 0, result.stderr[-5000:]
    return build


@pytest.fixture(scope="module")
def booted(build: Build) -> subprocess.CompletedProcess[str]:
    """The first build booted once in QEMU."""
    return run_boottest(build)


# --- the build ------------------------------------------------------------------------------


def test_doit_runs_every_step_in_order(first_run) -> None:
    _, result = first_run
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Traceback" not in result.stderr
    assert outcomes(result.stderr) == {step: "done in" for step in STEPS}
    finished = [m["step"] for m in OUTCOME.finditer(result.stderr)]
    assert finished == STEPS


def test_vhd_check_accepts_the_image(build: Build) -> None:
    result = archkernel("vhd", "check", str(build.vhd))
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == f"{build.vhd}: a fixed VHD that Azure accepts"


def test_qemu_img_reads_a_vpc_of_exactly_disk_size(build: Build) -> None:
    info = subprocess.run(
        ["qemu-img", "info", "-f", "vpc", "--output=json", str(build.vhd)],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(info.stdout)
    assert data["format"] == "vpc"
    assert data["virtual-size"] == build.disk_size
    # A fixed VHD is the data plus a 512-byte footer.
    assert build.vhd.stat().st_size == build.disk_size + 512


def test_qemu_img_finds_the_vhd_equal_to_its_raw_data(build: Build, tmp_path: Path) -> None:
    raw = tmp_path / "data.raw"
    subprocess.run(["cp", "--sparse=always", str(build.vhd), str(raw)], check=True)
    os.truncate(raw, build.disk_size)  # the same bytes without the footer
    assert raw.stat().st_size == build.disk_size
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "vpc", str(raw), str(build.vhd)],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "Images are identical" in compare.stdout


def test_verify_report_passes_every_check(build: Build) -> None:
    report = build.report()
    assert report["ok"] is True
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed == []
    names = {c["name"] for c in report["checks"]}
    for expected in (
        "VHD cookie",
        "VHD disk-type",
        "VHD size is disk_size",
        "partition 1 aligned and inside",  # GPT: the BIOS boot partition
        "partition 2 aligned and inside",  # and the root
        "file system UUID is the chosen one",
        "fstab root by UUID",
        "grub root=UUID",
        "Hyper-V drivers in initramfs-linux.img",
        "sshd keep-alive",
        "root locked",
        "provisioning DVD drivers loaded at boot",
        "cloud-init datasource Azure",
        "no build-host leftovers",
    ):
        assert expected in names
    summary = (build.azure / "verify.txt").read_text()
    assert summary.endswith(f"{len(report['checks'])} passed, 0 failed\n")


def test_manifest_lists_the_installed_packages_and_versions(build: Build) -> None:
    lines = (build.azure / "packages.txt").read_text().splitlines()
    installed = dict(line.split() for line in lines)
    wanted = {*offline.SETTINGS_PACKAGES, "cloud-init"}  # cloud-init: the default provisioning
    assert wanted <= set(installed)
    assert "walinuxagent" not in installed
    # Each as the repository has it (python -m archkernel.demo.offline prints the same list).
    assert installed == {name: build.repo.packages[name] for name in installed}


# --- the boot -------------------------------------------------------------------------------


@pytest.mark.vm
def test_qemu_boots_the_vhd_through_grub_into_the_image(build: Build, booted) -> None:
    assert outcomes(booted.stderr, "azure_boottest") == {"01_boot": "done in"}
    console = build.console()
    assert "GNU GRUB" in console
    uuid = build.root_uuid()
    # GRUB (BOOT_IMAGE=) started the kernel with the root by UUID and our command line.
    cmdline = re.search(r"Command line: (.*)", console)
    assert cmdline is not None
    assert cmdline[1].startswith(f"BOOT_IMAGE=/boot/vmlinuz-linux root=UUID={uuid} ")
    assert "console=ttyS0,115200 earlyprintk=ttyS0 rootdelay=300 net.ifnames=0" in cmdline[1]


@pytest.mark.vm
def test_the_booted_root_is_the_fstab_uuid_and_the_host_name_is_set(build: Build, booted) -> None:
    facts = boot_facts(build.console())
    uuid = build.root_uuid()
    assert facts["rootuuid"] == facts["fstab"] == uuid
    assert facts["root"] == "/dev/sda2"  # GPT: BIOS boot partition, then root
    assert facts["hostname"] == offline.HOSTNAME
    assert f"\n{offline.HOSTNAME} login:" in build.console()


# --- re-running -----------------------------------------------------------------------------


def test_a_rerun_finds_every_step_up_to_date_and_runs_nothing(build: Build) -> None:
    steps = build.archkernel("steps", WORKFLOW)
    assert steps.returncode == 0, steps.stderr
    states = [line.split() for line in steps.stdout.splitlines() if line.startswith(WORKFLOW)]
    assert states == [[f"{WORKFLOW}:{step}", "done"] for step in STEPS]
    before = build.vhd.stat()
    again = build.run()
    assert again.returncode == 0, again.stderr
    assert outcomes(again.stderr) == {step: "up to date" for step in STEPS}
    after = build.vhd.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)


@pytest.mark.vm
def test_from_6_rebuilds_only_the_disk_and_later_and_it_still_boots(build: Build, booted) -> None:
    old_vhd = json.loads((build.azure / "vhd.json").read_text())
    started = time.time()
    result = build.run("--from", "6")
    assert result.returncode == 0, result.stderr[-5000:]
    assert outcomes(result.stderr) == {
        step: "up to date" if step < "06" else "done in" for step in STEPS
    }
    new_vhd = json.loads((build.azure / "vhd.json").read_text())
    # A new disk, and the same IDs: they derive from the seed (azure.seed), not the run.
    assert new_vhd["id"] == old_vhd["id"]
    assert build.vhd.stat().st_mtime > started
    assert build.report()["ok"] is True
    assert archkernel("vhd", "check", str(build.vhd)).returncode == 0
    # The boot test's input changed, so it boots the new image.
    boot = run_boottest(build)
    assert outcomes(boot.stderr, "azure_boottest") == {"01_boot": "done in"}
    facts = boot_facts(build.console())
    assert facts["rootuuid"] == facts["fstab"] == build.root_uuid()
    assert facts["hostname"] == offline.HOSTNAME


# --- variants -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def waagent(repo: offline.OfflineRepo) -> Build:
    """provisioning = "waagent": the Azure Linux Agent (the walinuxagent stand-in) provisions."""
    return built(repo, "build-waagent", ARCHKERNEL_AZURE__PROVISIONING="waagent")


@pytest.fixture(scope="module")
def mbr(repo: offline.OfflineRepo) -> Build:
    """partition_table = "mbr": one bootable root partition, GRUB in the gap after the MBR."""
    return built(repo, "build-mbr", ARCHKERNEL_AZURE__PARTITION_TABLE="mbr")


def test_waagent_variant_verifies_with_the_agent_configured(waagent: Build) -> None:
    report = waagent.report()
    assert report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["waagent.conf matches provisioning"] == {
        "name": "waagent.conf matches provisioning",
        "ok": True,
        "detail": "as expected",
    }
    assert checks["waagent enabled"]["ok"] is True
    assert not [name for name in checks if name.startswith("cloud-init")]
    installed = (waagent.azure / "packages.txt").read_text().split()
    assert "walinuxagent" in installed and "cloud-init" not in installed


def test_waagent_variant_image_holds_microsofts_agent_settings(waagent: Build) -> None:
    settings = dict(
        line.split("=", 1)
        for line in image_file(waagent, "/etc/waagent.conf").splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    assert settings["Provisioning.Agent"] == "waagent"
    assert settings["ResourceDisk.Format"] == "y"
    assert settings["ResourceDisk.Filesystem"] == "ext4"
    assert settings["ResourceDisk.MountPoint"] == "/mnt/resource"
    assert settings["ResourceDisk.EnableSwap"] == "y"


def test_mbr_variant_verifies_with_one_dos_partition(mbr: Build) -> None:
    report = mbr.report()
    assert report["ok"] is True, [c for c in report["checks"] if not c["ok"]]
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(mbr.vhd)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == "dos"
    assert [p.get("bootable", False) for p in table["partitions"]] == [True]
    assert archkernel("vhd", "check", str(mbr.vhd)).returncode == 0


@pytest.mark.vm
def test_mbr_variant_boots(mbr: Build) -> None:
    run_boottest(mbr)
    facts = boot_facts(mbr.console())
    assert facts["rootuuid"] == facts["fstab"] == mbr.root_uuid()
    assert facts["root"] == "/dev/sda1"
    assert facts["hostname"] == offline.HOSTNAME


def test_no_build_left_anything_mounted_or_attached(repo: offline.OfflineRepo, build) -> None:
    assert leftovers(repo.dir) == []
