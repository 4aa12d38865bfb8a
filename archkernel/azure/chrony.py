"""chrony for Azure: the Hyper-V host's PTP clock as the time source (instead of
systemd-timesyncd), with Microsoft's refclock and makestep lines."""

from __future__ import annotations

from archkernel.azure.udev import PTP_DEVICE

CONF_FILE = "etc/chrony.conf"
UNIT = "chronyd.service"
TIMESYNCD_UNIT = "systemd-timesyncd.service"
REFCLOCK = f"refclock PHC /dev/{PTP_DEVICE} poll 3 dpoll -2 offset 0 stratum 2"
MAKESTEP = "makestep 1.0 -1"


def chrony_conf() -> str:
    """/etc/chrony.conf: the host's clock, steps whenever it is off by more than a second
    (a VM resumed from a pause), the system clock copied to the RTC."""
    return (
        "# Written by archkernel: time from the Hyper-V host's PTP clock.\n"
        f"{REFCLOCK}\n"
        f"{MAKESTEP}\n"
        "driftfile /var/lib/chrony/drift\n"
        "rtcsync\n"
    )


def directives(text: str) -> list[str]:
    """chrony.conf's directives, each with its words joined by one blank; comments
    (`#`, `!`, `;`, `%`) and blank lines left out."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0][0] not in "#!;%":
            out.append(" ".join(words))
    return out
