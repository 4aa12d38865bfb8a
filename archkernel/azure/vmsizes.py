"""Verify's rules for today's Azure VM sizes (NVMe disks, accelerated networking, the
Hyper-V clock, provisioning diagnostics), pure over what was read from the image.

`inspect` reads `VmFacts` from the image's root tree (as step 9 copied it out);
`check` adds one `Check` per rule to the report, for the items the settings ask for:
the NVMe rules when `azure.publish.disk_controller_types` names NVMe, the others per
`azure.vm_features` (KVP telemetry when cloud-init provisions); `kernel command line
without quiet` always. The udev rules are not
judged by their text: the image's own rules files run (archkernel.azure.udevrules) over
the devices Azure shows udev (`AZURE_DEVICES`), and the rule passes when they give the
expected names and properties.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from archkernel.azure import chrony, udev, udevrules
from archkernel.azure.rules import Report
from archkernel.azure.udevrules import Device, Node, UnsupportedRule
from archkernel.settings import AzureSettings

NVME_MODULES = ("nvme", "pci_hyperv")
NVME_TIMEOUT = "nvme_core.io_timeout=240"
VF_MODULES = ("mlx4_en", "mlx5_core", "mana")
RULES_DIRS = ("usr/lib/udev/rules.d", "etc/udev/rules.d")
NETWORK_DIRS = ("usr/lib/systemd/network", "etc/systemd/network")
_SD = re.compile(r"/dev/sd[a-z]")


@dataclass
class VmFacts:
    """What the rules need from the image beyond `rules.TreeFacts`."""

    udev_rules: list[str] = field(default_factory=list)  # rules files' texts, udev's order
    networks: dict[str, str] = field(default_factory=dict)  # .network files, networkd's order
    kernel_modules: set[str] = field(default_factory=set)  # every module the image ships
    builtin_modules: set[str] = field(default_factory=set)  # built into its kernel
    chrony_conf: str | None = None
    agent_texts: dict[str, str] = field(default_factory=dict)  # /path -> text (for /dev/sd*)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _by_name(root: Path, dirs: Sequence[str], suffix: str) -> dict[str, Path]:
    """Drop-in files of `dirs` by name, later directories overriding (udev's, networkd's)."""
    found: dict[str, Path] = {}
    for d in dirs:
        for p in (root / d).glob(f"*{suffix}"):
            if p.is_file():
                found[p.name] = p
    return dict(sorted(found.items()))


def inspect(root: Path) -> VmFacts:
    """Read the facts from the image's files under `root`."""
    facts = VmFacts()
    facts.udev_rules = [_read(p) for p in _by_name(root, RULES_DIRS, ".rules").values()]
    facts.networks = {n: _read(p) for n, p in _by_name(root, NETWORK_DIRS, ".network").items()}
    for ko in (root / "usr/lib/modules").glob("*/kernel/**/*.ko*"):
        facts.kernel_modules.add(module_name(ko.name))
    for builtin in (root / "usr/lib/modules").glob("*/modules.builtin"):
        lines = _read(builtin).split()
        facts.builtin_modules |= {module_name(line.rsplit("/", 1)[-1]) for line in lines}
    if (root / chrony.CONF_FILE).is_file():
        facts.chrony_conf = _read(root / chrony.CONF_FILE)
    for rel in ("etc/waagent.conf", "etc/default/grub"):
        if (root / rel).is_file():
            facts.agent_texts[f"/{rel}"] = _read(root / rel)
    return facts


def module_name(file_name: str) -> str:
    """A module's name from its file name: no suffix, `-` as `_` (as modprobe sees it)."""
    return file_name.split(".ko", 1)[0].replace("-", "_")


# --- what Azure shows udev --------------------------------------------------------------


def _scsi_disk(kernel: str, channel: str, lun: int, partition: int | None = None) -> Device:
    name = f"{kernel}{partition}" if partition else kernel
    chain = [
        Node(f"0:0:0:{lun}", "scsi", "sd"),
        Node("host0", "scsi"),
        Node(channel.strip("{}"), "vmbus", "hv_storvsc", {"device_id": channel}),
    ]
    if partition:
        chain.insert(0, Node(kernel, "block", "", {}))
    env = {"DEVTYPE": "partition" if partition else "disk"}
    return Device(Node(name, "block"), chain, env)


def _nvme_disk(model: str, nsid: int, partition: int | None = None) -> Device:
    disk = f"nvme0n{nsid}"
    own = Node(f"{disk}p{partition}" if partition else disk, "block", "", {})
    chain = [
        Node("nvme0", "nvme", "", {"model": model.ljust(40), "serial": "SN0001"}),
        Node("c05b:00:00.0", "pci", "nvme"),
    ]
    if partition:
        chain.insert(0, Node(disk, "block", "", {"nsid": str(nsid)}))
    else:
        own.attrs["nsid"] = str(nsid)
    env = {"DEVTYPE": "partition" if partition else "disk", "ID_SERIAL_SHORT": "SN0001"}
    return Device(own, chain, env)


def _vf(driver: str, name: str) -> Device:
    """A virtual function's network interface (any name: the kernel names it as it comes)."""
    return Device(
        Node(name, "net"),
        [
            Node("1234:00:02.0", "pci", driver),
            Node("pci1234:00", ""),
            Node("1234abcd-0000-0000-0000-000000000000", "vmbus", "hv_pci"),
        ],
    )


# (what, device, the /dev/disk/azure name it must get)
AZURE_DISKS: list[tuple[str, Device, str]] = [
    ("SCSI OS disk", _scsi_disk("sda", udev.OS_DISK_CHANNEL, 0), "disk/azure/os"),
    (
        "SCSI OS disk partition 1",
        _scsi_disk("sda", udev.OS_DISK_CHANNEL, 0, 1),
        "disk/azure/os-part1",
    ),
    ("SCSI resource disk", _scsi_disk("sdb", udev.RESOURCE_DISK_CHANNEL, 1), "disk/azure/resource"),
    (
        "SCSI data disk LUN 3",
        _scsi_disk("sdc", udev.DATA_DISK_CHANNEL, 3),
        "disk/azure/data/by-lun/3",
    ),
    ("NVMe OS disk", _nvme_disk(udev.NVME_REMOTE_MODEL, 1), "disk/azure/os"),
    ("NVMe OS disk partition 2", _nvme_disk(udev.NVME_REMOTE_MODEL, 1, 2), "disk/azure/os-part2"),
    ("NVMe data disk LUN 0", _nvme_disk(udev.NVME_REMOTE_MODEL, 2), "disk/azure/data/by-lun/0"),
    ("NVMe data disk LUN 12", _nvme_disk(udev.NVME_REMOTE_MODEL, 14), "disk/azure/data/by-lun/12"),
]
VF_DRIVERS = ("mlx4_core", "mlx5_core", "mana")
SYNTHETIC_NIC = Device(
    Node("eth0", "net"),
    [Node("000d3a6b-1234-4321-8765-000d3a6b0000", "vmbus", "hv_netvsc", {"device_id": "{x}"})],
)


def _run(rules: list[str], dev: Device) -> Device | str:
    """`dev` after the rules, or why they could not be judged."""
    copy = Device(dev.node, dev.parents, dict(dev.env), dev.action)
    try:
        # Not strict: the distribution's rules files run too, as far as they can be judged.
        return udevrules.apply(rules, copy, strict=False)
    except UnsupportedRule as exc:
        return f"a rule the check cannot judge: {exc}"


def _check_disk_names(report: Report, facts: VmFacts) -> None:
    wrong = []
    for what, dev, name in AZURE_DISKS:
        out = _run(facts.udev_rules, dev)
        if isinstance(out, str):
            wrong.append(out)
            break
        if name not in out.symlinks:
            wrong.append(f"{what} gets {out.symlinks or 'no name'}, not /dev/{name}")
    report.add(
        "Azure disk names (/dev/disk/azure) on SCSI and NVMe",
        not wrong,
        "; ".join(wrong) or f"the image's udev rules name all {len(AZURE_DISKS)} disks",
    )


# --- networkd ----------------------------------------------------------------------------


def _network_section(text: str, section: str) -> dict[str, str]:
    values, current = {}, ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif "=" in line and current == section and not line.startswith(("#", ";")):
            k, v = line.split("=", 1)
            values[k.strip()] = v.strip()
    return values


def _matches(patterns: str | None, value: str | None) -> bool:
    """networkd's [Match] of globs (`!` first: none of them); no value matches no glob."""
    if patterns is None:
        return True
    words = patterns.split()
    invert = bool(words) and words[0].startswith("!")
    if invert:
        words[0] = words[0][1:]
    hit = value is not None and any(fnmatch.fnmatchcase(value, w) for w in words)
    return hit != invert


def network_for(networks: dict[str, str], name: str, driver: str) -> str | None:
    """The .network file networkd applies to an Ethernet link (first match in its order).
    [Match] keys other than Name, Driver, Type and Kind are taken as not matching."""
    link: dict[str, str | None] = {"Name": name, "Driver": driver, "Type": "ether", "Kind": None}
    for file, text in networks.items():
        match = _network_section(text, "Match")
        if all(k in link and _matches(v, link[k]) for k, v in match.items()):
            return file
    return None


def _check_networking(report: Report, facts: VmFacts) -> None:
    missing = [m for m in VF_MODULES if m not in facts.kernel_modules | facts.builtin_modules]
    report.add(
        "accelerated networking: VF drivers in the image",
        not missing,
        f"missing {missing}" if missing else " ".join(VF_MODULES),
    )
    wrong = []
    for driver in VF_DRIVERS:
        for name in ("eth0", "eth1"):
            out = _run(facts.udev_rules, _vf(driver, name))
            if isinstance(out, str):
                wrong.append(out)
            elif (out.env.get("ID_NET_MANAGED_BY"), out.env.get("NM_UNMANAGED")) != (
                "unmanaged",
                "1",
            ):
                wrong.append(f"a {driver} VF {name} behind hv_pci is not marked unmanaged")
    out = _run(facts.udev_rules, SYNTHETIC_NIC)
    if not isinstance(out, str) and ("ID_NET_MANAGED_BY" in out.env or "NM_UNMANAGED" in out.env):
        wrong.append("the synthetic NIC (hv_netvsc) is marked unmanaged too")
    report.add(
        "accelerated networking: udev leaves the VF unmanaged",
        not wrong,
        "; ".join(wrong)
        or f"ID_NET_MANAGED_BY=unmanaged NM_UNMANAGED=1 for {' '.join(VF_DRIVERS)} VFs",
    )
    synthetic = network_for(facts.networks, "eth0", "hv_netvsc")
    dhcp = _network_section(facts.networks.get(synthetic or "", ""), "Network").get("DHCP")
    problems = (
        [] if dhcp in ("yes", "ipv4", "true") else [f"eth0 (hv_netvsc): {synthetic} DHCP={dhcp}"]
    )
    for driver in ("mlx4_en", "mlx5_core", "mana"):
        for name in ("eth0", "eth1"):
            vf = network_for(facts.networks, name, driver)
            if vf is not None and _network_section(facts.networks[vf], "Link").get(
                "Unmanaged"
            ) not in ("yes", "true", "1"):
                problems.append(f"{name} ({driver}) gets {vf}")
    report.add(
        "accelerated networking: DHCP on the synthetic NIC only",
        not problems,
        "; ".join(problems) or f"eth0 (hv_netvsc): {synthetic}; VFs: none or unmanaged",
    )


# --- the rules ---------------------------------------------------------------------------


def _linux_lines(grub_cfg: str) -> list[list[str]]:
    return [ln.split() for ln in grub_cfg.splitlines() if ln.strip().startswith("linux")]


def _check_nvme(
    report: Report,
    facts: VmFacts,
    initramfs: dict[str, list[str]],
    grub_cfg: str,
    texts: dict[str, str],
) -> None:
    for name, modules in initramfs.items():
        have = {module_name(m) for m in modules}
        # A driver built into the kernel needs no module in the initramfs.
        missing = [m for m in NVME_MODULES if m not in have | facts.builtin_modules]
        report.add(
            f"NVMe: nvme and pci-hyperv in {name}",
            not missing,
            f"missing {missing}" if missing else " ".join(NVME_MODULES),
        )
    lines = _linux_lines(grub_cfg)
    ok = bool(lines) and all(NVME_TIMEOUT in words for words in lines)
    report.add("NVMe: kernel command line", ok, f"{NVME_TIMEOUT} on {len(lines)} linux line(s)")
    named = sorted(
        path
        for path, text in {**texts, **facts.agent_texts}.items()
        if any(_SD.search(ln) for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    )
    report.add(
        "NVMe: nothing names /dev/sd*",
        not named,
        f"named in {named}"
        if named
        else f"looked in {', '.join(sorted({**texts, **facts.agent_texts}))}",
    )


def _check_clock(report: Report, facts: VmFacts, enabled: list[str]) -> None:
    have = chrony.directives(facts.chrony_conf or "")
    missing = [d for d in (chrony.REFCLOCK, chrony.MAKESTEP) if d not in have]
    report.add(
        "Hyper-V clock: chrony reads /dev/ptp_hyperv",
        facts.chrony_conf is not None and not missing,
        "no /etc/chrony.conf"
        if facts.chrony_conf is None
        else (f"missing {missing}" if missing else "refclock PHC, makestep"),
    )
    units = set(enabled)
    report.add(
        "Hyper-V clock: chronyd enabled, timesyncd not",
        chrony.UNIT in units and chrony.TIMESYNCD_UNIT not in units,
        f"chronyd {'enabled' if chrony.UNIT in units else 'not enabled'}, timesyncd "
        f"{'enabled' if chrony.TIMESYNCD_UNIT in units else 'not enabled'}",
    )
    ptp = Device(Node("ptp0", "ptp", "", {"clock_name": "hyperv"}), [Node("hv_utils", "vmbus")])
    out = _run(facts.udev_rules, ptp)
    ok = not isinstance(out, str) and udev.PTP_DEVICE in out.symlinks
    report.add(
        "Hyper-V clock: udev names it /dev/ptp_hyperv",
        ok,
        out
        if isinstance(out, str)
        else f"ptp0 (clock_name hyperv) gets {out.symlinks or 'no name'}",
    )


def kvp_telemetry(text: str) -> bool:
    """Whether a cloud-init configuration text turns on Hyper-V KVP reporting (a top-level
    `reporting:` with a handler of `type: hyperv`)."""
    block = re.search(r"^reporting:[ \t]*(.*)\n((?:[ \t]+.*\n?|[ \t]*\n)*)", text, re.MULTILINE)
    if block is None:
        return False
    return (
        re.search(r"\btype:\s*['\"]?hyperv['\"]?[\s},]*$", block[1] + "\n" + block[2], re.MULTILINE)
        is not None
    )


def check(
    report: Report,
    facts: VmFacts,
    az: AzureSettings,
    *,
    initramfs: dict[str, list[str]],
    grub_cfg: str,
    fstab: str,
    cloud_cfg: dict[str, str],
    enabled_units: list[str],
) -> None:
    """The rules for today's VM sizes that the settings ask for."""
    lines = _linux_lines(grub_cfg)
    quiet = [w for words in lines for w in words if w == "quiet"]
    report.add(
        "kernel command line without quiet",
        not quiet,
        "quiet found" if quiet else f"no quiet on {len(lines)} linux line(s)",
    )
    features = set(az.vm_features)
    if "NVMe" in az.publish.disk_controller_types:
        texts = {"/etc/fstab": fstab, "/boot/grub/grub.cfg": grub_cfg}
        texts.update({f"/etc/cloud/cloud.cfg.d/{n}": t for n, t in cloud_cfg.items()})
        _check_nvme(report, facts, initramfs, grub_cfg, texts)
    if "disk-names" in features:
        _check_disk_names(report, facts)
    if "accelerated-networking" in features:
        _check_networking(report, facts)
    if "ptp-clock" in features:
        _check_clock(report, facts, enabled_units)
    # waagent reports to the host through KVP by itself; cloud-init only when told to.
    if "kvp-telemetry" in features and az.provisioning == "cloud-init":
        hits = sorted(n for n, t in cloud_cfg.items() if kvp_telemetry(t))
        report.add(
            "cloud-init Hyper-V KVP telemetry",
            bool(hits),
            f"reporting type hyperv in {hits}" if hits else "no cloud.cfg.d file turns it on",
        )
