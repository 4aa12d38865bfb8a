"""Step 9 of azure_vhd: check the finished VHD as Azure and a careful reviewer would.

The step's commands read the VHD file itself (a fixed VHD is the raw disk with the footer
after it) and nothing is mounted: its partition table through `sfdisk --json`, what the
partitions hold through `blkid -p` at their offsets, the EFI system partition through
mtools at its offset, and the root file system's directories (all but /proc and /sys:
the hygiene rules look for the work directory's path in every file), copied out with
debugfs (`rdump`) into `workdir/azure/tmp/verify`. They look where step 6 put the
partitions for these settings; a table that differs fails the check that needed it. The
rules are archkernel.azure.rules and, for today's VM sizes, archkernel.azure.vmsizes, pure
over what was read (archkernel.azure.hygiene reads what the build may have left); the
report goes to verify.json and a readable verify.txt.

Then the manifest (archkernel.azure.manifest) goes to manifest.json and beside the VHD,
from the image's package databases in the copy, the package cache and the tools' versions;
last, any failed check fails the step.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from archkernel.azure import admins, manifest, vmsizes
from archkernel.azure.diskimage import layout_for, planned_ids, remove_scratch, scratch
from archkernel.azure.hygiene import WorkdirSearch
from archkernel.azure.hygiene import inspect as inspect_hygiene
from archkernel.azure.rules import (
    BootFacts,
    Report,
    TreeFacts,
    check_boot,
    check_partitions,
    check_tree,
    has_boot_code,
)
from archkernel.azure.workspace import (
    FIRMWARE_SETTINGS,
    ROUTING_SETTINGS,
    build_environment,
    paths,
)
from archkernel.errors import UserError
from archkernel.formats import initramfs, vhd_file
from archkernel.formats.kmod import module_name
from archkernel.host.files import remove_path, temporary_directory, write_text
from archkernel.image import disk, esp, ext4
from archkernel.log import log
from archkernel.plan import Do, Op, Plan, Run, execute, reads
from archkernel.settings import AzureSettings, Settings
from archkernel.units import SECTOR, MiB

# Linux partition types: MBR, generic Linux data and "Linux root (x86-64)".
LINUX_TYPES = (
    "83",
    "0fc63daf-8483-4772-8e79-3d69d8477de4",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
)
# The directories of the root file system the rules read, copied out of it: every
# top-level directory of an Arch root but /proc and /sys (API file systems' mount points)
# and the links into /usr (/bin, /lib, /lib64, /sbin). One missing is skipped.
TREE_DIRECTORIES = (
    "/boot",
    "/dev",
    "/efi",
    "/etc",
    "/home",
    "/mnt",
    "/opt",
    "/root",
    "/run",
    "/srv",
    "/tmp",
    "/usr",
    "/var",
)
LOADER_COPY = "BOOTX64.EFI"

# --- reading the image --------------------------------------------------------------------


@dataclass
class Reading:
    """What the commands of `reading_ops` found in the image (the copied files aside)."""

    table: dict[str, Any] | None = None  # sfdisk's "partitiontable"
    table_error: str = ""
    esp_type: str = ""  # blkid's TYPE of the ESP; '' for none
    esp_volume: str = ""
    esp_files: list[str] = field(default_factory=list)
    esp_error: str | None = None  # why its FAT could not be listed
    loader_error: str | None = None  # why EFI/BOOT/BOOTX64.EFI could not be read
    root_uuid: str = ""


def _value(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout.strip() if proc.returncode == 0 else ""


def reading_ops(image: Path, layout: disk.Layout, tmp: Path, into: Reading) -> list[Op]:
    """The commands that read what the rules need from `image`, where `layout` puts the
    partitions, into `into` and `tmp` (made anew: the root file system's TREE_DIRECTORIES
    go to `tmp/tree`, the UEFI boot loader to `tmp/BOOTX64.EFI`). None writes to the image;
    a failure is recorded for the report, not raised."""

    def table(proc: subprocess.CompletedProcess[str]) -> None:
        try:
            into.table = json.loads(proc.stdout)["partitiontable"]
        except (ValueError, KeyError):
            into.table_error = proc.stderr.strip() or f"sfdisk exited with {proc.returncode}"

    def fresh() -> None:
        remove_path(tmp)
        (tmp / "tree").mkdir(parents=True)

    ops: list[Op] = [
        Do(f"make the empty directory {tmp / 'tree'}", fresh),
        Run.of(disk.list_argv(image), check=False, capture=True, then=table),
    ]
    if layout.has("esp"):
        part = layout.esp

        def esp_type(proc: subprocess.CompletedProcess[str]) -> None:
            into.esp_type = _value(proc)

        def esp_volume(proc: subprocess.CompletedProcess[str]) -> None:
            into.esp_volume = _value(proc)

        def listed(proc: subprocess.CompletedProcess[str]) -> None:
            try:
                into.esp_files = esp.listing(proc, image, part)
            except UserError as exc:
                into.esp_error = exc.message

        def loader(proc: subprocess.CompletedProcess[str]) -> None:
            if proc.returncode != 0:
                into.loader_error = (
                    f"cannot read {esp.REMOVABLE_PATH_X64} from the FAT in partition "
                    f"{part.number} of {image}: {proc.stderr.strip()}"
                )

        copy = str(tmp / LOADER_COPY)
        ops += [
            Run.of(disk.blkid_argv(image, part, "TYPE"), check=False, capture=True, then=esp_type),
            Run.of(
                disk.blkid_argv(image, part, "UUID"), check=False, capture=True, then=esp_volume
            ),
            Run.of(
                esp.list_argv(image, part),
                check=False,
                capture=True,
                env=esp.MTOOLS_ENV,
                then=listed,
            ),
            Run.of(
                esp.read_argv(image, part, esp.REMOVABLE_PATH_X64, copy),
                check=False,
                capture=True,
                env=esp.MTOOLS_ENV,
                then=loader,
            ),
        ]

    def root_uuid(proc: subprocess.CompletedProcess[str]) -> None:
        into.root_uuid = _value(proc)

    root = layout.root
    ops.append(
        Run.of(disk.blkid_argv(image, root, "UUID"), check=False, capture=True, then=root_uuid)
    )
    for directory in TREE_DIRECTORIES:
        # Relative: debugfs's own parsing never sees our paths.
        argv = ext4.rdump_argv(image, root, directory, "tree")
        ops.append(Run.of(argv, check=False, capture=True, cwd=str(tmp), note=f"in {tmp}"))
    return ops


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return ""


def inspect_tree(
    root: Path,
    workdir: WorkdirSearch | None = None,
    also: dict[str, Path] | None = None,
) -> TreeFacts:
    """Read what the checks need from the image's files under `root` (its directories as
    `reading_ops` copy them out, or a mounted image root), the files `also` (image path ->
    copy) included; the work directory's path is looked for only with a `workdir` search."""
    facts = TreeFacts()
    etc = root / "etc"
    facts.fstab = _read(etc / "fstab")
    facts.grub_cfg = _read(root / "boot/grub/grub.cfg")
    facts.shadow = _read(etc / "shadow")
    facts.hostname = _read(etc / "hostname").strip()
    mid = etc / "machine-id"
    facts.machine_id = mid.read_text() if mid.is_file() else None
    facts.host_keys = sorted(p.name for p in etc.glob("ssh/ssh_host_*"))
    resolv = etc / "resolv.conf"
    facts.resolv_conf = f"-> {resolv.readlink()}" if resolv.is_symlink() else _read(resolv)
    gnupg = etc / "pacman.d/gnupg"
    facts.keyring_private = (
        sorted(
            str(p.relative_to(root))
            for p in gnupg.rglob("*")
            if p.is_file() and "private" in str(p)
        )
        if gnupg.is_dir()
        else []
    )
    facts.sshd_config = _read(etc / "ssh/sshd_config")
    dropins = etc / "ssh/sshd_config.d"
    if dropins.is_dir():
        facts.sshd_dropins = {p.name: _read(p) for p in sorted(dropins.glob("*.conf"))}
    for image in sorted((root / "boot").glob("initramfs-*.img")):
        entries = initramfs.read_entries(image.read_bytes(), source=image.name)
        facts.initramfs_modules[image.name] = sorted(
            module_name(e.path) for e in entries if e.type == "file" and ".ko" in e.path
        )
    cfgd = etc / "cloud/cloud.cfg.d"
    if cfgd.is_dir():
        facts.cloud_cfg = {p.name: _read(p) for p in sorted(cfgd.glob("*.cfg"))}
    if (etc / "waagent.conf").is_file():
        facts.waagent_conf = _read(etc / "waagent.conf")
    facts.admin_files = {
        rel: (root / rel).stat().st_mode & 0o777
        for rel in admins.files()
        if (root / rel).is_file() and not (root / rel).is_symlink()
    }
    facts.enabled_units = sorted(
        {p.name for p in (etc / "systemd/system").glob("*.wants/*")}
        | {p.name for p in (etc / "systemd/system").glob("*.requires/*")}
    )
    facts.modules_load = "\n".join(_read(p) for p in sorted(etc.glob("modules-load.d/*.conf")))
    copied = [d for d in TREE_DIRECTORIES if (root / d.lstrip("/")).is_dir()]
    inspect_hygiene(facts, root, workdir, also, copied)
    return facts


def _boot_facts(
    image: Path,
    layout: disk.Layout,
    label: str,
    parts: list[dict[str, Any]],
    found: Reading,
    tmp: Path,
) -> BootFacts:
    """The boot facts of `image` whose partitions sfdisk listed as `parts`, from what
    `reading_ops` read at the ESP of `layout`."""
    with open(image, "rb") as f:
        mbr = f.read(SECTOR)
    types = [str(p.get("type", "")).upper() for p in parts]
    facts = BootFacts(label, types, has_boot_code(mbr))
    esps = [n for n, t in enumerate(types, start=1) if t == disk.ESP_GUID.upper()]
    if not esps:
        return facts
    number = esps[0]
    part = parts[number - 1]
    where = (int(part["start"]) * SECTOR, int(part["size"]) * SECTOR)
    if not layout.has("esp") or where != (layout.esp.start, layout.esp.size):
        facts.esp_error = f"partition {number} is not where step 6 put the ESP"
        return facts
    facts.esp_fs = found.esp_type or None
    if facts.esp_fs != "vfat":
        return facts
    facts.esp_volume = found.esp_volume
    if found.esp_error is not None:
        facts.esp_error = found.esp_error
        return facts
    facts.esp_files = found.esp_files
    if esp.REMOVABLE_PATH_X64.upper() in {f.upper() for f in found.esp_files}:
        if found.loader_error is not None:
            facts.esp_error = found.loader_error
        else:
            facts.loader = (tmp / LOADER_COPY).read_bytes()
    return facts


def judge(
    image: Path,
    az: AzureSettings,
    root_uuid: str,
    layout: disk.Layout,
    found: Reading,
    tmp: Path,
    workdir: WorkdirSearch | None = None,
) -> Report:
    """The report on `image`, whose root file system must have `root_uuid`: its footer
    (read here), then the rules over what `reading_ops` found (with `workdir`, the search
    for the work directory's path among its files)."""
    report = Report(str(image))
    footer_report = vhd_file.examine(image)
    for result in footer_report.results:
        report.add(f"VHD {result.rule}", result.ok, result.detail)
    if not footer_report.ok or footer_report.footer is None:
        return report
    size = footer_report.footer.current_size
    report.add("VHD size is disk_size", size == az.disk_size, f"{size // MiB} MiB")
    if found.table is None:
        report.add("partition table", False, f"sfdisk cannot read it: {found.table_error}")
        return report
    label = found.table.get("label", "?")
    parts: list[dict[str, Any]] = found.table.get("partitions", [])
    check_partitions(report, parts, size, label)
    boot = _boot_facts(image, layout, label, parts, found, tmp)
    roots = [p for p in parts if str(p.get("type", "")).lower() in LINUX_TYPES]
    if not roots:
        report.add("root partition", False, "no Linux partition")
        return report
    root = roots[-1]
    where = (int(root["start"]) * SECTOR, int(root["size"]) * SECTOR)
    if where != (layout.root.start, layout.root.size):
        report.add("root partition", False, f"{root.get('node')} is not where step 6 put it")
        return report
    fs = found.root_uuid
    report.add("file system UUID is the chosen one", fs.lower() == root_uuid.lower(), fs)
    loader = {f"/{esp.REMOVABLE_PATH_X64} on the ESP": tmp / LOADER_COPY}
    facts = inspect_tree(tmp / "tree", workdir, loader if layout.has("esp") else None)
    check_tree(report, facts, az, fs)
    vmsizes.check(
        report,
        vmsizes.inspect(tmp / "tree"),
        az,
        initramfs=facts.initramfs_modules,
        grub_cfg=facts.grub_cfg,
        fstab=facts.fstab,
        cloud_cfg=facts.cloud_cfg,
        enabled_units=facts.enabled_units,
    )
    check_boot(report, boot, az.firmware, fs, facts.fstab)
    return report


def check_image(
    image: Path, az: AzureSettings, root_uuid: str, workdir: Path | None = None
) -> Report:
    """Check `image` (a fixed VHD made for `az`, with `workdir` the work directory it was
    built in) and return the report; reads, never writes (its scratch files go to a
    temporary directory)."""
    layout = layout_for(az)
    found = Reading()
    search = WorkdirSearch.of(workdir) if workdir is not None else None
    with temporary_directory(prefix="archkernel-verify-") as tmp:
        execute(Plan(reading_ops(image, layout, tmp, found)))
        return judge(image, az, root_uuid, layout, found, tmp, search)


def write_report(report: Report, json_path: Path, text_path: Path) -> None:
    """The report as JSON and as a readable summary."""
    data = {
        "image": report.image,
        "ok": not report.failed,
        "checks": [asdict(c) for c in report.checks],
    }
    write_text(json_path, json.dumps(data, indent=2) + "\n")
    write_text(text_path, report.summary())


def raise_on_failure(report: Report, summary: Path) -> None:
    """A UserError naming the failed checks, if any."""
    if report.failed:
        lines = "\n".join(f"  {c.name}: {c.detail}" for c in report.failed)
        raise UserError(
            f"the image failed {len(report.failed)} check(s):\n{lines}",
            f"the whole report is in {summary}",
        )
    log.info("all %d checks passed; report %s", len(report.checks), summary)


# --- step 9 -------------------------------------------------------------------------------


@reads(
    "azure.hostname",
    "azure.kernel_cmdline",
    "azure.vm_features",  # archkernel.azure.vmsizes: the rules for today's VM sizes
    "azure.publish.disk_controller_types",  # the NVMe rules, when it names NVMe
    "azure.provisioning",
    "azure.extensions",
    "azure.disk_size",
    *FIRMWARE_SETTINGS,
    "azure.partition_table",  # with the firmware and disk_size: where the partitions are
    "azure.output",  # the VHD's name
    *ROUTING_SETTINGS,
    # The manifest records them (with the source: azure.archive_date, mirror, pacman_conf).
    *manifest.SETTINGS,
)
def verify(settings: Settings) -> Plan:
    """check the image against Azure's rules; write verify.json and .txt, and the manifest.

    Its commands only read the VHD (see the module's docstring), pacman's databases in
    the copy of it, and the tools' versions; a failed check fails the step, after the
    report and the manifest are written.
    """
    az, p = settings.azure, paths(settings)
    layout = layout_for(az)
    uid, _ = planned_ids(p)
    tmp = scratch(p, "verify")
    found = Reading()
    gathered = manifest.Gathered()
    names = manifest.installed_names(p.packages)
    reports: list[Report] = []

    def conclude() -> None:
        search = WorkdirSearch.of(settings.workdir)
        reports.append(judge(p.vhd, az, uid, layout, found, tmp, search))
        write_report(reports[0], p.report, p.summary)

    def record() -> None:
        made = manifest.make(
            settings, p, tmp / "tree", gathered, manifest.package_locator(settings)
        )
        manifest.write(made, [p.manifest, p.vhd_manifest])
        log.info("manifest %s: %d packages", p.manifest, len(made["packages"]))

    plan = Plan(context=functools.partial(build_environment, settings))
    plan.ops += reading_ops(p.vhd, layout, tmp, found)
    plan.ops += manifest.gathering_ops(p.pacman_conf, tmp / "tree", names, az.firmware, gathered)
    plan.ops += [
        Do(
            f"check what was read against the rules (the work directory's path: "
            f"{settings.workdir.resolve()}); write {p.report} and {p.summary}",
            conclude,
        ),
        Do(
            f"write the manifest {p.manifest} and its copy {p.vhd_manifest}: the packages "
            "from the copy's pacman databases with the sha256 of their files in the package "
            f"cache, the tools' versions, {p.ids.name}, the VHD's size and sha256",
            record,
        ),
        Do("fail the step if a check failed", lambda: raise_on_failure(reports[0], p.summary)),
    ]
    plan.cleanup.append(remove_scratch(p, "verify"))
    return plan
