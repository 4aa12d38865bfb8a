"""QEMU: the command line (pure), console clean-up (pure), and the process for real.

The real tests boot small GRUB disks built by tests/support/grub.py's helper whose grub.cfg
prints a line and then waits or powers off, so each test knows exactly what the console
shows. After each one no QEMU process of the test may be left.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host import console as screen
from archkernel.host import qemu
from archkernel.host.run import missing_tools
from archkernel.log import log
from tests.support.grub import TOOLS, build_bios_image
from tests.support.grub import host_grub as needs_grub_disk
from tests.support.processes import wait_for

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
    assert screen.clean_console("\x1b[0;30;47mWelcome\r\n\x1b(B\x1b[?25lok\x1b=") == "Welcome\nok"
    assert "ARCHKERNEL-OK" in screen.clean_console(GRUB_CONSOLE)


def test_console_tail_is_the_last_twenty_lines() -> None:
    tail = screen.console_tail(GRUB_CONSOLE)
    assert tail.splitlines() == [f"line {n}" for n in range(10, 30)]
    assert screen.console_tail("a\n\n\nb\n", lines=5) == "a\nb"


def _frame(row: int) -> bytes:
    return b"\x1b[%d;2H|\x1b[%d;79H|" % (row, row)


# GRUB 2.06's menu on a serial console, written by hand after a real one: drawn with cursor
# moves, no newline between its rows, each row padded to the frame; a countdown rewritten
# in place; then a failed boot, and the menu again.
BORDER = b"+" + b"-" * 76 + b"+"
GRUB_MENU = (
    b"\x1b[?25l\x1b[m\x1b[H\x1b[J\x1b[1;1H\x1b[2;24HGNU GRUB  version 2.06\n\r\n\r"
    b"\x1b[m\x1b[4;2H"
    + BORDER
    + _frame(5)
    + _frame(6)
    + _frame(7)
    + b"\x1b[8;2H"
    + BORDER
    + b"\x1b[m\x1b[9;2H\x1b[10;2H\x1b[m     Use the ^ and v keys to select which entry is"
    b" highlighted.          \n\r      Press enter to boot the selected OS.       "
    b"\x1b[5;80H \x1b[7m\x1b[5;3H*Arch Linux"
    + b" " * 65
    + b"\x1b[m\x1b[5;78H\x1b[m\x1b[6;3H Arch Linux (fallback initramfs)"
    + b" " * 44
    + b"\x1b[m\x1b[6;78H\x1b[m\x1b[7;3H"
    + b" " * 76
    + b"\x1b[m\x1b[7;78H"
    + b"".join(
        b"\x1b[5;78H\x1b[13;1H   The highlighted entry will be executed automatically in %ds."
        b"                 " % n
        for n in (3, 2, 1, 0)
    )
    + b"\x1b[5;78H\x1b[?25h\x1b[H\x1b[J\x1b[1;1H  Booting `Arch Linux'\n\r\n\r"
    b"error: file `/boot/vmlinuz-linux' not found.\n\r\n\rPress any key to continue...\n\r"
    b"\x1b[?25l\x1b[m\x1b[H\x1b[J\x1b[1;1H\x1b[2;24HGNU GRUB  version 2.06\n\r\n\r"
    b"\x1b[m\x1b[4;2H"
    + BORDER
    + _frame(5)
    + _frame(6)
    + b"\x1b[5;3H*Arch Linux"
    + b" " * 65
    + b"\x1b[6;3H Arch Linux (fallback initramfs)"
    + b"\x1b[13;1H"
    + b" " * 79
    + b"\x1b[5;78H"
)


def test_a_grub_menu_is_shown_as_its_lines_not_one_long_line() -> None:
    text = GRUB_MENU.decode()
    assert screen.console_tail(text).splitlines() == [
        "GNU GRUB  version 2.06",
        "     Use the ^ and v keys to select which entry is highlighted.",
        "      Press enter to boot the selected OS.",
        "*Arch Linux",
        " Arch Linux (fallback initramfs)",
        "   The highlighted entry will be executed automatically in 0s.",
        "  Booting `Arch Linux'",
        "error: file `/boot/vmlinuz-linux' not found.",
        "Press any key to continue...",
        "GNU GRUB  version 2.06",
        "*Arch Linux",
        " Arch Linux (fallback initramfs)",
    ]
    assert screen.console_tail(text, lines=2) == "*Arch Linux\n Arch Linux (fallback initramfs)"
    assert screen.last_console_line(text) == "Arch Linux (fallback initramfs)"
    # The marker is still found in text split by escape sequences.
    assert "GNU GRUB  version 2.06" in screen.clean_console(text)


def test_console_lines_keep_the_text_after_a_carriage_return_and_cut_endless_lines() -> None:
    assert screen.console_lines("fsck 10%\rfsck 60%\rfsck done\r\n") == ["fsck done"]
    (line,) = screen.console_lines("x" * 1000)
    assert line == "x" * (screen.TAIL_WIDTH - 3) + "..."
    # Only the end of a long log is looked at for the progress line.
    assert screen.last_console_line("\x1b[2;3Hold\n" + "y" * 20000 + "\nlast one\n") == "last one"


# --- progress ---------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def info_log() -> Iterator[None]:
    level = log.level
    log.setLevel(logging.INFO)
    yield
    log.setLevel(level)


def test_progress_on_a_terminal_is_one_line_rewritten_in_place(info_log: None) -> None:
    out = Terminal()
    progress = screen.BootProgress("booting with SeaBIOS", stream=out, width=60)
    progress.update(0.2, "")
    progress.update(0.4, "")  # the same line: not written again
    progress.update(3.0, "SeaBIOS (version 1.16.2)\r\nBooting from Hard Disk...\r\n")
    progress.update(12.4, GRUB_MENU.decode())  # cut to the width, 59 characters
    progress.close()
    assert out.getvalue() == (
        "\r\x1b[Kbooting with SeaBIOS: 0s, nothing on the console yet"
        "\r\x1b[Kbooting with SeaBIOS: 3s, console: Booting from Hard Disk.."
        "\r\x1b[Kbooting with SeaBIOS: 12s, console: Arch Linux (fallback in"
        "\r\x1b[K"
    )


def test_progress_without_a_terminal_size_takes_eighty_columns(info_log: None) -> None:
    out = Terminal()  # no file descriptor, as a pseudo-terminal of size 0 x 0
    progress = screen.BootProgress("booting", stream=out)
    progress.update(61.0, "x" * 200 + "\n")
    assert out.getvalue() == "\r\x1b[K" + ("booting: 61s, console: " + "x" * 200)[:79]


def test_progress_in_a_plain_log_is_a_line_every_ten_seconds(info_log: None) -> None:
    said: list[str] = []
    progress = screen.BootProgress(
        "booting with OVMF (UEFI)", stream=io.StringIO(), say=said.append
    )
    for elapsed in (0.2, 5.0, 9.8, 10.0, 12.0, 19.9, 20.1, 35.0, 36.0):
        progress.update(elapsed, f"line at {elapsed}\r\n")
    progress.close()
    assert said == [
        "booting with OVMF (UEFI): 10s, console: line at 10.0",
        "booting with OVMF (UEFI): 20s, console: line at 20.1",
        "booting with OVMF (UEFI): 35s, console: line at 35.0",
    ]


def test_no_progress_when_the_log_is_quiet() -> None:
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        out, said = Terminal(), []
        for stream in (out, io.StringIO()):
            progress = screen.BootProgress("booting", stream=stream, say=said.append)
            progress.update(30.0, "hello\n")
            progress.close()
    finally:
        log.setLevel(level)
    assert out.getvalue() == "" and said == []


# Stands in for QEMU: writes its pid file (-pidfile PATH is appended), then a console.
FAKE_QEMU = """\
import os, sys, time
console, pidfile = sys.argv[1], sys.argv[sys.argv.index("-pidfile") + 1]
with open(pidfile, "w") as f:
    f.write(str(os.getpid()))
with open(console, "w") as f:
    f.write("\\x1b[2;24HGNU GRUB\\x1b[5;3H*Arch Linux     ")
    f.flush()
    time.sleep(0.5)
    f.write("\\r\\nLoading Linux linux ...\\r\\narchlinux login: ")
    f.flush()
    time.sleep(120)
"""


def test_boot_and_wait_shows_progress_until_the_marker(tmp_path: Path, info_log: None) -> None:
    log_file = tmp_path / "serial.log"
    out = Terminal()
    progress = screen.BootProgress("booting", stream=out, width=100)
    argv = [sys.executable, "-c", FAKE_QEMU, str(log_file)]
    result = qemu.boot_and_wait(argv, log_file, "login:", 60, progress=progress)
    assert result.found
    shown = out.getvalue()
    assert shown.startswith("\r\x1b[Kbooting: ")
    # The look that found the marker showed it; then the line was erased.
    assert shown.endswith(", console: archlinux login:\r\x1b[K")
    assert qemu_pids(tmp_path) == []


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
    # GRUB prints within a few seconds under TCG, but a loaded CI machine can take longer:
    # the timeout leaves room, or the tail would be "(nothing)".
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        qemu.boot_and_wait(argv, log, "NEVER-PRINTED", timeout=30)
    assert 30 <= time.monotonic() - start < 30 + 10
    assert "'NEVER-PRINTED' never appeared" in err.value.message
    assert "did not appear within 30s" in err.value.message
    assert "    WAITING-FOREVER" in err.value.message
    assert str(log) in (err.value.hint or "")
    assert qemu_pids(tmp_path) == []

    # Without check, the same ending is a result.
    result = qemu.boot_and_wait(argv, log, "NEVER-PRINTED", timeout=30, check=False)
    assert not result.found and result.elapsed >= 30
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
        qemu.qemu_argv(disk=image, serial_log=log), log, "BOOTED-AND-WAITING", timeout=300
    )
    assert result.found
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
        qemu.boot_and_wait(qemu.qemu_argv(disk=image, serial_log=log), log, "NOPE", 300)
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
        wait_for(lambda: "RUNNING" in qemu.read_log(log) or not vm.running, "GRUB", timeout=120)
        assert vm.running
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
