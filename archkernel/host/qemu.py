"""Boot a disk image or a kernel in QEMU and watch its serial console for a marker.

`qemu_argv` decides the command (pure). `qemu_process` runs it in the background and
stops it (SIGTERM, then SIGKILL) when its block ends, however it ends. `boot_and_wait`
polls the serial log until a marker appears, showing how it goes (`BootProgress`), and
quotes the console's last meaningful lines (`console_lines`) when it does not. `Boot` is
that boot as an operation of a plan (archkernel.plan): shown, and logged with -v, as the
QEMU command it runs.

Always TCG: KVM opens on the build machines but its guests hang. QEMU runs through
`archkernel.host.run.run` in a worker thread, so it gets the same minimal environment, logging
and error messages as every other command; its `-pidfile` is how we find the process to
stop (archkernel.host.background).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.background import Background
from archkernel.host.console import BootProgress, clean_console, console_tail
from archkernel.host.files import temporary_directory
from archkernel.plan import Run

QEMU = "qemu-system-x86_64"
DISK_FORMATS = ("raw", "vpc")
# How the boot disk is attached: IDE (Azure generation 1 as GRUB sees it), SCSI (a
# virtio-scsi controller, LUN 0) or NVMe (Azure's v6 sizes and newer).
DISK_INTERFACES = ("ide", "scsi", "nvme")
# The NVMe disk's serial number (the driver and udev show it).
NVME_SERIAL = "archkernel-os"
POLL_INTERVAL = 0.2


def _drive_value(path: Path) -> str:
    # QEMU option values separate keys with ',' and escape a literal ',' as ',,'.
    return os.fspath(path).replace(",", ",,")


@dataclass(frozen=True)
class Firmware:
    """A UEFI firmware build for QEMU: one image holding code and variable store (given
    as `-bios`), or a code image and a variable-store template (two flash drives)."""

    code: Path
    variables: Path | None = None

    def argv(self) -> list[str]:
        """The QEMU options that make this the machine's firmware."""
        if self.variables is None:
            return ["-bios", os.fspath(self.code)]
        code = f"if=pflash,unit=0,format=raw,readonly=on,file={_drive_value(self.code)}"
        # The guest may write variables (boot entries); a snapshot keeps the template as
        # it is, as `snapshot` does for the disk.
        store = f"if=pflash,unit=1,format=raw,snapshot=on,file={_drive_value(self.variables)}"
        return ["-drive", code, "-drive", store]

    def exists(self) -> bool:
        """Whether every file of this build is there."""
        return all(p is None or p.is_file() for p in (self.code, self.variables))


# Where distributions put OVMF (UEFI for QEMU's x86-64 PC), combined images first.
OVMF_CANDIDATES = (
    Firmware(Path("/usr/share/ovmf/OVMF.fd")),  # Debian, Ubuntu: ovmf
    Firmware(Path("/usr/share/edk2/x64/OVMF.4m.fd")),  # Arch: edk2-ovmf
    Firmware(Path("/usr/share/edk2-ovmf/x64/OVMF.fd")),  # older Arch
    Firmware(Path("/usr/share/qemu/OVMF.fd")),
    Firmware(Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd")),
    Firmware(Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
    Firmware(
        Path("/usr/share/edk2/x64/OVMF_CODE.4m.fd"), Path("/usr/share/edk2/x64/OVMF_VARS.4m.fd")
    ),
)
OVMF_HINT = "install 'ovmf' on Debian/Ubuntu or 'edk2-ovmf' on Arch Linux"


def find_ovmf(candidates: Sequence[Firmware] | None = None) -> Firmware:
    """The first OVMF build of `candidates` (default OVMF_CANDIDATES) whose files exist;
    UserError if none does."""
    candidates = OVMF_CANDIDATES if candidates is None else candidates
    for firmware in candidates:
        if firmware.exists():
            return firmware
    looked = ", ".join(os.fspath(f.code) for f in candidates)
    raise UserError(f"no OVMF (UEFI firmware for QEMU) found; looked for {looked}", OVMF_HINT)


def qemu_argv(
    *,
    serial_log: Path,
    disk: Path | None = None,
    disk_format: str = "raw",
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    memory: int = 512,
    firmware: Path | Firmware | None = None,
    snapshot: bool = True,
    disk_interface: str = "ide",
    data_disks: Sequence[Path] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command that boots `disk` (through its firmware) or `kernel` (directly).

    A PC with SeaBIOS like an Azure generation 1 VM: the disk on IDE, no network, no
    display, the first serial port written to `serial_log`, no monitor. `-display none`
    rather than `-nographic`: both work with an explicit `-serial`, but `-display none`
    never touches the terminal QEMU was started from. With `snapshot` (the default) the
    guest's writes go to a temporary overlay and the image stays as built. `firmware`
    replaces SeaBIOS: a file given as `-bios`, or a `Firmware` (OVMF, see `find_ovmf`).
    `disk_interface` attaches `disk` on IDE, SCSI (virtio-scsi, LUN 0) or NVMe (namespace
    1, serial NVME_SERIAL); `data_disks` (raw) go on a virtio-scsi controller of their own,
    the first at LUN 1, the next at LUN 2..., always as snapshots. `extra` is appended as is.
    """
    if disk is None and kernel is None:
        raise ValueError("qemu_argv needs a disk or a kernel to boot")
    if (initrd is not None or append is not None) and kernel is None:
        raise ValueError("initrd and append need a kernel")
    if disk_format not in DISK_FORMATS:
        raise ValueError(f"disk_format must be one of {DISK_FORMATS}, not {disk_format!r}")
    if disk_interface not in DISK_INTERFACES:
        raise ValueError(f"disk_interface must be one of {DISK_INTERFACES}, not {disk_interface!r}")
    # The machine: software emulation of a plain PC, as Azure generation 1 looks to GRUB.
    argv = [QEMU, "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", str(memory)]
    # No window, no network, no reboot loop; the console goes to the log, no monitor.
    argv += ["-display", "none", "-nic", "none", "-no-reboot"]
    argv += ["-serial", f"file:{os.fspath(serial_log)}", "-monitor", "none"]
    if isinstance(firmware, Firmware):
        argv += firmware.argv()
    elif firmware is not None:
        argv += ["-bios", os.fspath(firmware)]
    if disk is not None:
        argv += _disk_argv(disk, disk_format, disk_interface, snapshot)
    if data_disks:
        argv += ["-device", "virtio-scsi-pci,id=data"]
    for lun, data in enumerate(data_disks, start=1):
        drive = f"file={_drive_value(data)},format=raw,if=none,id=data{lun},snapshot=on"
        argv += ["-drive", drive, "-device", f"scsi-hd,drive=data{lun},bus=data.0,lun={lun}"]
    if kernel is not None:
        argv += ["-kernel", os.fspath(kernel)]
        if initrd is not None:
            argv += ["-initrd", os.fspath(initrd)]
        if append is not None:
            argv += ["-append", append]
    argv += list(extra)
    return argv


def _disk_argv(disk: Path, disk_format: str, interface: str, snapshot: bool) -> list[str]:
    """The options that attach the boot disk on `interface`."""
    drive = f"file={_drive_value(disk)},format={disk_format}"
    drive += ",if=ide,media=disk" if interface == "ide" else ",if=none,id=os"
    if snapshot:
        drive += ",snapshot=on"
    if interface == "ide":
        return ["-drive", drive]
    if interface == "scsi":
        devices = ["-device", "virtio-scsi-pci,id=scsi", "-device", "scsi-hd,drive=os,bus=scsi.0"]
    else:
        devices = ["-device", f"nvme,serial={NVME_SERIAL},drive=os"]
    return ["-drive", drive, *devices[:-1], f"{devices[-1]},bootindex=0"]


def pidfile_argv(argv: Sequence[str], pidfile: Path) -> list[str]:
    """`argv` with QEMU writing its pid to `pidfile`: the command `qemu_process` runs."""
    return [*argv, "-pidfile", os.fspath(pidfile)]


class QemuProcess(Background):
    """A QEMU started by `qemu_process`: whether it still runs, and how it ended."""

    def __init__(self, argv: Sequence[str], pidfile: Path, limit: float) -> None:
        super().__init__("qemu", pidfile_argv(argv, pidfile), pidfile, limit)


@contextlib.contextmanager
def qemu_process(
    argv: Sequence[str], *, limit: float = 3600.0, pidfile: Path | None = None
) -> Iterator[QemuProcess]:
    """Run QEMU in the background for the block; stop it and wait for it on any exit.

    `limit` (seconds) is the longest QEMU may run at all. QEMU writes its pid to `pidfile`
    (its directory is made; default: in a temporary directory).
    """
    with contextlib.ExitStack() as stack:
        if pidfile is None:
            pidfile = (
                stack.enter_context(temporary_directory(prefix="archkernel-qemu-")) / "qemu.pid"
            )
        vm = QemuProcess(argv, pidfile, limit)
        vm.start()
        try:
            yield vm
        finally:
            vm.stop()


@dataclass(frozen=True)
class BootResult:
    """How a boot went: whether the marker appeared, after how many seconds, and the
    last lines of the console (escape sequences removed)."""

    found: bool
    elapsed: float
    log_tail: str


def read_log(path: Path) -> str:
    """The serial console log as text so far (empty before QEMU made it)."""
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _contains(text: str, marker: str) -> bool:
    return marker in text or marker in clean_console(text)


def boot_and_wait(
    argv: Sequence[str],
    serial_log: Path,
    marker: str,
    timeout: float,
    *,
    check: bool = True,
    pidfile: Path | None = None,
    progress: BootProgress | None = None,
) -> BootResult:
    """Run QEMU (`argv` from qemu_argv, writing `serial_log`) until `marker` appears.

    `marker` is a plain substring of the console output. QEMU is stopped as soon as it
    appears, and on any other exit. With `check` (the default) a timeout or QEMU exiting
    first raises UserError quoting the console's last lines; otherwise the result says
    found=False. `progress` is told how the boot goes at every look at the console.
    """
    serial_log = Path(serial_log)
    # A log left from an earlier run could hold the marker already.
    serial_log.unlink(missing_ok=True)
    start = time.monotonic()
    exited = False
    with contextlib.ExitStack() as stack:
        if progress is not None:
            stack.callback(progress.close)
        vm = stack.enter_context(qemu_process(argv, limit=timeout + 60, pidfile=pidfile))
        while True:
            text = read_log(serial_log)
            if progress is not None:
                progress.update(time.monotonic() - start, text)
            if _contains(text, marker):
                return BootResult(True, time.monotonic() - start, console_tail(text))
            if not vm.running:
                # It may have written the marker just before it exited.
                text = read_log(serial_log)
                if _contains(text, marker):
                    return BootResult(True, time.monotonic() - start, console_tail(text))
                exited = True
                break
            if time.monotonic() - start > timeout:
                break
            time.sleep(POLL_INTERVAL)
    elapsed = time.monotonic() - start
    vm.raise_error()
    tail = console_tail(read_log(serial_log))
    if not check:
        return BootResult(False, elapsed, tail)
    shown = "\n".join(f"    {line}" for line in tail.splitlines()) or "    (nothing)"
    if exited and vm.result is not None:
        stderr = vm.result.stderr.strip()
        why = f"QEMU exited with code {vm.result.returncode} after {elapsed:.1f}s"
        if stderr:
            why += f" ({stderr.splitlines()[-1]})"
    else:
        why = f"it did not appear within {timeout:g}s"
    raise UserError(
        f"{marker!r} never appeared on the serial console: {why}; its last lines:\n{shown}",
        f"the whole console log is {serial_log}; check the boot loader and the kernel "
        "command line (console=ttyS0)",
    )


@dataclass(frozen=True)
class Boot(Run):
    """A plan's operation that boots QEMU until `marker` appears on its console
    (`boot_and_wait`; UserError if it does not within `wait` seconds) and hands the
    result to `booted`.

    Its `argv` is the command run() starts and logs, `-pidfile` included, so a dry run
    shows exactly what -v logs; make it with `Boot.of_boot`.
    """

    qemu: tuple[str, ...] = ()  # argv without the -pidfile option
    serial_log: Path = Path()
    marker: str = ""
    wait: float = 0.0
    pidfile: Path = Path()
    booted: Callable[[BootResult], None] | None = None
    label: str = "booting"  # how its progress line starts (`BootProgress`)

    @classmethod
    def of_boot(
        cls,
        argv: Sequence[str],
        *,
        serial_log: Path,
        marker: str,
        wait: float,
        pidfile: Path,
        booted: Callable[[BootResult], None] | None = None,
        label: str = "booting",
    ) -> Boot:
        """The boot of `argv` (from qemu_argv, writing `serial_log`) until `marker`."""
        return cls(
            tuple(pidfile_argv(argv, pidfile)),
            qemu=tuple(argv),
            serial_log=serial_log,
            marker=marker,
            wait=wait,
            pidfile=pidfile,
            booted=booted,
            label=label,
            note=f"until {marker!r} appears in {serial_log}, at most {wait:g}s",
        )

    def __call__(self) -> None:
        result = boot_and_wait(
            self.qemu,
            self.serial_log,
            self.marker,
            self.wait,
            pidfile=self.pidfile,
            progress=BootProgress(self.label),
        )
        if self.booted is not None:
            self.booted(result)
