"""The Azure fabric stand-in: ovf-env.xml, the DVD, the wireserver, IMDS, the relay.

The documents and answers are checked by the agents that consume them on Azure: Debian's
cloud-init (its Azure datasource and its wireserver shim) and waagent's wire protocol
client, run on the host against the stand-in (tests/support/fabric.py).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from archkernel.azure.fabric import imds, media, network, ovf, standing_fabric, wireserver
from tests.support.fabric import debian_agents, run_agent_code

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnTQmvTqg2Ll2SdbVUzJ6o2Bz6VjfNcpM4sXyUmzeKR t@x"
SPEC = ovf.Provisioning.with_key("vm-under-test", "azureuser", KEY)


@pytest.fixture(scope="module")
def agents() -> Path:
    return debian_agents()


@pytest.fixture
def wire() -> Iterator[wireserver.Wireserver]:
    with wireserver.Wireserver(wireserver.GoalState("container-7", "instance-9")) as server:
        server.base = f"http://127.0.0.1:{server.port}"
        yield server


@pytest.fixture
def metadata() -> Iterator[imds.Imds]:
    document = imds.instance_document(
        SPEC, mac="52:54:00:12:34:56", address="168.63.129.100", subnet=("168.0.0.0", 7)
    )
    with imds.Imds(document) as server:
        yield server


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# --- ovf-env.xml ------------------------------------------------------------------------------


def test_ovf_env_escapes_every_value() -> None:
    spec = ovf.Provisioning(
        "host", "user", (ovf.PublicKey("ssh-ed25519 AAAA a<b>&'\"", "/p&q"),), password="p<&>w"
    )
    text = ovf.ovf_env(spec)
    assert b"a&lt;b&gt;&amp;" in text and b"p&lt;&amp;&gt;w" in text and b"/p&amp;q" in text
    wa = "{http://schemas.microsoft.com/windowsazure}"
    root = ElementTree.fromstring(text)
    assert root.findtext(f".//{wa}UserPassword") == "p<&>w"
    assert root.findtext(f".//{wa}PublicKey/{wa}Value") == "ssh-ed25519 AAAA a<b>&'\""
    assert root.findtext(f".//{wa}DisableSshPasswordAuthentication") == "true"


def test_no_password_element_without_a_password() -> None:
    assert b"UserPassword" not in ovf.ovf_env(SPEC)


@pytest.mark.integration
def test_cloud_init_reads_ovf_env(agents: Path, tmp_path: Path) -> None:
    (tmp_path / "ovf-env.xml").write_bytes(ovf.ovf_env(SPEC))
    parsed = run_agent_code(
        agents,
        """
        import json
        from cloudinit.sources.helpers.azure import OvfEnvXml
        o = OvfEnvXml.parse_text(open("ovf-env.xml").read())
        print(json.dumps([o.hostname, o.username, o.password, o.disable_ssh_password_auth,
                          o.public_keys, o.preprovisioned_vm]))
        """,
        tmp_path,
    )
    path = "/home/azureuser/.ssh/authorized_keys"
    assert parsed == [
        "vm-under-test",
        "azureuser",
        None,
        True,
        [{"fingerprint": None, "path": path, "value": KEY}],
        False,
    ]


@pytest.mark.integration
def test_waagent_reads_ovf_env(agents: Path, tmp_path: Path) -> None:
    spec = ovf.Provisioning(
        "wa-host", "wauser", (ovf.PublicKey(KEY, "/home/wauser/.ssh/authorized_keys"),), "pw"
    )
    (tmp_path / "ovf-env.xml").write_bytes(ovf.ovf_env(spec))
    parsed = run_agent_code(
        agents,
        """
        import json
        from azurelinuxagent.common.protocol.ovfenv import OvfEnv
        o = OvfEnv(open("ovf-env.xml").read())
        print(json.dumps([o.hostname, o.username, o.user_password,
                          o.disable_ssh_password_auth, o.ssh_pubkeys, o.provision_guest_agent]))
        """,
        tmp_path,
    )
    assert parsed == [
        "wa-host",
        "wauser",
        "pw",
        True,
        [["/home/wauser/.ssh/authorized_keys", None, KEY]],
        "true",
    ]


# --- the DVD ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_dvd_is_udf_holding_ovf_env(tmp_path: Path) -> None:
    image = media.write_media({"ovf-env.xml": ovf.ovf_env(SPEC)}, tmp_path / "dvd.iso")
    info = subprocess.run(["udfinfo", image], capture_output=True, text=True, check=True)
    assert "label=rd_rdfe_stable" in info.stdout.splitlines()
    # The ISO 9660 bridge, read by another tool: the file, byte for byte.
    extracted = subprocess.run(
        ["isoinfo", "-R", "-i", image, "-x", "/ovf-env.xml"], capture_output=True, check=True
    ).stdout
    assert extracted == ovf.ovf_env(SPEC)
    # No file of the build machine in it.
    listing = subprocess.run(
        ["isoinfo", "-R", "-f", "-i", image], capture_output=True, text=True, check=True
    ).stdout
    assert listing.split() == ["/ovf-env.xml"]


def test_dvd_refuses_paths() -> None:
    with pytest.raises(ValueError, match="plain file name"):
        media.write_media({"../x": b""}, Path("unused.iso"))


# --- the wireserver ---------------------------------------------------------------------------


def test_wireserver_answers_what_the_protocol_asks(wire: wireserver.Wireserver) -> None:
    base = f"http://127.0.0.1:{wire.port}"
    status, body = _get(f"{base}/?comp=versions")
    assert status == 200
    assert ElementTree.fromstring(body).findtext("Preferred/Version") == "2012-11-30"
    status, body = _get(f"{base}/machine/?comp=goalstate", {"x-ms-version": "2012-11-30"})
    root = ElementTree.fromstring(body)
    assert root.findtext("Container/ContainerId") == "container-7"
    assert root.findtext("Container/RoleInstanceList/RoleInstance/InstanceId") == "instance-9"
    assert root.find(".//Certificates") is None
    assert _get(f"{base}/machine/?comp=certificates")[0] == 404
    assert [(r.method, r.target, r.status) for r in wire.requests] == [
        ("GET", "/?comp=versions", 200),
        ("GET", "/machine/?comp=goalstate", 200),
        ("GET", "/machine/?comp=certificates", 404),
    ]
    assert not wire.ready_reported


def test_a_report_without_a_state_is_refused(wire: wireserver.Wireserver) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{wire.port}/machine?comp=health", data=b"<Health/>", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(request, timeout=10)
    assert failed.value.code == 400
    assert wire.health_reports() == [] and not wire.ready_reported


@pytest.mark.integration
def test_cloud_init_reports_ready(
    agents: Path, wire: wireserver.Wireserver, tmp_path: Path
) -> None:
    run_agent_code(
        agents,
        f"""
        import json
        from cloudinit.sources.helpers import azure
        shim = azure.WALinuxAgentShim(endpoint="127.0.0.1:{wire.port}")
        print(json.dumps(shim.register_with_azure_and_fetch_data()))
        """,
        tmp_path,
    )
    assert wire.ready_reported
    (report,) = [r for r in wire.requests if r.method == "POST"]
    assert report.target == "/machine?comp=health"
    root = ElementTree.fromstring(report.body)
    assert root.findtext("Container/ContainerId") == "container-7"
    assert root.findtext("Container/RoleInstanceList/Role/InstanceId") == "instance-9"


@pytest.mark.integration
def test_cloud_init_failure_report_is_not_ready(
    agents: Path, wire: wireserver.Wireserver, tmp_path: Path
) -> None:
    run_agent_code(
        agents,
        f"""
        from cloudinit.sources.helpers import azure
        azure.report_failure_to_fabric(endpoint="127.0.0.1:{wire.port}", description="x")
        print("null")
        """,
        tmp_path,
    )
    assert wire.health_reports() == ["NotReady"]
    assert not wire.ready_reported


@pytest.mark.integration
def test_waagent_protocol_reports_ready(
    agents: Path, wire: wireserver.Wireserver, tmp_path: Path
) -> None:
    seen = run_agent_code(
        agents,
        f"""
        import json, os
        from azurelinuxagent.common import conf
        conf.__conf__.values["Lib.Dir"] = os.getcwd()
        conf.__conf__.values["Debug.EnableFastTrack"] = "n"  # no HostGAPlugin here
        from azurelinuxagent.common.protocol.wire import WireProtocol
        protocol = WireProtocol("127.0.0.1:{wire.port}")
        protocol.detect()
        state = protocol.client.get_goal_state()
        protocol.client.report_health("Ready", None, None)
        print(json.dumps([state.container_id, state.role_instance_id,
                          state.hosting_env.role_name]))
        """,
        tmp_path,
    )
    assert seen == ["container-7", "instance-9", "archkernel-boottest"]
    assert wire.health_reports() == ["Ready"]
    assert all(r.status == 200 for r in wire.requests)


# --- IMDS -------------------------------------------------------------------------------------


def test_imds_wants_the_metadata_header_and_a_version(metadata: imds.Imds) -> None:
    base = f"http://127.0.0.1:{metadata.port}/metadata/instance"
    assert _get(f"{base}?api-version=2021-08-01")[0] == 400
    assert _get(base, {"Metadata": "true"})[0] == 400
    status, body = _get(
        f"{base}/compute/osProfile/adminUsername?api-version=2021-08-01&format=text",
        {"Metadata": "true"},
    )
    assert (status, body) == (200, b"azureuser")
    reprovision = "/metadata/reprovisiondata?api-version=2019-06-01"
    assert _get(f"http://127.0.0.1:{metadata.port}{reprovision}", {"Metadata": "true"})[0] == 404
    assert [r.status for r in metadata.requests] == [400, 400, 200, 404]


@pytest.mark.integration
def test_cloud_init_reads_imds(agents: Path, metadata: imds.Imds, tmp_path: Path) -> None:
    seen = run_agent_code(
        agents,
        f"""
        import json
        from cloudinit.sources import DataSourceAzure as ds
        real = ds.readurl
        # The datasource's own URL and headers, sent to the stand-in instead.
        ds.readurl = lambda url, *a, **k: real(
            url.replace("169.254.169.254", "127.0.0.1:{metadata.port}"), *a, **k)
        md = ds.get_metadata_from_imds(retries=0, api_version=ds.IMDS_VER_WANT)
        network = ds.generate_network_config_from_instance_network_metadata(md["network"])
        print(json.dumps([ds._username_from_imds(md), ds._hostname_from_imds(md),
                          ds._disable_password_from_imds(md),
                          [k["keyData"] for k in md["compute"]["publicKeys"]], network]))
        """,
        tmp_path,
    )
    username, hostname, no_password, keys, config = seen
    assert (username, hostname, no_password, keys) == ("azureuser", "vm-under-test", True, [KEY])
    (nic,) = config["ethernets"].values()
    assert nic["match"]["macaddress"] == "52:54:00:12:34:56"
    assert nic["dhcp4"] is True
    (asked,) = metadata.requests
    assert asked.target == "/metadata/instance?api-version=2021-08-01&extended=true"
    assert asked.headers["metadata"] == "true"


# --- the relay and the network ----------------------------------------------------------------


@pytest.mark.integration
def test_relay_hands_a_connection_to_the_server(wire: wireserver.Wireserver) -> None:
    request = b"GET /machine/?comp=goalstate HTTP/1.1\r\nHost: 168.63.129.16\r\n\r\n"
    result = subprocess.run(
        [sys.executable, str(network.RELAY), str(wire.port)],
        input=request,
        capture_output=True,
        timeout=30,
        check=True,
    )
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert ElementTree.fromstring(body).findtext("Container/ContainerId") == "container-7"
    assert [r.target for r in wire.requests] == ["/machine/?comp=goalstate"]


def test_netdev_puts_both_addresses_in_the_network() -> None:
    argv = network.netdev_argv(network.Ports(8001, 8002, 2222), python="/usr/bin/python3")
    assert argv[0] == "-netdev" and argv[2] == "-device"
    options = argv[1].split(",")
    assert options[:6] == [
        "user",
        "id=fabric",
        "restrict=on",
        "net=168.0.0.0/7",
        "host=168.63.129.2",
        "dhcpstart=168.63.129.100",
    ]
    relay = str(network.RELAY)
    assert f"guestfwd=tcp:168.63.129.16:80-cmd:/usr/bin/python3 {relay} 8001" in options
    assert f"guestfwd=tcp:169.254.169.254:80-cmd:/usr/bin/python3 {relay} 8002" in options
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in options
    assert argv[3] == "virtio-net-pci,netdev=fabric,mac=52:54:00:12:34:56"


def test_netdev_escapes_commas_in_the_command() -> None:
    (_, netdev, *_) = network.netdev_argv(network.Ports(1, 2, 3), python="/opt/a,b/python3")
    assert "cmd:/opt/a,,b/python3 " in netdev


@pytest.mark.integration
def test_standing_fabric_stops_its_servers(tmp_path: Path) -> None:
    with standing_fabric(SPEC, tmp_path) as fabric:
        ports = (fabric.ports.wireserver, fabric.ports.imds)
        assert fabric.dvd.is_file()
        url = (
            f"http://127.0.0.1:{ports[1]}/metadata/instance/compute/name?api-version=1&format=text"
        )
        assert _get(url, {"Metadata": "true"}) == (200, b"vm-under-test")
        assert fabric.imds.document["compute"]["vmId"] == SPEC.vm_id
    for port in ports:
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
