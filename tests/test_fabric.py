"""The Azure fabric stand-in: ovf-env.xml, the DVD, the wireserver, IMDS, the network.

The documents and answers are checked by the agents that consume them on Azure: Debian's
cloud-init (its Azure datasource and its wireserver shim) and waagent's wire protocol
client, run on the host against the stand-in (tests/support/fabric.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from archkernel.azure.fabric import (
    Fabric,
    hostplugin,
    imds,
    media,
    namespace,
    network,
    ovf,
    standing_fabric,
    wireserver,
)
from archkernel.errors import UserError
from archkernel.host import run
from tests.support.fabric import debian_agents, passing_proofs, run_agent_code
from tests.support.processes import alive, wait_for

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
        SPEC, mac="52:54:00:12:34:56", address="10.0.0.4", subnet=("10.0.0.0", 24)
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


@pytest.mark.integration
def test_without_a_user_waagent_refuses_the_document(agents: Path, tmp_path: Path) -> None:
    spec = ovf.Provisioning("wa-host", None, SPEC.public_keys)
    text = ovf.ovf_env(spec)
    assert b"UserName" not in text and b"wa-host" in text
    (tmp_path / "ovf-env.xml").write_bytes(text)
    refused = run_agent_code(
        agents,
        """
        import json
        from azurelinuxagent.common.protocol.ovfenv import OvfEnv
        try:
            OvfEnv(open("ovf-env.xml").read())
        except Exception as e:
            print(json.dumps([type(e).__name__, str(e)]))
        else:
            print(json.dumps(None))
        """,
        tmp_path,
    )
    assert refused is not None
    assert refused[0] == "ProtocolError" and "UserName not found" in refused[1]


# --- the DVD ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_dvd_is_udf_only_holding_ovf_env(tmp_path: Path) -> None:
    # genisoimage's own image, as read by another tool through its ISO 9660 side: the file,
    # byte for byte, and nothing else.
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "ovf-env.xml").write_bytes(ovf.ovf_env(SPEC))
    bridged = tmp_path / "bridged.iso"
    subprocess.run(media.media_argv(staging, bridged), check=True)
    extracted = subprocess.run(
        ["isoinfo", "-R", "-i", bridged, "-x", "/ovf-env.xml"], capture_output=True, check=True
    ).stdout
    assert extracted == ovf.ovf_env(SPEC)
    listing = subprocess.run(
        ["isoinfo", "-R", "-f", "-i", bridged], capture_output=True, text=True, check=True
    ).stdout
    assert listing.split() == ["/ovf-env.xml"]

    # What the fabric attaches: UDF only, as Azure's media (an image without the udf
    # module must not read it through ISO 9660).
    image = media.write_media({"ovf-env.xml": ovf.ovf_env(SPEC)}, tmp_path / "dvd.iso")
    info = subprocess.run(["udfinfo", image], capture_output=True, text=True, check=True)
    lines = info.stdout.splitlines()
    assert "label=rd_rdfe_stable" in lines and "numfiles=1" in lines
    probed = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", image], capture_output=True, text=True
    )
    assert probed.stdout.strip() == "udf"
    iso = subprocess.run(["isoinfo", "-d", "-i", image], capture_output=True, text=True)
    assert iso.returncode != 0 and "NOT in ISO 9660 format" in iso.stdout + iso.stderr
    # Only the descriptor changed: the file's data is where genisoimage put it.
    assert ovf.ovf_env(SPEC) in image.read_bytes()
    with pytest.raises(ValueError, match="no ISO 9660 primary volume descriptor"):
        media.udf_only(image)


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
    # cloud-init fetched the goal state too, but is not taken for waagent.
    assert any(r.query.get("comp") == "goalstate" for r in wire.requests)
    assert not wire.asked_by("WALinuxAgent")


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
    # The agent's own account of it, as the boot test quotes it in a failure.
    assert wire.failures_reported() == ["ProvisioningFailed: x"]


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
    assert wire.failures_reported() == []
    assert all(r.status == 200 for r in wire.requests)
    assert wire.asked_by("WALinuxAgent")  # its User-Agent: the boot test tells it apart


@pytest.mark.integration
def test_waagent_failure_report_names_why(
    agents: Path, wire: wireserver.Wireserver, tmp_path: Path
) -> None:
    run_agent_code(
        agents,
        f"""
        import os
        from azurelinuxagent.common import conf
        conf.__conf__.values["Lib.Dir"] = os.getcwd()
        conf.__conf__.values["Debug.EnableFastTrack"] = "n"
        from azurelinuxagent.common.protocol.wire import WireProtocol
        protocol = WireProtocol("127.0.0.1:{wire.port}")
        protocol.detect()
        # What waagent's provisioning handler sends when it fails (report_not_ready).
        protocol.client.report_health("NotReady", "Provisioning", "Starting")
        protocol.client.report_health("NotReady", "ProvisioningFailed", "UserName <not> found")
        print("null")
        """,
        tmp_path,
    )
    assert wire.health_reports() == ["NotReady", "NotReady"]
    assert wire.failures_reported() == ["ProvisioningFailed: UserName <not> found"]
    assert not wire.ready_reported


def test_a_report_without_a_description_names_its_sub_status() -> None:
    body = (
        b"<Health><Container><RoleInstanceList><Role><Health><State>NotReady</State>"
        b"<Details><SubStatus>ProvisioningFailed</SubStatus></Details></Health></Role>"
        b"</RoleInstanceList></Container></Health>"
    )
    report = wireserver.health_report(body)
    assert report == wireserver.HealthReport("NotReady", "ProvisioningFailed")
    assert report.failure == "ProvisioningFailed"
    assert wireserver.HealthReport("NotReady", "Provisioning", "Starting").failure is None
    assert wireserver.HealthReport("Ready").failure is None


def _health(*roles: tuple[str, str, str]) -> bytes:
    """A health report's body with one Role per (State, SubStatus, Description)."""
    parts = "".join(
        f"<Role><InstanceId>i</InstanceId><Health><State>{state}</State>"
        f"<Details><SubStatus>{sub}</SubStatus><Description>{why}</Description></Details>"
        "</Health></Role>"
        for state, sub, why in roles
    )
    return f"<Health><Container><RoleInstanceList>{parts}</RoleInstanceList></Container></Health>".encode()


def test_a_report_is_read_from_one_health_element_and_made_safe_to_show() -> None:
    # Two roles: the first one's State, SubStatus and Description, never a mix.
    mixed = _health(("NotReady", "Provisioning", ""), ("NotReady", "ProvisioningFailed", "x"))
    assert wireserver.health_report(mixed) == wireserver.HealthReport("NotReady", "Provisioning")
    # What the VM wrote cannot move the cursor, fake a line or run on.
    hostile = _health(
        ("NotReady", "ProvisioningFailed", "a&#13;&#10;fake&#x9b;2J&#x202e;" + "y" * 400)
    )
    report = wireserver.health_report(hostile)
    assert report is not None and report.failure is not None
    assert report.failure.startswith("ProvisioningFailed: a fake 2J yyy")
    assert report.failure.isprintable() and report.failure.endswith("...")
    assert len(report.description) == 300


def test_the_same_failure_reported_again_is_quoted_once(wire: wireserver.Wireserver) -> None:
    url = f"http://127.0.0.1:{wire.port}/machine?comp=health"
    for why in ("first", "again", "again", "again"):
        body = _health(("NotReady", "ProvisioningFailed", why))
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")) as r:
            assert r.status == 200
    assert wire.failures_reported() == ["ProvisioningFailed: first", "ProvisioningFailed: again"]
    assert wire.failures_reported(most=1) == ["ProvisioningFailed: again"]


@pytest.mark.integration
def test_waagent_takes_the_goal_state_when_the_host_plugin_has_no_fast_track(
    agents: Path, wire: wireserver.Wireserver, tmp_path: Path
) -> None:
    # Fast Track on, as in the image: waagent asks the HostGAPlugin for vmSettings first.
    with hostplugin.HostPlugin() as plugin:
        seen = run_agent_code(
            agents,
            f"""
            import json, os
            from azurelinuxagent.common import conf
            conf.__conf__.values["Lib.Dir"] = os.getcwd()
            conf.__conf__.values["Debug.EnableFastTrack"] = "y"
            from azurelinuxagent.common.protocol import hostplugin
            hostplugin.HOST_PLUGIN_PORT = {plugin.port}  # the stand-in's, on loopback
            from azurelinuxagent.common.protocol.wire import WireProtocol
            protocol = WireProtocol("127.0.0.1:{wire.port}")
            protocol.client._set_host_plugin(
                hostplugin.HostPluginProtocol("127.0.0.1", "container-7", "instance-9.1.xml"))
            protocol.detect()
            state = protocol.client.get_goal_state()
            print(json.dumps([state.container_id, protocol.client.get_host_plugin().get_health()]))
            """,
            tmp_path,
        )
        asked = [(r.method, r.path, r.status) for r in plugin.requests]
    assert seen == ["container-7", True]
    assert ("GET", "/vmSettings", 404) in asked
    assert ("GET", "/health", 200) in asked


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


# --- the network -------------------------------------------------------------------------------


def test_the_namespace_holds_the_fabric_addresses_and_the_gateway() -> None:
    ns = "archkernel-fabric-1-abc"
    assert network.setup_argv(ns) == [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "address", "add", "168.63.129.16/32", "dev", "lo"],
        ["ip", "-n", ns, "address", "add", "169.254.169.254/32", "dev", "lo"],
        ["ip", "-n", ns, "tuntap", "add", "dev", "fabric0", "mode", "tap"],
        ["ip", "-n", ns, "address", "add", "10.0.0.1/24", "dev", "fabric0"],
        ["ip", "-n", ns, "link", "set", "fabric0", "up"],
    ]
    assert network.teardown_argv(ns) == ["ip", "netns", "delete", ns]


def test_dhcp_answers_as_azure_does(tmp_path: Path) -> None:
    net = network.Network("archkernel-fabric-1-abc", tmp_path)
    argv = network.dnsmasq_argv(net)
    assert argv[:5] == ["ip", "netns", "exec", "archkernel-fabric-1-abc", "dnsmasq"]
    # Only DHCP, only on the tap device, nothing read from the build machine.
    for option in ("--conf-file=/dev/null", "--port=0", "--interface=fabric0"):
        assert option in argv
    assert "--dhcp-range=10.0.0.4,10.0.0.4,255.255.255.0,infinite" in argv
    assert f"--dhcp-leasefile={tmp_path}/dnsmasq.leases" in argv
    # Routes to the wireserver, IMDS and the default route; the wireserver's address.
    assert (
        "--dhcp-option-force=121,168.63.129.16/32,10.0.0.1,169.254.169.254/32,10.0.0.1,"
        "0.0.0.0/0,10.0.0.1"
    ) in argv
    assert "--dhcp-option-force=245,168.63.129.16" in argv


def test_the_nic_is_on_the_tap_device() -> None:
    assert network.netdev_argv() == [
        "-netdev", "tap,id=fabric,ifname=fabric0,script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=fabric,mac=52:54:00:12:34:56",
    ]  # fmt: skip


def test_stale_namespaces_are_those_of_ended_runs() -> None:
    names = [
        "archkernel-fabric-100-a1b2c3",
        "archkernel-fabric-200-a1b2c3",
        "archkernel-fabric-x-1",
        "someone-else-300-a1b2c3",
    ]
    assert namespace.stale_namespaces(names, alive={200}) == ["archkernel-fabric-100-a1b2c3"]


@pytest.mark.integration
@pytest.mark.root
def test_a_killed_runs_namespace_goes_with_what_still_runs_in_it() -> None:
    # A run killed outright leaves its namespace and dnsmasq (here: a sleep) behind; the
    # next run's network removes both.
    dead = 4_000_000  # above pid_max: no process has it
    name = f"archkernel-fabric-{dead}-abcdef"
    subprocess.run(["ip", "netns", "add", name], check=True)
    left = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"])
    try:
        # Once sleep runs inside, `ip netns pids` names it.
        wait_for(
            lambda: subprocess.run(["ip", "netns", "pids", name], capture_output=True).stdout,
            "sleep inside the namespace",
        )
        namespace._remove_stale()
        assert left.wait(timeout=20) != 0  # killed, not ended
        assert name not in _netns()
    finally:
        left.kill()
        left.wait()
        subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


@pytest.mark.integration
@pytest.mark.root
def test_dnsmasq_dies_with_a_run_killed_outright(tmp_path: Path) -> None:
    # SIGKILL leaves no time to stop it: PR_SET_PDEATHSIG must, which a change of group
    # (dnsmasq's default, dip) would have cleared.
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib\n"
            "from archkernel.azure.fabric.namespace import fabric_network\n"
            "with fabric_network(pathlib.Path(sys.argv[1])) as net:\n"
            "    pathlib.Path(sys.argv[2]).write_text(net.netns)\n"
            "    time.sleep(600)\n",
            str(tmp_path / "net"),
            str(ready),
        ]
    )
    dnsmasq = 0
    try:
        wait_for(lambda: ready.exists() and ready.read_text(), "the fabric network up")
        dnsmasq = int((tmp_path / "net" / "dnsmasq.pid").read_text())
        assert "\nGid:\t0\t0\t0\t0\n" in Path(f"/proc/{dnsmasq}/status").read_text()
        holder.kill()
        holder.wait()
        wait_for(lambda: not alive(dnsmasq), "dnsmasq ended")
        assert ready.read_text() in _netns()  # what the next run's sweep removes
        namespace._remove_stale()
        assert ready.read_text() not in _netns()
    finally:
        holder.kill()
        holder.wait()
        if dnsmasq and alive(dnsmasq):
            os.kill(dnsmasq, signal.SIGKILL)
        if ready.exists():
            subprocess.run(["ip", "netns", "delete", ready.read_text()], capture_output=True)


def test_without_root_the_fabric_network_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError) as refused:
        namespace.require()
    assert "needs root" in str(refused.value)
    assert 'boottest_mode = "console"' in (refused.value.hint or "")


def test_a_missing_dnsmasq_is_named_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(run, "which", lambda t: None if t == "dnsmasq" else f"/usr/bin/{t}")
    with pytest.raises(UserError) as refused:
        namespace.require()
    said = str(refused.value)
    assert said.startswith("the provisioning boot test's network needs 1 missing tool(s): dnsmasq")
    assert "'dnsmasq-base' on Debian/Ubuntu" in said


def _netns() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


def _inside(fabric: Fabric, url: str, *headers: str) -> tuple[int, bytes]:
    """GET `url` from inside the VM's network, as the VM would (curl-less: wget)."""
    argv = ["wget", "-q", "-O", "-", *(f"--header={h}" for h in headers), url]
    got = subprocess.run(fabric.inside(argv), capture_output=True, timeout=30, check=False)
    return got.returncode, got.stdout


@pytest.mark.integration
@pytest.mark.root
def test_the_fabric_answers_at_azures_addresses_and_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("dnsmasq") is None or shutil.which("wget") is None:
        pytest.skip("needs root, dnsmasq and wget")
    with standing_fabric(SPEC, tmp_path) as fabric:
        netns = fabric.network.netns
        assert netns in _netns()
        assert fabric.dvd.is_file()
        imds_url = "http://169.254.169.254/metadata/instance/compute/name?api-version=1&format=text"
        assert _inside(fabric, imds_url, "Metadata: true") == (0, b"vm-under-test")
        code, body = _inside(fabric, "http://168.63.129.16/?comp=versions")
        assert code == 0 and b"<Version>2012-11-30</Version>" in body
        addresses = subprocess.run(
            fabric.inside(["ip", "-o", "-4", "address", "show"]), capture_output=True, text=True
        ).stdout
        assert "fabric0    inet 10.0.0.1/24" in addresses
        dnsmasq_pid = int(fabric.network.dhcp_pidfile.read_text())
        assert Path(f"/proc/{dnsmasq_pid}").exists()
        # The build machine's own network is untouched.
        host = subprocess.run(["ip", "-o", "address"], capture_output=True, text=True).stdout
        assert "168.63.129.16" not in host and "fabric0" not in host
    assert netns not in _netns()
    assert not Path(f"/proc/{dnsmasq_pid}").exists()
    assert [r.path for r in fabric.imds.requests] == ["/metadata/instance/compute/name"]


# --- the proofs an agent's way of provisioning decides --------------------------------------


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"agent": "waagent", "waagent_goal_state": True}, []),
        ({"in_wheel": False}, ["in_wheel"]),
        ({"agent": "waagent", "in_wheel": False}, ["in_wheel"]),
        ({"sudo": False}, ["sudo"]),
        ({"waagent_goal_state": False}, ["waagent_goal_state"]),
        ({"agent": "waagent", "waagent_goal_state": False}, ["waagent_goal_state"]),
    ],
)
def test_waagent_is_proven_by_wheel_sudo_and_its_goal_state(
    change: dict[str, object], failed: list[str]
) -> None:
    result = passing_proofs(**change)
    assert result.failed(expected_hostname="h", refuse_password=True) == failed
