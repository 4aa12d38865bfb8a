"""What the Azure image's configuration says, and the verify rules, with plain asserts."""

from __future__ import annotations

import pytest

from archkernel import azureconf as conf
from archkernel.azureverify import Report, TreeFacts, check_partitions, check_tree
from archkernel.errors import UserError
from archkernel.settings import AzureSettings

UUID = "0b6d3c3e-5a8f-4f3e-9d7e-1c2b3a4d5e6f"

ARCH_MKINITCPIO = """\
# vim:set ft=sh
MODULES=()
BINARIES=()
FILES=()
HOOKS=(base udev autodetect microcode modconf kms keyboard keymap consolefont block filesystems fsck)
#COMPRESSION="zstd"
"""

OLD_MKINITCPIO = (
    'MODULES=""\nHOOKS="base udev autodetect modconf block filesystems keyboard fsck"\n'
)

WAAGENT_CONF = """\
# Microsoft Azure Linux Agent Configuration
Provisioning.Enabled=y
Provisioning.Agent=auto
ResourceDisk.Format=n
ResourceDisk.Filesystem=ext4
ResourceDisk.MountPoint=/mnt/resource
#ResourceDisk.EnableSwap=n
ResourceDisk.SwapSizeMB=0
Logs.Verbose=n
"""


def test_mkinitcpio_sets_modules_and_drops_autodetect() -> None:
    for original in (ARCH_MKINITCPIO, OLD_MKINITCPIO):
        text = conf.mkinitcpio_conf(original, ["hv_vmbus", "hv_storvsc"])
        assert "MODULES=(hv_vmbus hv_storvsc)" in text.splitlines()
        hooks = next(line for line in text.splitlines() if line.startswith("HOOKS="))
        assert "autodetect" not in hooks and "block" in hooks and "filesystems" in hooks


def test_mkinitcpio_without_modules_line_is_an_error() -> None:
    with pytest.raises(UserError, match="no MODULES= line"):
        conf.mkinitcpio_conf("HOOKS=(base)\n", ["hv_vmbus"])


def test_waagent_values_for_cloud_init_leave_the_disk_to_cloud_init() -> None:
    text = conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("cloud-init"))
    values = conf.read_conf_values(text)
    assert values["Provisioning.Agent"] == "cloud-init"
    assert values["ResourceDisk.Format"] == "n"
    assert values["ResourceDisk.EnableSwap"] == "n"
    assert values["Logs.Verbose"] == "n"  # untouched
    assert text.count("ResourceDisk.EnableSwap") == 1  # the commented line was replaced


def test_waagent_values_for_waagent_follow_microsofts_guide() -> None:
    values = conf.read_conf_values(
        conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("waagent"))
    )
    assert values["Provisioning.Agent"] == "waagent"
    assert values["ResourceDisk.Format"] == "y"
    assert values["ResourceDisk.Filesystem"] == "ext4"
    assert values["ResourceDisk.MountPoint"] == "/mnt/resource"
    assert values["ResourceDisk.EnableSwap"] == "y"
    assert int(values["ResourceDisk.SwapSizeMB"]) > 0


def test_lock_root_locks_only_root() -> None:
    shadow = "root::14871::::::\narch:$6$x$y:1:0:99999:7:::\n"
    locked = conf.lock_root(shadow)
    assert conf.shadow_password(locked, "root") == "!*"
    assert conf.shadow_password(locked, "arch") == "$6$x$y"
    with pytest.raises(UserError):
        conf.lock_root("arch:x:1::::::\n")


def test_fstab_mounts_root_by_uuid_and_no_swap() -> None:
    lines = [ln for ln in conf.fstab(UUID).splitlines() if not ln.startswith("#")]
    assert lines == [f"UUID={UUID}\t/\text4\trw,relatime\t0 1"]


def test_sshd_keepalive_and_password_login() -> None:
    assert "ClientAliveInterval 180" in conf.sshd_dropin(False).splitlines()
    assert "PasswordAuthentication no" in conf.sshd_dropin(False).splitlines()
    assert "PasswordAuthentication no" not in conf.sshd_dropin(True).splitlines()
    assert "PermitRootLogin no" in conf.sshd_dropin(True).splitlines()


def test_cloud_init_config_names_only_azure() -> None:
    text = conf.cloud_init_cfg()
    assert "datasource_list: [ Azure ]" in text.splitlines()
    assert "/mnt/resource" in text


def test_units_depend_on_provisioning() -> None:
    available = set(conf.BASE_UNITS + conf.CLOUD_INIT_UNITS + [conf.WAAGENT_UNIT])
    cloud = conf.units_to_enable(AzureSettings(), available)
    assert "cloud-init.service" in cloud and conf.WAAGENT_UNIT not in cloud
    both = conf.units_to_enable(AzureSettings(extensions=True), available)
    assert "cloud-init.service" in both and conf.WAAGENT_UNIT in both
    agent = conf.units_to_enable(AzureSettings(provisioning="waagent"), available)
    assert conf.WAAGENT_UNIT in agent and "cloud-init.service" not in agent


def test_pacman_conf_keeps_the_mirror_placeholders() -> None:
    text = conf.pacman_conf("https://mirror.example/$repo/os/$arch", "/w/gnupg")
    assert "Server = https://mirror.example/$repo/os/$arch" in text.splitlines()
    assert "GPGDir = /w/gnupg" in text.splitlines()
    assert conf.mirror_probe_url("https://m/$repo/os/$arch") == "https://m/core/os/x86_64/core.db"


def good_facts(az: AzureSettings) -> TreeFacts:
    return TreeFacts(
        fstab=conf.fstab(UUID),
        grub_cfg=f"linux /boot/vmlinuz-linux root=UUID={UUID} rw {az.kernel_cmdline}\n",
        shadow="root:!*:1::::::\n",
        machine_id="",
        resolv_conf="-> /run/systemd/resolve/stub-resolv.conf",
        sshd_config="Include /etc/ssh/sshd_config.d/*.conf\n#PermitRootLogin prohibit-password\n",
        sshd_dropins={"10-archkernel-azure.conf": conf.sshd_dropin(False)},
        initramfs_modules={"initramfs-linux.img": ["hv_netvsc", "hv_storvsc", "hv_vmbus"]},
        cloud_cfg={"90-archkernel-azure.cfg": conf.cloud_init_cfg()},
        enabled_units=["cloud-init.service", "sshd.service"],
        modules_load=conf.modules_load(),
        hostname=az.hostname,
    )


def failed(facts: TreeFacts, az: AzureSettings, uuid: str = UUID) -> list[str]:
    report = Report("test")
    check_tree(report, facts, az, uuid)
    return [c.name for c in report.failed]


def test_a_good_tree_passes() -> None:
    az = AzureSettings()
    assert failed(good_facts(az), az) == []


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"fstab": conf.fstab("11111111-2222-3333-4444-555555555555")}, "fstab root by UUID"),
        ({"grub_cfg": "linux /boot/vmlinuz-linux root=/dev/sda2 rw"}, "grub root=UUID"),
        (
            {"fstab": conf.fstab(UUID) + "/swapfile none swap defaults 0 0\n"},
            "no swap on the OS disk",
        ),
        (
            {"initramfs_modules": {"initramfs-linux.img": ["hv_vmbus"]}},
            "Hyper-V drivers in initramfs-linux.img",
        ),
        ({"sshd_dropins": {}}, "sshd keep-alive"),
        ({"shadow": "root::1::::::\n"}, "root locked"),
        ({"machine_id": "0123456789abcdef0123456789abcdef\n"}, "no build-host leftovers"),
        ({"host_keys": ["ssh_host_ed25519_key"]}, "no build-host leftovers"),
        ({"resolv_conf": "nameserver 10.0.0.1\n"}, "no build-host leftovers"),
        ({"cloud_cfg": {}}, "cloud-init datasource Azure"),
        ({"enabled_units": ["sshd.service"]}, "cloud-init enabled"),
        ({"modules_load": "udf\n"}, "provisioning DVD drivers loaded at boot"),
        ({"hostname": "other"}, "host name"),
    ],
)
def test_each_broken_rule_is_caught(change: dict[str, object], rule: str) -> None:
    az = AzureSettings()
    facts = good_facts(az)
    for key, value in change.items():
        setattr(facts, key, value)
    assert rule in failed(facts, az)


def test_file_system_uuid_must_match() -> None:
    az = AzureSettings()
    names = failed(good_facts(az), az, uuid="11111111-2222-3333-4444-555555555555")
    assert "fstab root by UUID" in names and "grub root=UUID" in names


def test_waagent_configuration_must_match_provisioning() -> None:
    az = AzureSettings(provisioning="waagent")
    facts = good_facts(az)
    facts.waagent_conf = conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("cloud-init"))
    facts.enabled_units = ["sshd.service", "waagent.service"]
    assert "waagent.conf matches provisioning" in failed(facts, az)
    facts.waagent_conf = conf.set_conf_values(WAAGENT_CONF, conf.waagent_values("waagent"))
    assert failed(facts, az) == []


def test_partitions_must_be_aligned_and_inside() -> None:
    size = 64 << 20
    report = Report("x")
    check_partitions(report, [{"node": "p1", "start": 2048, "size": 2048}], size, "gpt")
    assert not report.failed
    report = Report("x")
    check_partitions(report, [{"node": "p1", "start": 2049, "size": 2048}], size, "gpt")
    assert report.failed
    report = Report("x")
    check_partitions(report, [{"node": "p1", "start": 2048, "size": size // 512}], size, "gpt")
    assert report.failed
