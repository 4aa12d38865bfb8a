"""QEMU: the command line (pure), console clean-up (pure), and the process for real.

The real tests boot small GRUB disks built by tests/support/grub.py's helper whose grub.cfg
prints a line and then waits or powers off, so each test knows exactly what the console
shows. After each one no QEMU process of the test may be left.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host import qemu
from archkernel.host.run import missing_tools
from tests.support.grub import TOOLS, build_bios_image
from tests.support.grub import host_grub as needs_grub_disk

LOG = Path("/w/serial.log")
# fmt: off
BASE = [
    "qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "512",
    "-display", "none", "-nic", "none", "-no-reboot",
    "-serial", "file:/w/serial.log", "-monitor", "none",
]
# fmt: on


# --- qemu_argv --------------------------------------------------------------------------------


def test_argv_for_a_raw_disk() -> None:
    assert qemu.qemu_argv(disk=Path("/w/disk.raw"), serial_log=LOG) == [
        *BASE,
        "-drive",
        "file=/w/disk.raw,format=raw,if=ide,media=disk,snapshot=on",
    ]


def test_argv_for_a_fixed_vhd_written_to_by_the_guest() -> None:
    assert qemu.qemu_argv(
        disk=Path("/w/disk.vhd"), disk_format="vpc", serial_log=LOG, snapshot=False, memory=2048
    )[-2:] == [
        "-drive",
        "file=/w/disk.vhd,format=vpc,if=ide,media=disk",
    ]
    assert "2048" in qemu.qemu_argv(disk=Path("/d"), serial_log=LOG, memory=2048)


def test_argv_for_a_kernel_with_initrd_and_command_line() -> None:
    assert qemu.qemu_argv(
        kernel=Path("/k/vmlinuz"),
        initrd=Path("/k/initrd.img"),
        append="console=ttyS0 panic=-1",
        serial_log=LOG,
        extra=["-smp", "2"],
    ) == [
        *BASE,
        "-kernel",
        "/k/vmlinuz",
        "-initrd",
        "/k/initrd.img",
        "-append",
        "console=ttyS0 panic=-1",
        "-smp",
        "2",
    ]


def test_argv_with_firmware_and_a_comma_in_the_disk_path() -> None:
    argv = qemu.qemu_argv(
        disk=Path("/w/a,b.raw"), serial_log=LOG, firmware=Path("/usr/share/ovmf/OVMF.fd")
    )
    assert argv[len(BASE) :] == [
        "-bios",
        "/usr/share/ovmf/OVMF.fd",
        "-drive",
        "file=/w/a,,b.raw,format=raw,if=ide,media=disk,snapshot=on",
    ]


def test_split_ovmf_is_two_flash_drives_with_the_variables_in_a_snapshot() -> None:
    ovmf = qemu.Firmware(Path("/fw/OVMF_CODE_4M.fd"), Path("/fw/OVMF_VARS_4M.fd"))
    argv = qemu.qemu_argv(disk=Path("/w/d.vhd"), disk_format="vpc", serial_log=LOG, firmware=ovmf)
    assert argv[len(BASE) :] == [
        "-drive",
        "if=pflash,unit=0,format=raw,readonly=on,file=/fw/OVMF_CODE_4M.fd",
        "-drive",
        "if=pflash,unit=1,format=raw,snapshot=on,file=/fw/OVMF_VARS_4M.fd",
        "-drive",
        "file=/w/d.vhd,format=vpc,if=ide,media=disk,snapshot=on",
    ]
    combined = qemu.Firmware(Path("/usr/share/ovmf/OVMF.fd"))
    assert combined.argv() == ["-bios", "/usr/share/ovmf/OVMF.fd"]


def test_find_ovmf_takes_the_first_build_whose_files_all_exist(tmp_path: Path) -> None:
    code, variables, whole = (tmp_path / n for n in ("CODE.fd", "VARS.fd", "OVMF.fd"))
    code.write_bytes(b"c")
    variables_missing = qemu.Firmware(code, tmp_path / "NO_VARS.fd")
    split = qemu.Firmware(code, variables)
    candidates = [qemu.Firmware(whole), variables_missing, split]
    with pytest.raises(UserError):
        qemu.find_ovmf(candidates)  # a code image without its variable store is no use
    variables.write_bytes(b"v")
    assert qemu.find_ovmf(candidates) == split
    whole.write_bytes(b"o")
    assert qemu.find_ovmf(candidates) == qemu.Firmware(whole)


def test_without_ovmf_the_error_names_the_packages(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no OVMF .* found; looked for .*/OVMF\.fd") as err:
        qemu.find_ovmf([qemu.Firmware(tmp_path / "OVMF.fd")])
    assert "'ovmf' on Debian/Ubuntu" in (err.value.hint or "")
    assert "'edk2-ovmf' on Arch Linux" in (err.value.hint or "")
    # The distributions' places are all known, Debian's combined image first.
    assert qemu.OVMF_CANDIDATES[0] == qemu.Firmware(Path("/usr/share/ovmf/OVMF.fd"))
    codes = {f.code for f in qemu.OVMF_CANDIDATES}
    assert {Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/edk2/x64/OVMF.4m.fd")} <= codes


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({}, "a disk or a kernel"),
        ({"disk": Path("/d"), "initrd": Path("/i")}, "need a kernel"),
        ({"disk": Path("/d"), "append": "quiet"}, "need a kernel"),
        ({"disk": Path("/d"), "disk_format": "qcow2"}, "disk_format"),
    ],
)
def test_argv_refuses_contradictions(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        qemu.qemu_argv(serial_log=LOG, **kwargs)  # type: ignore[arg-type]


# --- console text -----------------------------------------------------------------------------

GRUB_CONSOLE = (
    "GRUB loading.\r\n\x1b[0;30;47mWelcome to GRUB!\r\n\r\n"
    "\x1b[0m\x1b[H\x1b[J\x1b[1;1HARCHKERNEL\x1b[12;02H-OK\r\n"
    + "".join(f"line {n}\r\n" for n in range(30))
)


def test_clean_console_drops_escape_sequences_and_carriage_returns() -> None:
    assert qemu.clean_console("\x1b[0;30;47mWelcome\r\n\x1b(B\x1b[?25lok\x1b=") == "Welcome\nok"
    assert "ARCHKERNEL-OK" in qemu.clean_console(GRUB_CONSOLE)


def test_console_tail_is_the_last_twenty_lines() -> None:
    tail = qemu.console_tail(GRUB_CONSOLE)
    assert tail.splitlines() == [f"line {n}" for n in range(10, 30)]
    assert qemu.console_tail("a\n\n\nb\n", lines=5) == "a\nb"


# --- for real ---------------------------------------------------------------------------------


def qemu_pids(needle: Path) -> list[int]:
    """Processes whose command line mentions `needle` (our test's directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.fsencode(needle) in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def console(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def waiting_cfg(text: str) -> str:
    return (
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
        f"echo {text}\nsleep 600\n"
    )


needs_qemu = pytest.mark.skipif(
    bool(missing_tools(["qemu-system-x86_64", *TOOLS])), reason="needs qemu-system-x86"
)


@needs_grub_disk
@pytest.mark.vm
@needs_qemu
def test_a_marker_that_never_comes_times_out_with_the_console_tail(tmp_path: Path) -> None:
    image, _ = build_bios_image(tmp_path, "gpt", waiting_cfg("WAITING-FOREVER"))
    log = tmp_path / "serial.log"
    argv = qemu.qemu_argv(disk=image, serial_log=log)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        qemu.boot_and_wait(argv, log, "NEVER-PRINTED", timeout=5)
    assert 5 <= time.monotonic() - start < 5 + 10
    assert "'NEVER-PRINTED' never appeared" in err.value.message
    assert "did not appear within 5s" in err.value.message
    assert "    WAITING-FOREVER" in err.value.message
    assert str(log) in (err.value.hint or "")
    assert qemu_pids(tmp_path) == []

    result = qemu.boot_and_wait(argv, log, "NEVER-PRINTED", timeout=3, check=False)
    assert not result.found and result.elapsed >= 3
    assert result.log_tail.endswith("WAITING-FOREVER")
    assert qemu_pids(tmp_path) == []


@needs_grub_disk
@pytest.mark.vm
@needs_qemu
def test_the_marker_stops_the_vm_at_once(tmp_path: Path) -> None:
    image, _ = build_bios_image(tmp_path, "mbr", waiting_cfg("BOOTED-AND-WAITING"))
    log = tmp_path / "serial.log"
    log.write_text("BOOTED-AND-WAITING from an earlier run\n")  # must not count
    result = qemu.boot_and_wait(
        qemu.qemu_argv(disk=image, serial_log=log), log, "BOOTED-AND-WAITING", timeout=60
    )
    assert result.found and result.elapsed < 60
    assert "earlier run" not in log.read_text()
    assert qemu_pids(tmp_path) == []  # stopped although GRUB was still sleeping


@needs_grub_disk
@pytest.mark.vm
@needs_qemu
def test_qemu_exiting_first_is_reported_as_such(tmp_path: Path) -> None:
    halting = waiting_cfg("ABOUT-TO-HALT").replace("sleep 600", "halt")
    image, _ = build_bios_image(tmp_path, "gpt", halting)
    log = tmp_path / "serial.log"
    with pytest.raises(UserError) as err:
        qemu.boot_and_wait(qemu.qemu_argv(disk=image, serial_log=log), log, "NOPE", 60)
    assert "QEMU exited with code 0" in err.value.message
    assert "ABOUT-TO-HALT" in err.value.message

    with pytest.raises(UserError) as err:
        qemu.boot_and_wait(
            qemu.qemu_argv(disk=image, serial_log=log, extra=["-no-such-option"]), log, "NOPE", 60
        )
    assert "QEMU exited with code 1" in err.value.message
    assert "-no-such-option" in err.value.message  # QEMU's own complaint is quoted
    assert qemu_pids(tmp_path) == []


@needs_grub_disk
@pytest.mark.vm
@needs_qemu
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_inside_qemu_process_stops_qemu(
    tmp_path: Path, error: type[BaseException]
) -> None:
    image, _ = build_bios_image(tmp_path, "gpt", waiting_cfg("RUNNING"))
    log = tmp_path / "serial.log"
    with pytest.raises(error), qemu.qemu_process(qemu.qemu_argv(disk=image, serial_log=log)) as vm:
        deadline = time.monotonic() + 30
        while "RUNNING" not in console(log):
            assert time.monotonic() < deadline and vm.running
            time.sleep(0.1)
        assert len(qemu_pids(tmp_path)) == 1
        raise error()
    assert not vm.running
    assert qemu_pids(tmp_path) == []


def test_a_missing_qemu_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.fspath(tmp_path))
    log = tmp_path / "serial.log"
    with pytest.raises(UserError, match="command not found: qemu-system-x86_64") as err:
        qemu.boot_and_wait(
            qemu.qemu_argv(disk=tmp_path / "d.raw", serial_log=log), log, "X", timeout=10
        )
    assert "qemu-system-x86" in (err.value.hint or "")
