"""azure_vhd for generation 2 (UEFI) and hybrid VMs: built offline, verified, booted.

The same offline build as test_azure_e2e.py, with one setting changed, as a user would:

    ARCHKERNEL_AZURE__GENERATION=2 archkernel run azure_vhd --settings DIR/settings.toml
    ARCHKERNEL_AZURE__BOOT=hybrid  archkernel run azure_vhd --settings DIR/settings.toml
    archkernel run azure_boottest --settings DIR/settings.toml

Generation 2 boots UEFI: a GPT with an EFI system partition (FAT, volume ID chosen by
step 1 and mounted at /efi by fstab), GRUB's core.efi at the removable path
EFI/BOOT/BOOTX64.EFI and no BIOS boot code. A hybrid image has both, as Arch's own cloud
images do. `azure_boottest` boots an image with the firmware of its VM generation
(`01_boot`: OVMF for generation 2, SeaBIOS for 1, console in `boottest.log`) and a hybrid
image also with the other one (`02_boot_uefi`, console in `boottest-uefi.log`).

The first tests need no build: which steps read the firmware settings, what
`--dry-run` shows for steps 6-8, which boots azure_boottest makes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from archkernel.azure import boottest, diskimage, workspace
from archkernel.demo import offline
from archkernel.errors import UserError
from archkernel.host import qemu
from archkernel.image import disk, esp, ext4, grub
from archkernel.plan import describe
from archkernel.settings import Settings, load
from tests.support.azure import (
    STEPS,
    WORKFLOW,
    Build,
    archkernel,
    boot_facts,
    built,
    image_file,
    outcomes,
    run_boottest,
)
from tests.support.kernel_state import leftovers

# The offline tree fills about 240 MiB of ext4; with the 256 MiB ESP and GRUB's modules for
# two platforms, 512 MiB (test_azure_e2e's size) is too small. The file stays sparse.
UEFI_DISK_SIZE = "1GiB"
GEN2 = {"ARCHKERNEL_AZURE__GENERATION": "2", "ARCHKERNEL_AZURE__DISK_SIZE": UEFI_DISK_SIZE}
HYBRID = {"ARCHKERNEL_AZURE__BOOT": "hybrid", "ARCHKERNEL_AZURE__DISK_SIZE": UEFI_DISK_SIZE}
ESP_FILES = ["EFI/", "EFI/BOOT/", "EFI/BOOT/BOOTX64.EFI"]


def settings(tmp_path: Path, **env: str) -> Settings:
    """The offline settings' shape without a repository: defaults plus `env`."""
    values = {"ARCHKERNEL_WORKDIR": str(tmp_path / "build"), **env}
    return load(None, env=values, cwd=tmp_path).settings


def have_ovmf() -> bool:
    try:
        qemu.find_ovmf()
    except UserError:
        return False
    return True


needs_ovmf = pytest.mark.skipif(not have_ovmf(), reason="needs OVMF (Debian's ovmf)")


# --- the steps, without building --------------------------------------------------------------


def step_settings(env: dict[str, str], tmp_path: Path) -> dict[str, list[str]]:
    from tasks import azure_vhd

    values = {"ARCHKERNEL_WORKDIR": str(tmp_path / "build"), **env}
    loaded = load(None, env=values, cwd=tmp_path)
    return {step.id: list(step.settings) for step in azure_vhd.WORKFLOWS[0].steps(loaded)}


def test_the_steps_the_firmware_changes_read_generation_and_boot(tmp_path: Path) -> None:
    read = step_settings({}, tmp_path)
    firmware = {"azure.generation", "azure.boot"}
    readers = [step for step, keys in read.items() if firmware <= set(keys)]
    # Tools, fstab (ESP), layout and ESP, GRUB platforms, verify rules.
    assert readers == ["01_preflight", "03_configure", "06_disk", "07_bootloader", "09_verify"]
    assert not firmware & set(read["02_pacstrap"])  # a new firmware never re-runs pacstrap


def test_dry_run_commands_of_a_hybrid_disk_are_planned_without_running(tmp_path: Path) -> None:
    s = settings(tmp_path, **HYBRID)
    p = workspace.paths(s)
    six = diskimage.disk(s).commands()
    # sfdisk writes the table, then lists it (--json) to check it.
    assert [a[0] for a in six] == [
        "grub-mkimage",
        "grub-mkimage",
        "sfdisk",
        "sfdisk",
        "mkfs.ext4",
        "e2fsck",
        "mkfs.fat",
    ]
    assert six[1][1:3] == ("--format", "x86_64-efi")
    assert six[3][1] == "--json"
    layout = diskimage.layout_for(s.azure)
    made = workspace.staging(p.raw)  # the disk is made beside disk.img, then renamed
    assert list(six[4]) == ext4.mkfs_argv(
        made, layout.root, p.image_root, uuid="ROOT-UUID-FROM-STEP-1", label="archroot"
    )
    assert list(six[6]) == esp.mkfs_argv(made, layout.esp, volume="0000-0000")
    seven = diskimage.bootloader(s).commands()
    assert [Path(c[0]).name for c in seven] == [
        # BIOS: the root file system's UUID, its partition mounted for grub-bios-setup,
        # the table checked after.
        *["blkid", "mount", "grub-bios-setup", "umount", "sfdisk"],
        # UEFI: the UUID, a FAT on the ESP, core.efi read back and copied there, read
        # again and compared, the table checked; then the FAT (fsck.fat).
        *["blkid", "blkid", "debugfs", "mcopy", "mcopy", "sfdisk", "fsck.fat"],
    ]
    eight = describe(diskimage.vhd(s))
    assert eight == [
        f"# append the 512-byte fixed-VHD footer (1GiB) to {p.raw} and rename it to {p.vhd}: "
        "no data is copied, the file stays sparse"
    ]
    assert diskimage.vhd(s).commands() == []
    assert not p.work.exists()  # planning wrote nothing


def test_a_bios_disk_plans_no_esp_and_no_efi_grub(tmp_path: Path) -> None:
    s = settings(tmp_path)
    words = " ".join(describe(diskimage.disk(s)))
    assert "x86_64-efi" not in words and "mkfs.fat" not in words
    seven = diskimage.bootloader(s).commands()
    assert [Path(c[0]).name for c in seven] == [
        *["blkid", "mount", "grub-bios-setup", "umount", "sfdisk"]
    ]


@pytest.mark.parametrize(
    ("env", "boots"),
    [
        ({}, [("bios", "boot", "boottest.log")]),
        (GEN2, [("uefi", "boot", "boottest.log")]),
        (HYBRID, [("bios", "boot", "boottest.log"), ("uefi", "boot_uefi", "boottest-uefi.log")]),
        (
            {**HYBRID, "ARCHKERNEL_AZURE__GENERATION": "2"},
            [("uefi", "boot", "boottest.log"), ("bios", "boot_bios", "boottest-bios.log")],
        ),
    ],
)
def test_boottest_boots_with_the_generations_firmware_first(tmp_path: Path, env, boots) -> None:
    tests = boottest.boot_tests(settings(tmp_path, **env))
    assert [(t.firmware, t.verb, t.console.name) for t in tests] == boots


def test_without_ovmf_a_uefi_boot_test_says_which_package(tmp_path: Path, monkeypatch) -> None:
    from tasks import azure_vhd, cli

    monkeypatch.setattr(qemu, "OVMF_CANDIDATES", (qemu.Firmware(tmp_path / "OVMF.fd"),))
    loaded = load(None, env={"ARCHKERNEL_WORKDIR": str(tmp_path / "build"), **GEN2}, cwd=tmp_path)
    s = loaded.settings
    (test,) = boottest.boot_tests(s)
    with pytest.raises(UserError, match="no OVMF") as err:
        boottest.boot(s, test=test)  # the plan cannot be made: the step fails
    assert "install 'ovmf'" in (err.value.hint or "")
    (step,) = azure_vhd.build_boottest(s)
    planned = cli._planned(step, loaded)  # --dry-run shows the problem, does not fail
    assert len(planned) == 1 and "install 'ovmf'" in str(planned[0])


# --- the builds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uefi(repo: offline.OfflineRepo) -> Build:
    """generation = 2: boots UEFI only."""
    return built(repo, "build-uefi", **GEN2)


@pytest.fixture(scope="module")
def hybrid(repo: offline.OfflineRepo) -> Build:
    """boot = "hybrid" (generation 1): boots with SeaBIOS and with UEFI."""
    return built(repo, "build-hybrid", **HYBRID)


def partitions(build: Build) -> list[dict[str, object]]:
    """The partitions of the VHD, as sfdisk reads them from the file itself."""
    out = subprocess.run(
        ["sfdisk", "--json", str(build.vhd)], capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out)["partitiontable"]["partitions"])


def partition(build: Build, number: int, role: disk.Role) -> disk.Partition:
    part = partitions(build)[number - 1]
    start, size = int(str(part["start"])) * 512, int(str(part["size"])) * 512
    return disk.Partition(number, start, size, str(part["type"]), "", role)


def checks(build: Build) -> dict[str, bool]:
    report = build.report()
    assert report["ok"] is True, [c for c in report["checks"] if not c["ok"]]
    return {c["name"]: c["ok"] for c in report["checks"]}


@pytest.mark.integration
@pytest.mark.root
def test_a_generation_2_image_verifies_with_the_uefi_rules(uefi: Build) -> None:
    names = checks(uefi)
    for rule in (
        "UEFI: GPT partition table",
        "UEFI: EFI system partition with a FAT",
        "UEFI: boot loader at EFI/BOOT/BOOTX64.EFI",
        "UEFI: boot loader looks for the root file system",
        "UEFI: ESP mounted at /efi by volume ID",
        "fstab root by UUID",
        "grub root=UUID",
    ):
        assert names[rule] is True
    assert not [name for name in names if name.startswith("BIOS:")]
    summary = (uefi.azure / "verify.txt").read_text()
    assert summary.endswith(f"{len(names)} passed, 0 failed\n")


@pytest.mark.integration
@pytest.mark.root
def test_a_hybrid_image_verifies_with_both_firmwares_rules(hybrid: Build) -> None:
    names = checks(hybrid)
    assert names["BIOS: boot code in the MBR"] is True
    assert names["BIOS: BIOS boot partition for GRUB's core.img"] is True
    assert names["UEFI: boot loader at EFI/BOOT/BOOTX64.EFI"] is True
    assert names["UEFI: ESP mounted at /efi by volume ID"] is True


@pytest.mark.parametrize("which", ["uefi", "hybrid"])
@pytest.mark.integration
@pytest.mark.root
def test_vhd_check_and_qemu_img_accept_the_image(which: str, request) -> None:
    build: Build = request.getfixturevalue(which)
    result = archkernel("vhd", "check", str(build.vhd))
    assert result.returncode == 0, result.stdout
    info = subprocess.run(
        ["qemu-img", "info", "-f", "vpc", "--output=json", str(build.vhd)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["virtual-size"] == build.disk_size == 1 << 30


@pytest.mark.integration
@pytest.mark.root
def test_the_generation_2_disk_is_esp_then_root_without_bios_boot_code(uefi: Build) -> None:
    types = [str(p["type"]).upper() for p in partitions(uefi)]
    assert types == [disk.ESP_GUID, disk.ROOT_X86_64_GUID]
    with open(uefi.vhd, "rb") as f:
        assert not any(f.read(440)), "only a protective MBR"


@pytest.mark.integration
@pytest.mark.root
def test_the_hybrid_disk_is_bios_boot_esp_root(hybrid: Build) -> None:
    types = [str(p["type"]).upper() for p in partitions(hybrid)]
    assert types == [disk.BIOS_BOOT_GUID, disk.ESP_GUID, disk.ROOT_X86_64_GUID]
    with open(hybrid.vhd, "rb") as f:
        mbr = f.read(512)
    boot_img = (grub.GRUB_I386_PC / "boot.img").read_bytes()
    assert mbr[0x68:0x1B8] == boot_img[0x68:0x1B8]  # GRUB's boot.img (its code)


@pytest.mark.parametrize(("which", "number"), [("uefi", 1), ("hybrid", 2)])
@pytest.mark.integration
@pytest.mark.root
def test_the_esp_holds_grubs_core_efi_at_the_removable_path(which: str, number: int, request):
    build: Build = request.getfixturevalue(which)
    part = partition(build, number, "esp")
    # Read from the VHD file itself (a fixed VHD is the disk with the footer after it).
    assert esp.list_files(build.vhd, part) == ESP_FILES
    loader = esp.read_file(build.vhd, part, esp.REMOVABLE_PATH_X64)
    root = partition(build, number + 1, "root")
    staged = ext4.read_ext4_file(build.vhd, root, "/boot/grub/x86_64-efi/core.efi")
    assert loader == staged
    assert grub.early_cfg(build.root_uuid()).encode() in loader
    esp.check_fat(build.vhd, part)


@pytest.mark.integration
@pytest.mark.root
def test_fstab_mounts_the_esp_by_its_volume_id_at_efi(uefi: Build) -> None:
    volume = json.loads((uefi.azure / "ids.json").read_text())["esp_volume"]
    assert disk.fs_uuid(uefi.vhd, partition(uefi, 1, "esp")) == volume
    fstab = image_file(uefi, "/etc/fstab")
    assert f"UUID={volume}\t/efi\tvfat\tumask=0077,nofail\t0 2" in fstab.splitlines()
    listing = subprocess.run(
        ["debugfs", "-R", "stat /efi", f"{uefi.vhd}?offset={partition(uefi, 2, 'root').start}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Type: directory" in listing  # the mount point exists in the image
    # A generation 2 image carries only GRUB's EFI platform.
    assert "x86_64-efi" in image_file_listing(uefi, "/boot/grub")
    assert "i386-pc" not in image_file_listing(uefi, "/boot/grub")


def image_file_listing(build: Build, directory: str) -> str:
    root = partitions(build)[-1]
    device = f"{build.vhd}?offset={int(str(root['start'])) * 512}"
    return subprocess.run(
        ["debugfs", "-R", f"ls {directory}", device], capture_output=True, text=True, check=True
    ).stdout


# --- re-running ----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.root
def test_a_rerun_of_a_hybrid_build_runs_nothing(hybrid: Build) -> None:
    again = hybrid.run()
    assert again.returncode == 0, again.stderr[-3000:]
    assert outcomes(again.stderr) == {step: "up to date" for step in STEPS}


@pytest.mark.integration
@pytest.mark.root
def test_a_bios_build_switched_to_generation_2_re_runs_from_step_3_and_verifies(
    repo: offline.OfflineRepo,
) -> None:
    build = built(repo, "build-switched", ARCHKERNEL_AZURE__DISK_SIZE=UEFI_DISK_SIZE)
    assert "UEFI: GPT partition table" not in checks(build)
    build.env["ARCHKERNEL_AZURE__GENERATION"] = "2"
    steps = build.archkernel("steps", WORKFLOW)
    assert steps.returncode == 0, steps.stderr
    states = {
        line.split()[0].split(":")[1]: line.split(None, 1)[1].strip()
        for line in steps.stdout.splitlines()
        if line.startswith(WORKFLOW)
    }
    # pacstrap reads none of the firmware settings: it re-runs only if step 1 changes the
    # pacman.conf (it does not).
    assert states["02_pacstrap"] == "after earlier steps"
    for step in ("01_preflight", "03_configure", "06_disk", "07_bootloader", "09_verify"):
        assert states[step] == "will re-run", steps.stdout
    assert "setting azure.generation: 1 -> 2" in steps.stdout
    result = build.run()
    assert result.returncode == 0, result.stderr[-5000:]
    # Step 3 makes a new copy of the tree (fstab now mounts the ESP): the agent and the
    # initramfs are made again in it, although their own settings did not change.
    assert outcomes(result.stderr) == {
        step: "up to date" if step == "02_pacstrap" else "done in" for step in STEPS
    }
    names = checks(build)
    assert names["UEFI: ESP mounted at /efi by volume ID"] is True
    assert names["Hyper-V drivers in initramfs-linux.img"] is True
    assert not [name for name in names if name.startswith("BIOS:")]
    assert "i386-pc" not in image_file_listing(build, "/boot/grub")


@pytest.mark.integration
@pytest.mark.root
def test_dry_run_shows_the_uefi_commands_and_changes_nothing(hybrid: Build) -> None:
    before = hybrid.vhd.stat()
    result = hybrid.archkernel("run", WORKFLOW, "--from", "6", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run   azure_vhd:06_disk" in out and "because forced by --from" in out
    assert "+ grub-mkimage --format x86_64-efi" in out
    assert "+ mkfs.fat -F 32" in out and f"-i {hybrid_volume(hybrid)}" in out
    assert f"+ mkfs.ext4 -F -q -b 4096 -I 256 -i 16384 -m 5 -U {hybrid.root_uuid()}" in out
    assert "+ grub-bios-setup --directory" in out
    assert "+ mcopy -s -m -Q -D o -i" in out
    assert "# append the 512-byte fixed-VHD footer (1GiB)" in out
    after = hybrid.vhd.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)


def hybrid_volume(build: Build) -> str:
    return esp.volume_id(json.loads((build.azure / "ids.json").read_text())["esp_volume"])


@pytest.mark.integration
@pytest.mark.root
def test_from_7_installs_grub_again_into_the_same_disk_and_it_verifies(hybrid: Build) -> None:
    result = hybrid.run("--from", "7")
    assert result.returncode == 0, result.stderr[-5000:]
    assert outcomes(result.stderr) == {s: "up to date" if s < "07" else "done in" for s in STEPS}
    assert hybrid.report()["ok"] is True
    assert esp.list_files(hybrid.vhd, partition(hybrid, 2, "esp")) == ESP_FILES


# --- booting --------------------------------------------------------------------------------------


def assert_booted_into_the_image(build: Build, console: str, root_device: str) -> None:
    facts = boot_facts(console)
    assert facts["rootuuid"] == facts["fstab"] == build.root_uuid()
    assert facts["root"] == root_device
    assert facts["hostname"] == offline.HOSTNAME
    assert f"\n{offline.HOSTNAME} login:" in console


def read_console(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


@pytest.mark.vm
@needs_ovmf
@pytest.mark.root
def test_ovmf_boots_the_generation_2_image_through_grub_into_it(uefi: Build) -> None:
    booted = run_boottest(uefi)
    assert outcomes(booted.stderr, "azure_boottest") == {"01_boot": "done in"}
    console = uefi.console()
    # OVMF started BOOTX64.EFI from the removable path (no NVRAM entry), the kernel ran on UEFI.
    assert "BdsDxe: starting Boot" in console
    assert "efi: EFI v" in console
    assert f"root=UUID={uefi.root_uuid()} rw console=ttyS0,115200" in console
    # The UEFI boot puts the disk on NVMe, as Azure's generation 2 v6 sizes do.
    assert_booted_into_the_image(uefi, console, "/dev/nvme0n1p2")


@pytest.mark.vm
@needs_ovmf
@pytest.mark.root
def test_the_hybrid_image_boots_with_seabios_and_with_ovmf(hybrid: Build) -> None:
    booted = run_boottest(hybrid)
    assert outcomes(booted.stderr, "azure_boottest") == {
        "01_boot": "done in",
        "02_boot_uefi": "done in",
    }
    seabios = hybrid.console()  # boottest.log: generation 1's firmware
    assert "efi: EFI v" not in seabios and "GNU GRUB" in seabios
    assert_booted_into_the_image(hybrid, seabios, "/dev/sda3")
    ovmf = read_console(hybrid.azure / "boottest-uefi.log")
    assert "efi: EFI v" in ovmf
    assert_booted_into_the_image(hybrid, ovmf, "/dev/nvme0n1p3")
    stamp = json.loads((hybrid.azure / "boottest-uefi.json").read_text())
    assert stamp["firmware"] == "uefi" and stamp["marker"] == "login:"


@pytest.mark.integration
@pytest.mark.root
def test_no_build_left_anything_mounted_or_attached(repo: offline.OfflineRepo, uefi, hybrid):
    assert leftovers(repo.dir) == []
