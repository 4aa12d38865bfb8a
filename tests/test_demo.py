"""`archkernel demo`: the workflows on an embedded default, as a newcomer runs them.

The first tests need nothing but Python: what the demos print (from hand-made results),
the tool checks that run before anything is downloaded, the help, and the mirror error
that points at the demo. The end-to-end tests run `archkernel demo azure_vhd DIR` and
`archkernel demo scaleway_kexec DIR` in a separate process, exactly as the README's
first command does, and check what they print and leave.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from archkernel.azure.preflight import _probe_mirror
from archkernel.demo import azure as demo_azure
from archkernel.demo import c1 as demo_c1
from archkernel.demo import scaleway as demo_scaleway
from archkernel.errors import UserError
from archkernel.settings import load
from tasks import cli
from tests.support.azure import STEPS, outcomes, path_without
from tests.support.kernel_state import leftovers

REPO = Path(__file__).resolve().parent.parent
# The fake C1's command line (archkernel.demo.c1.CMDLINE) as the workflow kexecs it: its
# NO_NTPDATE=0 replaced, the extra tokens appended.
KEXEC_CMDLINE = (
    # The provider's line less `ip=` (scaleway.drop_cmdline: its init configures the NIC).
    "console=ttyS0,115200 root=/dev/nbd0 nbd.max_parts=8 nbd.nbds_max=3 boot=local nousb "
    "noplymouth INITRD_DEBUG=0 is_in_kexec=yes NO_SIGNAL_STATE=1 DONT_FETCH_KERNEL_MODULES=1 "
    "NO_NTPDATE=1 archkernel"
)


def demo(
    *args: str, path: str | None = None, timeout: float = 1800
) -> subprocess.CompletedProcess[str]:
    """`archkernel demo ARGS...` in a new process, with none of our ARCHKERNEL_* settings
    (the download cache is kept) and every step audited for the settings it reads."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ARCHKERNEL_") or k == "ARCHKERNEL_TEST_CACHE"
    }
    env["PYTHONPATH"] = str(REPO)
    env["ARCHKERNEL_AUDIT_SETTINGS"] = "1"
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "tasks.cli", "demo", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- what the demos say, from hand-made results -----------------------------------------------


def test_azure_report_names_the_image_the_verify_result_and_the_boot(tmp_path):
    result = demo_azure.Outcome(
        vhd=Path("/d/build/azure/archlinux-azure.vhd"),
        size=512 * 2**20 + 512,
        allocated=230 * 2**20,
        verify_result="41 passed, 0 failed",
        verify_report=Path("/d/build/azure/verify.txt"),
        boots=[demo_azure.Boot("SeaBIOS", "login:", 12.34, Path("/d/build/azure/boottest.log"))],
    )
    assert demo_azure.report(result, Path("/d/settings.toml")) == [
        "archkernel demo azure_vhd: done",
        "  image:     /d/build/azure/archlinux-azure.vhd",
        "             fixed VHD of 512 MiB, 230 MiB allocated (sparse)",
        "  verify:    41 passed, 0 failed (/d/build/azure/verify.txt)",
        "  boot test: passed with SeaBIOS: 'login:' on the serial console after 12.3s "
        "(/d/build/azure/boottest.log)",
        "  settings:  /d/settings.toml",
        "  again:     archkernel run azure_vhd --settings /d/settings.toml",
    ]


def test_scaleway_report_names_the_command_line_what_was_added_and_the_calls():
    template = demo_c1.Template(Path("/d/template"), "6.1.0-9-amd64", Path("/k"), {})
    c1 = demo_c1.FakeC1(Path("/d/c1"), template)
    load_call = ["kexec", "-l", "/d/c1/root/boot/zImage", "--initrd=/d/c1/i.img",
                 "--command-line=root=/dev/nbd0 archkernel"]  # fmt: skip
    result = demo_scaleway.Outcome(
        calls=[load_call, ["systemctl", "kexec"]],
        output=Path("/d/c1/i.img"),
        output_size=2000,
        provider_size=1500,
        added=[
            demo_scaleway.Added("archkernel/modules", "dir", 0o755, 0),
            demo_scaleway.Added(
                "archkernel/modules/nbd.ko", "file", 0o644, 300, "kernel/drivers/block/nbd.ko.xz"
            ),
            demo_scaleway.Added("init", "file", 0o755, 100),
        ],
    )
    assert result.command_line == "root=/dev/nbd0 archkernel"
    assert demo_scaleway.report(result, c1) == [
        "archkernel demo scaleway_kexec: done",
        "  cmdline:   root=/dev/nbd0 archkernel",
        "  initrd:    /d/c1/i.img (2000 bytes): the provider's 1500 bytes unchanged, then an "
        "archive adding",
        "             rwxr-xr-x        0  /archkernel/modules/",
        "             rw-r--r--      300  /archkernel/modules/nbd.ko  "
        "<- kernel/drivers/block/nbd.ko.xz, decompressed",
        "             rwxr-xr-x      100  /init",
        "  recorded:  the stand-ins in /d/c1/bin were asked (nothing was kexec'd):",
        "             kexec -l /d/c1/root/boot/zImage --initrd=/d/c1/i.img "
        "'--command-line=root=/dev/nbd0 archkernel'",
        "             systemctl kexec",
    ]


def test_azure_demo_checks_the_repository_build_and_boot_tools(tmp_path):
    (tmp_path / "settings.toml").write_text('[azure]\npacman_conf = "pacman.conf"\n')
    tools = demo_azure.tools(load(tmp_path / "settings.toml", env={}).settings)
    for tool in ("bsdtar", "repo-add", "apt-get", "pacstrap", "mkfs.ext4", "qemu-system-x86_64"):
        assert tool in tools


# --- the command ------------------------------------------------------------------------------


def test_demo_help_has_both_workflows_and_examples(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "usage: archkernel demo [-h] [-v] [-q] [--profile {small,functional}]" in out
    assert "{azure_vhd,scaleway_kexec} [dir]" in out
    assert "\nexamples:\n  archkernel demo azure_vhd " in out
    assert "\n  archkernel demo scaleway_kexec " in out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "azure_vhd", "--profile", "functional", "DIR"],
        ["demo", "--profile", "functional", "azure_vhd", "DIR"],
        ["demo", "azure_vhd", "DIR", "--profile", "functional"],
    ],
)
def test_demo_reads_dir_wherever_the_profile_is(argv, monkeypatch):
    seen = []

    def azure_vhd(directory, flags, profile):
        seen.append((directory, profile))
        return 0

    monkeypatch.setattr("tasks.demo.azure_vhd", azure_vhd)
    assert cli.main(argv) == 0
    assert seen == [(Path("DIR"), "functional")]


def test_demo_refuses_a_second_directory(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "azure_vhd", "--profile", "functional", "A", "B"])
    assert stop.value.code == 2
    assert "unrecognized arguments: A B" in capsys.readouterr().err


def test_demo_refuses_settings_of_its_own(tmp_path, capsys):
    assert cli.main(["--settings", str(tmp_path / "x.toml"), "demo", "azure_vhd"]) == 1
    assert "archkernel demo writes and uses its own settings" in capsys.readouterr().err


def test_a_missing_tool_is_named_with_its_package_before_anything_is_made(tmp_path):
    target = tmp_path / "demo"
    result = demo("scaleway_kexec", str(target), path=path_without(tmp_path / "bin", "mkimage"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("error: ") :]
    assert error.startswith(
        "error: archkernel demo scaleway_kexec needs 1 missing tool(s): mkimage\n"
        "  mkimage: install 'uboot-tools' on Arch Linux or 'u-boot-tools' on Debian/Ubuntu\n"
    )
    assert not target.exists()


def test_the_azure_demo_names_a_missing_tool_before_downloading(tmp_path):
    target = tmp_path / "demo"
    result = demo("azure_vhd", str(target), path=path_without(tmp_path / "bin", "pacstrap"))
    assert result.returncode == 1, result.stderr
    assert (
        "error: archkernel demo azure_vhd needs 1 missing tool(s): pacstrap\n"
        "  pacstrap: install 'arch-install-scripts' on Arch Linux or 'arch-install-scripts' "
        "on Debian/Ubuntu\n"
    ) in result.stderr
    assert sorted(p.name for p in target.iterdir()) == ["settings.toml"]


@pytest.mark.integration
def test_the_wheel_carries_the_stand_in_files_and_their_modes(wheel):
    members = {
        i.filename: (i.external_attr >> 16) & 0o777 for i in zipfile.ZipFile(wheel).infolist()
    }
    files = REPO / "archkernel/demo/files"
    for path in files.rglob("*"):
        if path.is_file():
            name = f"archkernel/demo/files/{path.relative_to(files).as_posix()}"
            assert name in members, name
            assert members[name] & 0o111 == path.stat().st_mode & 0o111, name
    assert members["archkernel/demo/files/mkinitcpio/usr/bin/mkinitcpio"] == 0o755


# --- item 1: the mirror error points at the demo ----------------------------------------------


def test_an_unreachable_mirror_points_at_the_demo_and_the_offline_build():
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused.
    with pytest.raises(UserError) as error:
        _probe_mirror("http://127.0.0.1:9/$repo/os/$arch", timeout=5)
    assert error.value.hint is not None
    assert "azure.pacman_conf" in error.value.hint
    assert "`archkernel demo azure_vhd` builds from an offline repository" in error.value.hint
    assert "(README: Offline build)" in error.value.hint


# --- end to end ------------------------------------------------------------------------------


def tftpd_processes_under(directory: Path) -> list[int]:
    """Processes whose command line names `directory` (the demo's in.tftpd, if left)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(directory).encode() in a for a in argv) and b"in.tftpd" in argv[0]:
            found.append(int(proc.name))
    return found


@pytest.mark.integration
@pytest.mark.root
def test_scaleway_demo_prints_the_kexec_line_and_records_the_calls(tmp_path):
    target = tmp_path / "c1-demo"
    result = demo("scaleway_kexec", str(target), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    root = target / "c1" / "root"
    kexec = [
        "kexec",
        "-l",
        str(root / "boot/zImage"),
        f"--initrd={root / 'boot/initramfs-archkernel.img'}",
        f"--command-line={KEXEC_CMDLINE}",
    ]
    assert f"\n  cmdline:   {KEXEC_CMDLINE}\n" in out
    assert (
        f"\n             kexec -l {root}/boot/zImage --initrd={root}/boot/initramfs-archkernel.img"
        f" '--command-line={KEXEC_CMDLINE}'\n             systemctl kexec\n"
    ) in out
    for added in ("/init\n", "/init.scw\n", "/archkernel/modules/nbd.ko  <- kernel/drivers/block/"):
        assert added in out
    calls = [json.loads(line) for line in (target / "c1/calls.jsonl").read_text().splitlines()]
    assert calls == [kexec, ["systemctl", "kexec"]]
    assert re.search(r"^scaleway_kexec:08_kexec: done in", result.stderr, re.M)
    assert tftpd_processes_under(target) == []


@pytest.mark.integration
@pytest.mark.vm
@pytest.mark.root
def test_azure_demo_builds_and_boots_and_resumes(tmp_path):
    target = tmp_path / "azure-demo"
    first = demo("azure_vhd", str(target))
    assert first.returncode == 0, first.stderr[-5000:]
    vhd = target / "build/azure/archlinux-azure.vhd"
    assert vhd.is_file()
    out = first.stdout
    # The tools' output comes first (stdout); the summary ends it.
    out = out[out.index("\narchkernel demo azure_vhd: done\n") :]
    assert out.endswith(
        f"  again:     archkernel run azure_vhd --settings {target}/settings.toml\n"
    )
    assert f"\n  image:     {vhd}\n" in out
    assert re.search(r"^  verify:    \d+ passed, 0 failed \(.*/verify\.txt\)$", out, re.M)
    assert re.search(
        r"^  boot test: passed with SeaBIOS: 'login:' on the serial console after [\d.]+s",
        out,
        re.M,
    )
    # The pacstrap-time initramfs: the stand-in says it is expected and who rebuilds it.
    assert (
        "archkernel's azure_vhd step 5 (05_initramfs) rebuilds the initramfs without "
        "autodetect" in first.stdout
    )
    # Run again: everything is up to date, the same summary.
    again = demo("azure_vhd", str(target), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert outcomes(again.stderr) == dict.fromkeys(STEPS, "up to date"), again.stderr
    assert outcomes(again.stderr, "azure_boottest") == {"01_boot": "up to date"}, again.stderr
    assert f"\n  image:     {vhd}\n" in again.stdout
    assert leftovers(target / "build") == []
