"""The fabric as a VM sees it: the DVD, Azure's DHCP (the address, the routes of option 121
to the wireserver and IMDS, the wireserver's address in option 245), the wireserver and
IMDS at their fixed addresses, all in the boot's own network namespace.

A busybox initramfs on Debian's kernel plays a minimal agent, as Microsoft's "no agent"
page describes one: it loads the DVD and NIC drivers, takes a DHCP lease and installs
only the routes DHCP gave it, mounts the DVD as UDF and reads ovf-env.xml, asks IMDS for
its name, fetches the goal state and posts a Ready health report built from it. The
servers' records and the console prove each hop. One boot per VM generation's DVD
attachment (IDE, SCSI).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from archkernel.azure.fabric import boot, ovf, standing_fabric
from archkernel.demo.c1 import modules_closure
from archkernel.host import qemu
from tests.support.kernel import debian_kernel_tree, kernel_image, module_dir

pytestmark = [pytest.mark.integration, pytest.mark.vm, pytest.mark.root]

DONE = "FABRIC-DONE"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnTQmvTqg2Ll2SdbVUzJ6o2Bz6VjfNcpM4sXyUmzeKR t@x"
SPEC = ovf.Provisioning.with_key("vm-on-the-fabric", "azureuser", KEY)
MODULES = {
    1: ["ata_piix", "sr_mod", "udf", "virtio_pci", "virtio_net"],
    2: ["virtio_pci", "virtio_scsi", "sr_mod", "udf", "virtio_net"],
}

# Only the routes of option 121 (no default route from option 3): the wireserver and IMDS
# are reachable only if DHCP named them.
UDHCPC_SCRIPT = """#!/bin/sh
if [ "$1" = bound ]; then
    ifconfig "$interface" "$ip" netmask "$subnet" up
    echo "FABRIC: ip=$ip"
    echo "FABRIC: opt245=$opt245"
    set -- $staticroutes
    while [ $# -ge 2 ]; do
        echo "FABRIC: route $1 via $2"
        ip route add "$1" via "$2" dev "$interface"
        shift 2
    done
fi
"""

# The minimal agent: every step echoes what it found, or FABRIC-FAIL.
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /usr/bin /usr/sbin /dvd
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "FABRIC-FAIL: $1"; poweroff -f; }
for m in $(cat /modules); do insmod "/$m" || fail "insmod $m"; done
sleep 2
ifconfig lo up; ifconfig eth0 up || fail "no eth0"
udhcpc -i eth0 -n -q -t 10 -T 2 -O staticroutes -O 245 -s /udhcpc.script || fail "no DHCP lease"
mount -t udf -o ro /dev/sr0 /dvd || fail "mount DVD"
echo "FABRIC: ovf-hostname=$(sed -n 's/.*<wa:HostName>\([^<]*\)<.*/\1/p' /dvd/ovf-env.xml)"
wget -q -O /imds.txt --header 'Metadata: true' \
  'http://169.254.169.254/metadata/instance/compute/name?api-version=2021-08-01&format=text' \
  || fail "IMDS"
echo "FABRIC: imds-name=$(cat /imds.txt)"
wget -q -O /gs.xml --header 'x-ms-version: 2012-11-30' \
  'http://168.63.129.16/machine/?comp=goalstate' || fail "goal state"
C=$(sed -n 's/.*<ContainerId>\([^<]*\)<.*/\1/p' /gs.xml)
I=$(sed -n 's/.*<InstanceId>\([^<]*\)<.*/\1/p' /gs.xml)
N=$(sed -n 's/.*<Incarnation>\([^<]*\)<.*/\1/p' /gs.xml)
echo "FABRIC: container=$C"
R="<Health><GoalStateIncarnation>$N</GoalStateIncarnation><Container><ContainerId>$C"
R="$R</ContainerId><RoleInstanceList><Role><InstanceId>$I</InstanceId><Health><State>"
R="$R""Ready</State></Health></Role></RoleInstanceList></Container></Health>"
wget -q -O /dev/null --header 'x-ms-version: 2012-11-30' --header 'Content-Type: text/xml' \
  --post-data "$R" 'http://168.63.129.16/machine?comp=health' || fail "health report"
echo "FABRIC-DONE"
poweroff -f
"""


def _initramfs(stage: Path, generation: int) -> bytes:
    tree = debian_kernel_tree()
    moddir = module_dir(tree)
    for d in ("bin", "dev"):
        (stage / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", stage / "bin/busybox")
    os.mknod(stage / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    loaded = []
    for rel in modules_closure(moddir, MODULES[generation]):
        dest = stage / "modules.d" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, dest)
        loaded.append(f"modules.d/{rel}")
    (stage / "modules").write_text("\n".join(loaded) + "\n")
    for name, text in (("init", INIT), ("udhcpc.script", UDHCPC_SCRIPT)):
        (stage / name).write_text(text)
        (stage / name).chmod(0o755)
    names = subprocess.run(["find", "."], cwd=stage, capture_output=True, check=True).stdout
    return subprocess.run(
        ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
        input=names,
        cwd=stage,
        capture_output=True,
        check=True,
    ).stdout


def minimal_vm_argv(tmp_path: Path, generation: int, console: Path) -> list[str]:
    """QEMU booting Debian's kernel with the minimal agent's initramfs for `generation`."""
    initrd = tmp_path / "initrd.cpio"
    initrd.write_bytes(_initramfs(tmp_path / "stage", generation))
    return qemu.qemu_argv(
        kernel=kernel_image(debian_kernel_tree()),
        initrd=initrd,
        append="console=ttyS0 panic=-1 net.ifnames=0",
        memory=512,
        serial_log=console,
    )


@pytest.mark.parametrize("generation", [1, 2])
def test_a_minimal_agent_provisions_through_the_fabric(generation: int, tmp_path: Path) -> None:
    if shutil.which(qemu.QEMU) is None or os.geteuid() != 0:
        pytest.skip("needs qemu-system-x86_64 and root (device nodes in the initramfs)")
    console = tmp_path / "console.log"
    base = minimal_vm_argv(tmp_path, generation, console)
    with standing_fabric(SPEC, tmp_path / "fabric") as fabric:
        argv = fabric.inside(boot.provision_argv(base, fabric, generation))
        qemu.boot_and_wait(argv, console, DONE, 600)
        wire, imds = fabric.wireserver, fabric.imds
        text = console.read_text(errors="replace")
        assert "FABRIC: ip=10.0.0.4" in text
        assert "FABRIC: route 168.63.129.16/32 via 10.0.0.1" in text
        assert "FABRIC: route 169.254.169.254/32 via 10.0.0.1" in text
        assert "FABRIC: route 0.0.0.0/0 via 10.0.0.1" in text
        assert "fabric: opt245=a83f8110" in text.lower()  # 168.63.129.16 in hex
        assert "FABRIC: ovf-hostname=vm-on-the-fabric" in text
        assert "FABRIC: imds-name=vm-on-the-fabric" in text
        assert f"FABRIC: container={wire.state.container_id}" in text
        assert wire.ready_reported
        assert [(r.method, r.target) for r in wire.requests] == [
            ("GET", "/machine/?comp=goalstate"),
            ("POST", "/machine?comp=health"),
        ]
        assert [r.path for r in imds.requests] == ["/metadata/instance/compute/name"]
    assert "FABRIC-FAIL" not in text


def test_a_vm_without_ssh_fails_the_proofs_and_leaves_nothing(tmp_path: Path) -> None:
    # The minimal agent reports Ready, then powers off: nobody can log in.
    if shutil.which(qemu.QEMU) is None or os.geteuid() != 0:
        pytest.skip("needs qemu-system-x86_64 and root (device nodes in the initramfs)")
    console = tmp_path / "console.log"
    base = minimal_vm_argv(tmp_path, 1, console)
    key = boot.make_key(tmp_path / "key")
    spec = ovf.Provisioning.with_key(
        "vm-on-the-fabric", "azureuser", Path(f"{key}.pub").read_text()
    )
    run = boot.ProvisionBoot(
        qemu=base,
        generation=1,
        console=console,
        spec=spec,
        key=key,
        agent="cloud-init",
        timeout=600,  # QEMU powers off by itself long before
        scratch=tmp_path / "scratch",
    )
    with pytest.raises(boot.ProvisionFailed) as failed:
        boot.provision_boot(run)
    message = str(failed.value)
    assert "provisioning not proven: hostname (running '', /etc/hostname '', " in message
    assert "ovf-env.xml 'vm-on-the-fabric'), user_login, in_wheel" in message
    assert "(QEMU exited after" in message
    assert "FABRIC-DONE" in message  # the console's last lines
    assert "wireserver POST /machine?comp=health -> 200" in message
    assert "DHCPACK(fabric0) 10.0.0.4 52:54:00:12:34:56" in message  # the DHCP server's log
    result = failed.value.result
    assert result is not None and result.ready_reported and not result.user_login
    assert result.wrong_key_refused  # nothing logs in at all
    # QEMU, both servers, dnsmasq and the namespace are gone.
    pidfile = str(tmp_path / "scratch" / "qemu.pid").encode()
    assert not [p for p in Path("/proc").glob("[0-9]*") if pidfile in _cmdline(p)]
    assert not [t.name for t in threading.enumerate() if t.name in ("wireserver", "imds")]
    dhcp = str(tmp_path / "scratch" / "network" / "dnsmasq.pid").encode()
    assert not [p for p in Path("/proc").glob("[0-9]*") if dhcp in _cmdline(p)]
    netns = Path("/run/netns")
    mine = f"archkernel-fabric-{os.getpid()}-"
    assert not [n for n in (os.listdir(netns) if netns.is_dir() else []) if n.startswith(mine)]


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
