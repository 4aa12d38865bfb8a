"""The provisioning boot test's deciding parts: the proofs read from the VM's answers,
what the fabric adds to QEMU, the steps and their records.

The boot itself is tests/test_provision_vm.py (a VM) and tests/test_fabric_vm.py (the
fabric's plumbing).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from archkernel.azure import boottest
from archkernel.azure.fabric import Fabric, boot, network, ovf, proofs
from archkernel.errors import UserError
from archkernel.settings import Settings, load
from tasks.azure_vhd import build_boottest
from tests.support.fabric import passing_proofs

PROBE_OUTPUT = """\
hostname=provisioned-archlinux
static_hostname=provisioned-archlinux
groups=azureuser wheel
clientaliveinterval=180
lease=168.63.129.100
networkctl=1
machine_id=0123456789abcdef0123456789abcdef
host_key=AAAAC3NzaC1lZDI1NTE5AAAAIFresh
"""


def _settings(tmp_path: Path, **env: str) -> Settings:
    variables = {"ARCHKERNEL_WORKDIR": str(tmp_path)}
    variables.update({f"ARCHKERNEL_AZURE__{k.upper()}": v for k, v in env.items()})
    return load(None, env=variables, cwd=tmp_path).settings


def test_probe_output_is_read() -> None:
    found = proofs.parse_probe(PROBE_OUTPUT + "noise without an equals sign\n")
    assert found["hostname"] == "provisioned-archlinux"
    assert found["groups"].split() == ["azureuser", "wheel"]
    assert proofs.client_alive_interval(found) == 180
    assert proofs.has_lease(found, "168.63.129.100")
    assert proofs.fresh_identity(found, None)


@pytest.mark.parametrize(("value", "expected"), [("180", 180), ("0", 0), ("", -1), ("abc", -1)])
def test_client_alive_interval(value: str, expected: int) -> None:
    assert proofs.client_alive_interval({"clientaliveinterval": value}) == expected


def test_no_lease_without_file_or_networkctl() -> None:
    assert not proofs.has_lease({"lease": "", "networkctl": "0"}, "168.63.129.100")
    assert not proofs.has_lease({"lease": "10.0.2.15", "networkctl": ""}, "168.63.129.100")
    assert proofs.has_lease({"lease": "", "networkctl": "2"}, "168.63.129.100")


@pytest.mark.parametrize(
    ("stderr", "refused"),
    [
        ("azureuser@127.0.0.1: Permission denied (publickey).\r\n", True),
        ("azureuser@127.0.0.1: Permission denied (publickey,password).\r\n", False),
        ("u@h: Permission denied (publickey,keyboard-interactive).", False),
        ("ssh: connect to host 127.0.0.1 port 2222: Connection refused", False),
        ("", False),
    ],
)
def test_password_refusal_is_read_from_the_offered_methods(stderr: str, refused: bool) -> None:
    assert proofs.password_refused(stderr) is refused


def test_identity_from_the_image_is_not_fresh(tmp_path: Path) -> None:
    found = proofs.parse_probe(PROBE_OUTPUT)
    (tmp_path / "etc" / "ssh").mkdir(parents=True)
    assert proofs.fresh_identity(found, tmp_path)  # the image ships neither
    (tmp_path / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    assert not proofs.fresh_identity(found, tmp_path)
    (tmp_path / "etc" / "machine-id").write_text("")
    pub = tmp_path / "etc" / "ssh" / "ssh_host_ed25519_key.pub"
    pub.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFresh root@build\n")
    assert not proofs.fresh_identity(found, tmp_path)
    assert not proofs.fresh_identity({"machine_id": "uninitialized", "host_key": "x"}, None)
    assert not proofs.fresh_identity({"machine_id": "0" * 32, "host_key": ""}, None)


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({}, []),
        ({"hostname": "archlinux"}, ["hostname"]),
        ({"user_login": False, "in_wheel": False}, ["user_login", "in_wheel"]),
        ({"ready_reported": False}, ["ready_reported"]),
        ({"client_alive_interval": -1}, ["client_alive_interval"]),
        ({"password_login_refused": False}, ["password_login_refused"]),
        ({"wrong_key_refused": False}, ["wrong_key_refused"]),
        ({"dhcp_lease": False, "fresh_identity": False}, ["dhcp_lease", "fresh_identity"]),
    ],
)
def test_each_proof_can_fail(change: dict[str, object], failed: list[str]) -> None:
    result = passing_proofs(**change)
    assert result.failed(expected_hostname="h", refuse_password=True) == failed


def test_password_login_allowed_when_the_settings_allow_it() -> None:
    result = passing_proofs(password_login_refused=False)
    assert result.failed(expected_hostname="h", refuse_password=False) == []


def test_record_has_the_documented_fields() -> None:
    record = passing_proofs().record()
    for key in ("hostname", "user_login", "password_login_refused", "ready_reported"):
        assert key in record
    for key in ("dhcp_lease", "client_alive_interval", "agent", "seconds"):
        assert key in record


def test_dvd_goes_where_azure_attaches_it() -> None:
    dvd = Path("/w/a,b/provision.iso")
    assert boot.dvd_argv(dvd, 1) == [
        "-drive",
        "file=/w/a,,b/provision.iso,format=raw,media=cdrom,readonly=on,if=ide,index=2",
    ]
    gen2 = boot.dvd_argv(dvd, 2)
    assert gen2[:2] == ["-device", "virtio-scsi-pci,id=fabric-scsi"]
    assert gen2[-1] == "scsi-cd,drive=fabric-dvd,bus=fabric-scsi.0"


def test_provision_argv_adds_dvd_nic_and_azure_smbios(tmp_path: Path) -> None:
    spec = ovf.Provisioning.with_key("h", "u", "ssh-ed25519 AAAA k")
    fabric = Fabric(spec, tmp_path / "d.iso", None, None, network.Network("ns", tmp_path))  # type: ignore[arg-type]
    argv = boot.provision_argv(["qemu-system-x86_64", "-m", "1024"], fabric, 1)
    assert argv[:3] == ["qemu-system-x86_64", "-m", "1024"]
    assert argv[argv.index("-smbios") + 1] == "type=3,asset=7783-7084-3265-9085-8269-3286-77"
    assert argv[argv.index("-uuid") + 1] == spec.vm_id
    # The NIC is on the fabric's tap device (in its network namespace), not slirp.
    assert argv[argv.index("-netdev") + 1] == "tap,id=fabric,ifname=fabric0,script=no,downscript=no"


def test_provision_mode_makes_provision_steps(tmp_path: Path) -> None:
    s = _settings(tmp_path, boottest_mode="provision", boot="hybrid")
    steps = build_boottest(s)
    azure = tmp_path.resolve() / "azure"
    assert [(st.verb, list(st.targets)) for st in steps] == [
        ("boot", [azure / "provision.json"]),
        ("boot_uefi", [azure / "provision-uefi.json"]),
    ]
    console = build_boottest(_settings(tmp_path))
    assert [list(st.targets) for st in console] == [[azure / "boottest.json"]]


def test_provisioned_hostname_differs_from_the_image(tmp_path: Path) -> None:
    s = _settings(tmp_path, hostname="archlinux")
    spec = boottest.provisioning(s, "ssh-ed25519 AAAA k\n")
    assert spec.hostname == "provisioned-archlinux"
    assert spec.username == "azureuser"
    assert spec.public_keys == (
        ovf.PublicKey("ssh-ed25519 AAAA k", "/home/azureuser/.ssh/authorized_keys"),
    )
    assert spec.disable_password_auth


def _boot(tmp_path: Path, spec: ovf.Provisioning, user: str | None = None) -> boot.ProvisionBoot:
    return boot.ProvisionBoot(
        qemu=["qemu-system-x86_64"],
        generation=1,
        console=tmp_path / "console.log",
        spec=spec,
        key=tmp_path / "key",
        agent="waagent",
        timeout=60.0,
        scratch=tmp_path,
        user=user,
    )


def test_a_boot_without_anybody_to_log_in_as_is_refused(tmp_path: Path) -> None:
    nobody = ovf.Provisioning("h", None)
    with pytest.raises(UserError, match="nobody to log in as"):
        _boot(tmp_path, nobody)
    # A build-time user logs in when the DVD names nobody; the DVD's user otherwise.
    assert _boot(tmp_path, nobody, user="admin").login == "admin"
    assert _boot(tmp_path, ovf.Provisioning("h", "azureuser")).login == "azureuser"


def test_what_the_vm_wrote_is_quoted_safely() -> None:
    quoted = boot._indent("login: \x1b[2Jok\r\nfake\x9b31m line\u202e\n" + "x" * 300)
    assert quoted.splitlines() == ["    login: ok", "    fake 31m line", "    " + "x" * 197 + "..."]
    assert boot._indent("") == "    (nothing)"
