"""The kexec command line: the running kernel's line plus `extra_cmdline`, and kexec's argv.

Pure functions of text: the `archkernel` marker on the new line is how a later run knows
it already runs the Arch kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MARKER = "archkernel"
# What reboots into the loaded kernel once kexec -l has loaded it.
REBOOT = ("systemctl", "kexec")


def split_cmdline(text: str) -> list[str]:
    """Kernel command-line tokens; double quotes group words as the kernel's parser does."""
    tokens: list[str] = []
    current: list[str] = []
    quoted = False
    started = False
    for ch in text.strip():
        if ch == '"':
            quoted = not quoted
            current.append(ch)
            started = True
        elif ch.isspace() and not quoted:
            if started:
                tokens.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        tokens.append("".join(current))
    return tokens


def _key(token: str) -> str:
    return token.split("=", 1)[0]


def already_kexeced(cmdline: str) -> bool:
    """True when the running kernel was started by us (the marker token is present)."""
    return MARKER in split_cmdline(cmdline)


def kexec_cmdline(current: str, extra: str, drop: Sequence[str] = ()) -> str:
    """The current command line without the parameters named in `drop`, plus `extra`,
    with no flag twice (extra's value wins).

    `drop` is `scaleway.drop_cmdline`, `ip` by default: the provider's `ip=:::::eth0:`
    would make a kernel built with CONFIG_IP_PNP=y (linux-armv7) configure the network
    itself before the new /init has loaded the NIC's module; the provider's init brings
    the network up on its own (klibc ipconfig on every eth*), it does not read `ip=`.
    """
    added = split_cmdline(extra)
    keys = {_key(t) for t in added}
    dropped = set(drop)
    kept = [
        t
        for t in split_cmdline(current)
        if _key(t) not in keys and _key(t.lstrip('"')) not in dropped
    ]
    return " ".join([*kept, *added])


def kexec_argv(kernel: Path, initrd: Path, cmdline: str, dtb: Path | None) -> list[str]:
    """`kexec -l KERNEL --initrd=... [--dtb=...] --command-line=...` as an argv list."""
    argv = ["kexec", "-l", str(kernel), f"--initrd={initrd}"]
    if dtb is not None:
        argv.append(f"--dtb={dtb}")
    argv.append(f"--command-line={cmdline}")
    return argv
