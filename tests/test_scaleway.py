"""The deciding half of scaleway_kexec: plain inputs, plain asserts, no machine needed.

Command lines, the kexec argv, server tags, which file of a bootscript is the initrd, the
shutdown patch, the new /init and which kernel to boot; then what the steps plan, made
from a small tree. The steps' acting is proven end to end in test_scaleway_e2e.py and for
real in test_scaleway_vm.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.plan import Run, describe, execute
from archkernel.scaleway import bootscript, cmdline, metadata, scripts, steps
from archkernel.settings import ScalewaySettings, Settings
from tests.support.safety_net import safety_net

EXTRA = "is_in_kexec=yes NO_SIGNAL_STATE=1 DONT_FETCH_KERNEL_MODULES=1 NO_NTPDATE=1 archkernel"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def sh_syntax_ok(script: str) -> None:
    """busybox sh parses `script` (the shell that runs it in the initrd)."""
    if not Path(BUSYBOX).is_file():
        pytest.skip("busybox not installed")
    result = subprocess.run(
        [BUSYBOX, "sh", "-n"], input=script, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# --- split_cmdline -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", []),
        ("   \n", []),
        ("console=ttyS0,115200 root=/dev/nbd0\n", ["console=ttyS0,115200", "root=/dev/nbd0"]),
        ("a\tb   c", ["a", "b", "c"]),
        ('dyndbg="file nbd.c +p" quiet', ['dyndbg="file nbd.c +p"', "quiet"]),
        ('"quoted whole" x', ['"quoted whole"', "x"]),
        ("x= y", ["x=", "y"]),
    ],
)
def test_split_cmdline(text: str, tokens: list[str]) -> None:
    assert cmdline.split_cmdline(text) == tokens


# --- kexec_cmdline ---------------------------------------------------------------------------


C1_CMDLINE = "console=ttyS0,115200 ip=dhcp root=/dev/nbd0 nbd.max_parts=8 boot=local NO_NTPDATE=0"


def test_kexec_cmdline_appends_the_extra_flags() -> None:
    assert cmdline.kexec_cmdline("console=ttyS0 root=/dev/nbd0\n", EXTRA) == (
        f"console=ttyS0 root=/dev/nbd0 {EXTRA}"
    )


def test_kexec_cmdline_replaces_a_flag_the_current_line_already_has() -> None:
    line = cmdline.kexec_cmdline(C1_CMDLINE, EXTRA)
    assert "NO_NTPDATE=0" not in line
    assert line == (
        "console=ttyS0,115200 ip=dhcp root=/dev/nbd0 nbd.max_parts=8 boot=local " + EXTRA
    )


@pytest.mark.parametrize(
    "current",
    [
        C1_CMDLINE,
        f"{C1_CMDLINE} {EXTRA}",  # a second kexec from an already patched line
        "is_in_kexec=no archkernel NO_SIGNAL_STATE=0 console=ttyS0",
        "archkernel=1 DONT_FETCH_KERNEL_MODULES",
        "",
    ],
)
def test_kexec_cmdline_has_no_flag_twice(current: str) -> None:
    tokens = cmdline.split_cmdline(cmdline.kexec_cmdline(current, EXTRA))
    keys = [t.split("=", 1)[0] for t in tokens]
    for key in ("is_in_kexec", "NO_SIGNAL_STATE", "DONT_FETCH_KERNEL_MODULES", "NO_NTPDATE"):
        assert keys.count(key) == 1, tokens
    assert keys.count("archkernel") == 1
    assert tokens[-5:] == EXTRA.split()  # the extra values win, in their order


def test_kexec_cmdline_keeps_repeated_flags_it_does_not_add() -> None:
    # Two consoles are legitimate; only the flags we add are deduplicated.
    line = cmdline.kexec_cmdline('console=tty0 console=ttyS0 dyndbg="file nbd.c +p"', "archkernel")
    assert line == 'console=tty0 console=ttyS0 dyndbg="file nbd.c +p" archkernel'


def test_already_kexeced_wants_the_whole_token() -> None:
    assert cmdline.already_kexeced(f"{C1_CMDLINE} archkernel\n")
    assert not cmdline.already_kexeced(C1_CMDLINE)
    assert not cmdline.already_kexeced(f"{C1_CMDLINE} archkernel_debug=1 x=archkernel")


# --- kexec_argv -------------------------------------------------------------------------------


def test_kexec_argv_without_dtb() -> None:
    line = cmdline.kexec_cmdline(C1_CMDLINE, EXTRA)
    assert cmdline.kexec_argv(
        Path("/boot/zImage"), Path("/boot/initramfs-archkernel.img"), line, None
    ) == [
        "kexec",
        "-l",
        "/boot/zImage",
        "--initrd=/boot/initramfs-archkernel.img",
        f"--command-line={line}",  # one argument, spaces and all: no shell in between
    ]


def test_kexec_argv_with_dtb() -> None:
    argv = cmdline.kexec_argv(
        Path("/boot/zImage"),
        Path("/boot/initramfs-archkernel.img"),
        "console=ttyS0 archkernel",
        Path("/boot/dtbs/armada-xp-scaleway-c1.dtb"),
    )
    assert argv[3:] == [
        "--initrd=/boot/initramfs-archkernel.img",
        "--dtb=/boot/dtbs/armada-xp-scaleway-c1.dtb",
        "--command-line=console=ttyS0 archkernel",
    ]
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
    assert len(flags) == len(set(flags))


# --- tags_from_metadata ------------------------------------------------------------------------


def test_tags_from_metadata() -> None:
    output = (
        "COMMERCIAL_TYPE=C1\n"
        "HOSTNAME=c1-10-1-2-3\n"
        "TAGS=3\n"
        "TAGS_0=web\n"
        "TAGS_1='archkernel_disabled'\n"
        '  TAGS_12="db"  \n'
        "VOLUMES_0_EXPORT_URI=nbd://10.1.17.180:4448\n"
        "TAGS_X=not-a-tag\n"
        "MY_TAGS_2=not-a-tag-either\n"
    )
    assert metadata.tags_from_metadata(output) == ["web", "archkernel_disabled", "db"]


def test_tags_from_metadata_without_tags() -> None:
    assert metadata.tags_from_metadata("TAGS=0\nHOSTNAME=x\n") == []


# --- initrd_from_bootscript ---------------------------------------------------------------------

C1_SCRIPT = """\
# Scaleway C1 boot script
echo 'Booting from ${serverip}'
setenv bootargs "console=ttyS0,115200 ip=dhcp root=/dev/nbd0 nbd.max_parts=8"
setenv kernel_addr  0x00200000
setenv\tinitrd_addr\t0x02000000
setenv fdt_addr 0x01f00000
setenv kernel_path kernel/armv7l-mainline-lts-4.9-4.9.93-rev1
# tftp ${initrd_addr} initrd/uInitrd-Linux-armv7l-v2.x
tftp ${kernel_addr} ${kernel_path}
tftpboot\t${initrd_addr}   initrd/uInitrd-Linux-armv7l-v3.x
tftp ${fdt_addr} dtb/armada-xp-scaleway-c1.dtb
bootm ${kernel_addr} ${initrd_addr} ${fdt_addr}
"""

BOOTSCRIPTS = {
    "c1 with setenv addresses, initrd in the middle": (
        C1_SCRIPT,
        "initrd/uInitrd-Linux-armv7l-v3.x",
    ),
    # U-Boot's own variables, never set by the script; the DTB is fetched last.
    "unset u-boot variables": (
        "tftp ${kernel_addr_r} zImage\n"
        "tftp ${ramdisk_addr_r} initrd/uInitrd-Linux-armv7l-v3.2\n"
        "tftp ${fdt_addr_r} dtb/armada-xp-scaleway-c1.dtb\n"
        "bootz ${kernel_addr_r} ${ramdisk_addr_r} ${fdt_addr_r}\n",
        "initrd/uInitrd-Linux-armv7l-v3.2",
    ),
    # The initrd is fetched first; bootm names it by a differently written address.
    "numeric addresses written differently": (
        "tftp 0x2000000 boot/provider-ramdisk.img\n"
        "tftp 0x00200000 boot/zImage-4.9\n"
        "tftp 0x1f00000 boot/c1.dtb\n"
        "bootm 0x200000 0x02000000 0x01F00000\n",
        "boot/provider-ramdisk.img",
    ),
    "path in a variable, server prefix, env set": (
        "env set rd 0x2000000\n"
        "setenv initrd_path initrd/uInitrd-Linux-armv7l-v3.3\n"
        "tftp 0x200000 10.1.31.34:kernel/zImage\n"
        "tftp ${rd} 10.1.31.34:${initrd_path}\n"
        "bootm 0x200000 ${rd}:${filesize}\n",
        "initrd/uInitrd-Linux-armv7l-v3.3",
    ),
    "one line with ; separators and CRLF": (
        "setenv ra 0x2000000; tftp 0x200000 k/zImage; tftp $ra initrd/uInitrd-v3.4;"
        " tftp 0x1f00000 d/c1.dtb\r\nbootm 0x200000 $ra 0x1f00000\r\n",
        "initrd/uInitrd-v3.4",
    ),
    "the same address loaded twice: the later file is what boots": (
        "tftp 0x2000000 initrd/uInitrd-fallback\n"
        "tftp 0x2000000 initrd/uInitrd-Linux-armv7l-v3.5\n"
        "tftp 0x200000 zImage\n"
        "bootm 0x200000 0x2000000\n",
        "initrd/uInitrd-Linux-armv7l-v3.5",
    ),
    "no bootm: the file named like an initrd": (
        "tftp 0x200000 kernel/zImage\ntftpboot 0x2000000 initrd/uInitrd-v3.6\ntftp 0x1f00000 c1.dtb\n",
        "initrd/uInitrd-v3.6",
    ),
    "tftp without an address": (
        "tftp kernel/zImage\ntftp initrd/uInitrd-v3.7\nbootm\n",
        "initrd/uInitrd-v3.7",
    ),
}


@pytest.mark.parametrize(("text", "expected"), BOOTSCRIPTS.values(), ids=BOOTSCRIPTS.keys())
def test_initrd_from_bootscript(text: str, expected: str) -> None:
    assert bootscript.initrd_from_bootscript(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "tftp 0x200000 kernel/zImage\ntftp 0x1f00000 dtb/c1.dtb\nbootz 0x200000 - 0x1f00000\n",
            r"names no initrd to fetch \(it loads: kernel/zImage, dtb/c1.dtb\)",
        ),
        ("echo nothing here\nboot\n", r"names no initrd to fetch \(it loads: no tftp command"),
        ("tftp 0x2000000 /srv/initrd/uInitrd\nbootm 0 0x2000000\n", "unsafe initrd path '/srv"),
        ("tftp 0x2000000 initrd/../../etc/shadow\nbootm 0 0x2000000\n", "unsafe initrd path"),
    ],
)
def test_initrd_from_bootscript_refuses(text: str, problem: str) -> None:
    with pytest.raises(UserError, match=problem) as info:
        bootscript.initrd_from_bootscript(text, source="bootscript uboot.bootscript")
    assert info.value.hint
    assert str(info.value).startswith("bootscript uboot.bootscript ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a quoted ';' is part of the word, an unquoted one separates commands
        ("setenv p 'initrd/a;b'; tftp 0x2000000 ${p}", "initrd/a;b"),
        ('setenv p "initrd/x y";tftp 0x2000000 "${p}"', "initrd/x y"),
        # '#' starts a comment at the start of a word only
        ("tftp 0x2000000 initrd/x#1 # tftp 0x2000000 initrd/other", "initrd/x#1"),
        # backslashes escape; a quote left open ends with its line
        ("tftp 0x2000000 initrd/a\\;b\ntftp 0x200000 zImage", "initrd/a;b"),
        ("tftp 0x2000000 'initrd/open\ntftp 0x200000 zImage", "initrd/open"),
        (";;; ; tftp 0x2000000 initrd/y ;;", "initrd/y"),
    ],
)
def test_bootscript_words_quotes_and_separators(text: str, expected: str) -> None:
    assert bootscript.initrd_from_bootscript(text) == expected


def test_bootscript_expansion_that_doubles_is_refused() -> None:
    # `setenv a ${a}${a}` doubles `a` each line: 40 lines were 2**40 bytes; 24 are 16 MiB.
    text = "setenv a x\n" + "setenv a ${a}${a}\n" * 24 + "tftp 0x2000000 initrd/${a}\n"
    with pytest.raises(UserError) as info:
        bootscript.initrd_from_bootscript(text, source="bootscript uboot.bootscript")
    assert info.value.message == (
        "bootscript uboot.bootscript expands its variables to more than 1 MiB"
    )
    assert info.value.hint == (
        "a real bootscript is a few hundred bytes; check what the TFTP server hands out as "
        "the bootscript"
    )


def test_bootscript_expansion_that_grows_line_by_line_is_refused() -> None:
    # 4,000 lines of `setenv a ${a}x` (60 KB) expand to 8 million bytes in all.
    text = "setenv a x\n" + "setenv a ${a}x\n" * 4000 + "tftp 0x2000000 initrd/${a}\n"
    assert len(text) < bootscript.MAX_SCRIPT
    with pytest.raises(UserError, match="expands its variables to more than 1 MiB"):
        bootscript.initrd_from_bootscript(text)


def test_bootscript_longer_than_the_limit_is_refused() -> None:
    script = "tftp 0x2000000 initrd/uInitrd\n"
    at_limit = "#" * (64 * 1024 - len(script) - 1) + "\n" + script
    assert bootscript.initrd_from_bootscript(at_limit) == "initrd/uInitrd"
    with pytest.raises(UserError) as info:
        bootscript.initrd_from_bootscript("#" + at_limit, source="bootscript b")
    assert info.value.message == "bootscript b is 65537 characters long; at most 64 KiB are read"


def test_bootscript_splitting_is_linear_in_separators() -> None:
    # Splitting at each ';' rescanned the rest of the line: 16 KB took 6 s, this minutes.
    text = "tftp 0x2000000 initrd/x" + ";" * (64 * 1024 - 30)
    with safety_net(60):
        assert bootscript.initrd_from_bootscript(text) == "initrd/x"
    quoted = "tftp 0x2000000 initrd/x;" + "';'\"" * ((64 * 1024 - 30) // 4)
    with safety_net(60), pytest.raises(UserError, match="names no initrd"):
        bootscript.initrd_from_bootscript(quoted.replace("initrd", "kernel"))


# --- patch_shutdown -------------------------------------------------------------------------------

OLD_SHUTDOWN = """\
#!/bin/sh
echo "Detaching NBD devices"
for dev in /dev/nbd*; do
    xnbd-client -d "$dev"
done
/bin/sh
"""


@pytest.mark.parametrize(
    "ending",
    [
        "/bin/sh",
        "sh",
        "exec /bin/sh",
        "/bin/busybox sh",
        "busybox sh",
        "/bin/bash",
        "sh -i",
        "ash",
        "exec setsid cttyhack sh",
        "setsid cttyhack /bin/sh",
    ],
)
@pytest.mark.integration
def test_patch_shutdown_replaces_the_final_shell(ending: str) -> None:
    script = OLD_SHUTDOWN.rsplit("/bin/sh", 1)[0] + ending + "\n"
    patched = scripts.patch_shutdown(script)
    assert patched is not None
    assert patched.splitlines()[:-1] == script.splitlines()[:-1]
    assert patched.splitlines()[-1] == "kexec -e"
    assert patched.endswith("\n")
    sh_syntax_ok(patched)


def test_patch_shutdown_skips_trailing_comments_and_blank_lines_keeps_indent() -> None:
    script = "#!/bin/sh\numount -a\n  /bin/sh\n\n# the end\n\n"
    assert scripts.patch_shutdown(script) == "#!/bin/sh\numount -a\n  kexec -e\n\n# the end\n"


@pytest.mark.parametrize(
    "script",
    [
        '#!/bin/sh\nxnbd-client -d /dev/nbd0\nif [ "$1" = kexec ]; then\n  kexec -e\nfi\npoweroff -f\n',
        "#!/bin/sh\numount -a\n/run/initramfs/sbin/kexec -e\n",
        '#!/bin/sh\n[ "$1" = kexec ] && kexec -e; halt -f\n',
    ],
)
def test_patch_shutdown_leaves_a_script_that_already_kexecs(script: str) -> None:
    assert scripts.patch_shutdown(script) is None


@pytest.mark.parametrize(
    "script",
    [
        "#!/bin/sh\numount -a\npoweroff -f\n",
        "#!/bin/sh\n# kexec -e is only a comment here\nhalt\n",
        "",
        "#!/bin/sh\n",
    ],
)
def test_patch_shutdown_refuses_an_ending_it_cannot_know(script: str) -> None:
    with pytest.raises(UserError, match="does not end with a shell or `kexec -e`") as info:
        scripts.patch_shutdown(script)
    assert info.value.hint


# The provider's /shutdown since v3.12.4 (scaleway/initrd tree-common/shutdown, v3.15): a
# `case` whose `kexec)` branch runs kexec -e; its last line is a shell.
PROVIDER_SHUTDOWN = """\
#!/bin/sh

ACTION="${1:-halt}"

# detach nbd devices
for device in $(seq 0 15); do
    xnbd-client -c /dev/nbd${device} && xnbd-client -d /dev/nbd${device} &>/dev/null
done

# send sysrq
case "${ACTION}" in
    reboot)    reboot -f;    break;;
    poweroff)  poweroff -f;  break;;
    halt)      halt -f;      break;;
    kexec)
        kexec -e
        # if no kexec kernel was loaded, just reboot
        reboot -f
        ;;
esac

# this should never happen
/bin/sh
"""


@pytest.mark.parametrize(
    ("script", "kind", "line", "said"),
    [
        (
            PROVIDER_SHUTDOWN,
            "branch",
            16,
            "its `kexec)` branch runs kexec -e (line 16); left as it is",
        ),
        (
            '#!/bin/sh\ncase "$1" in\n  "kexec") /sbin/kexec -e ;;\n  *) halt -f ;;\nesac\nsh\n',
            "branch",
            3,
            "its `kexec)` branch runs kexec -e (line 3); left as it is",
        ),
        (
            "#!/bin/sh\numount -a\n/run/initramfs/sbin/kexec -e\n",
            "trailing",
            3,
            "it already ends with kexec -e; left as it is",
        ),
        (
            '#!/bin/sh\nif [ "$1" = kexec ]; then\n  kexec -e\nfi\npoweroff -f\n',
            "elsewhere",
            3,
            "it runs kexec -e on line 3 ('kexec -e'); left as it is",
        ),
        (
            "#!/bin/sh\numount -a\nexec /bin/sh\n",
            "patched",
            3,
            "its last command 'exec /bin/sh' (line 3) replaced with `kexec -e`",
        ),
    ],
    ids=["provider's kexec branch", "quoted kexec branch", "trailing", "in an if", "old shell"],
)
def test_examine_shutdown_says_what_it_found(script: str, kind: str, line: int, said: str) -> None:
    found = scripts.examine_shutdown(script)
    assert (found.kind, found.line, found.describe()) == (kind, line, said)
    assert (found.patched is None) == (kind != "patched")


def test_a_kexec_branch_without_kexec_e_does_not_count() -> None:
    script = '#!/bin/sh\ncase "$1" in\n  kexec) reboot -f ;;\nesac\n/bin/sh\n'
    found = scripts.examine_shutdown(script)
    assert found.kind == "patched"
    assert found.patched == '#!/bin/sh\ncase "$1" in\n  kexec) reboot -f ;;\nesac\nkexec -e\n'


def test_shutdown_plan_leaves_the_providers_script_and_says_why(c1_settings: Settings) -> None:
    script = c1_settings.scaleway.root / "run/initramfs/shutdown"
    script.write_text(PROVIDER_SHUTDOWN)
    plan = steps.shutdown(c1_settings)
    assert describe(plan) == [
        f"# {script}: its `kexec)` branch runs kexec -e (line 16); left as it is"
    ]
    execute(plan)
    assert script.read_text() == PROVIDER_SHUTDOWN


# --- ip= on the kexec command line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        ("console=ttyS0 ip=:::::eth0: root=/dev/nbd0", "console=ttyS0 root=/dev/nbd0"),
        ("ip=dhcp console=ttyS0 ipv6.disable=1 ip", "console=ttyS0 ipv6.disable=1"),
        ('"ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off" x', "x"),
    ],
)
def test_kexec_cmdline_drops_ip(current: str, expected: str) -> None:
    assert cmdline.kexec_cmdline(current, "archkernel", ["ip"]) == f"{expected} archkernel"


def test_kexec_cmdline_keeps_an_ip_the_user_adds() -> None:
    line = cmdline.kexec_cmdline("ip=:::::eth0: a", "ip=dhcp archkernel", ["ip"])
    assert line == "a ip=dhcp archkernel"


def test_kexec_plan_drops_ip_by_default_and_keeps_it_when_told(c1_settings: Settings) -> None:
    assert ScalewaySettings().drop_cmdline == ["ip"]
    (line,) = [a for a in steps.kexec(c1_settings).commands()[0] if a.startswith("--command")]
    assert "ip=" not in line
    kept = dataclasses.replace(
        c1_settings, scaleway=dataclasses.replace(c1_settings.scaleway, drop_cmdline=[])
    )
    (line,) = [a for a in steps.kexec(kept).commands()[0] if a.startswith("--command")]
    assert line.startswith("--command-line=console=ttyS0,115200 ip=dhcp root=/dev/nbd0")


# --- init_script ----------------------------------------------------------------------------------

ORDER = [
    "kernel/drivers/virtio/virtio_ring.ko.xz",
    "kernel/drivers/virtio/virtio.ko.zst",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko.xz",
    "kernel/drivers/net/virtio_net.ko.zst",
    "kernel/drivers/block/nbd.ko.gz",
    "kernel/drivers/mfd/intel-lpss.ko",
]


@pytest.mark.integration
def test_init_script_loads_the_modules_in_order_then_sources_the_provider_init() -> None:
    script = scripts.init_script(ORDER, "6.9.1-arch1-1")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/sh"
    insmods = [line.split()[1] for line in lines if line.startswith("insmod ")]
    assert insmods == [
        f"/archkernel/modules/{name}.ko"
        for name in (
            "virtio_ring",
            "virtio",
            "failover",
            "net_failover",
            "virtio_net",
            "nbd",
            "intel_lpss",
        )
    ]
    logged = [line for line in lines if line.startswith("echo 'archkernel: loading")]
    assert len(logged) == len(ORDER)
    # applets first (insmod is one), the provider's init last, sourced: it stays PID 1
    install = lines.index("/bin/busybox --install -s")
    assert lines.index("/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys") < install
    assert install < min(i for i, line in enumerate(lines) if line.startswith("insmod "))
    assert lines[-1] == ". /init.scw"
    assert "exec" not in script
    assert "6.9.1-arch1-1" in script
    sh_syntax_ok(script)


@pytest.mark.integration
def test_init_script_without_modules_still_hands_over() -> None:
    script = scripts.init_script([], "6.9.1-arch1-1")
    assert "insmod" not in script
    assert script.splitlines()[-1] == ". /init.scw"
    sh_syntax_ok(script)


def test_init_script_quotes_every_value() -> None:
    script = scripts.init_script(
        ["kernel/drivers/mfd/intel-lpss.ko", "kernel/block/nbd.ko.zst"], "6.9"
    )
    assert script.splitlines()[5:] == [
        "echo 'archkernel: loading intel_lpss'",
        "insmod /archkernel/modules/intel_lpss.ko || echo 'archkernel: loading intel_lpss failed'",
        "echo 'archkernel: loading nbd'",
        "insmod /archkernel/modules/nbd.ko || echo 'archkernel: loading nbd failed'",
        "echo 'archkernel: starting the provider init'",
        ". /init.scw",
    ]


@pytest.mark.parametrize(
    ("relpath", "name"),
    [
        ("kernel/$(reboot", "$(reboot"),  # modules.dep's `kernel/$(reboot -f).ko`, split
        ("kernel/$(reboot -f).ko", "$(reboot _f)"),
        ("kernel/a;reboot.ko.zst", "a;reboot"),
        ("kernel/`id`.ko", "`id`"),
        ("kernel/a\nreboot.ko", "a\nreboot"),
        ("kernel/.ko", ""),
    ],
)
def test_init_script_refuses_what_is_not_a_module_name(relpath: str, name: str) -> None:
    with pytest.raises(UserError) as info:
        scripts.init_script(["kernel/block/nbd.ko", relpath], "6.9")
    assert info.value.message == (
        f"module file {relpath!r} does not name a module (its name is {name!r})"
    )
    assert info.value.hint == (
        "module names are letters, digits, '_' and '-'; check the kernel's modules.dep"
    )


def test_init_script_refuses_a_version_with_control_characters() -> None:
    with pytest.raises(UserError, match=r"kernel version '6\.9\\nreboot -f' has control"):
        scripts.init_script([], "6.9\nreboot -f")


@pytest.mark.integration
@pytest.mark.parametrize("shell", ["busybox", "dash"])
def test_init_script_runs_the_modules_it_names(shell: str, tmp_path: Path) -> None:
    """The module lines run in a real shell, with stand-ins for insmod (logs its arguments)
    and the two busybox calls; the provider's init is a file that says it ran."""
    argv = [BUSYBOX, "sh"] if shell == "busybox" else ["dash"]
    if not shutil.which(argv[0]):
        pytest.skip(f"{shell} not installed")
    script = scripts.init_script(["kernel/mfd/intel-lpss.ko.xz", "kernel/block/nbd.ko"], "6.9")
    sh_syntax_ok(script)
    (tmp_path / "init.scw").write_text('echo "provider init as $0"\n')
    stand_ins = (
        'insmod() { printf "insmod %s|" "$@"; echo; [ "$1" != /archkernel/modules/nbd.ko ]; }\n'
        "busybox() { :; }\n"
    )
    body = script.replace("/bin/busybox ", "busybox ").replace(". /init.scw", ". ./init.scw")
    result = subprocess.run(
        [*argv, "-c", stand_ins + body, "init"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert result.stdout.splitlines() == [
        "archkernel: loading intel_lpss",
        "insmod /archkernel/modules/intel_lpss.ko|",
        "archkernel: loading nbd",
        "insmod /archkernel/modules/nbd.ko|",
        "archkernel: loading nbd failed",
        "archkernel: starting the provider init",
        "provider init as init",
    ]


# --- the steps' plans: made from a small tree, changing nothing -----------------------------------

OLD_SHUTDOWN = "#!/bin/sh\numount -a\n/bin/sh\n"


@pytest.fixture
def c1_settings(tmp_path: Path) -> Settings:
    """Settings for a C1-like tree under tmp_path/root (command line, shutdown script)."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cmdline").write_text(f"{C1_CMDLINE}\n")
    (root / "run/initramfs").mkdir(parents=True)
    (root / "run/initramfs/shutdown").write_text(OLD_SHUTDOWN)
    return Settings(
        workdir=tmp_path / "work",
        scaleway=ScalewaySettings(root=root, extra_cmdline=EXTRA, dtb="/boot/dtbs/c1.dtb"),
    )


def test_kexec_plan_loads_the_kernel_then_reboots_into_it(c1_settings: Settings) -> None:
    root = c1_settings.scaleway.root
    plan = steps.kexec(c1_settings)
    assert plan.commands() == [
        (
            "kexec",
            "-l",
            f"{root}/boot/zImage",
            f"--initrd={root}/boot/initramfs-archkernel.img",
            f"--dtb={root}/boot/dtbs/c1.dtb",
            # ip=dhcp left off (scaleway.drop_cmdline), NO_NTPDATE=0 replaced
            "--command-line=console=ttyS0,115200 root=/dev/nbd0 nbd.max_parts=8 boot=local "
            + EXTRA,
        ),
        ("systemctl", "kexec"),
    ]
    # kexec -l first: a failure there raises before systemctl kexec is reached
    assert [op.argv[0] for op in plan.ops if isinstance(op, Run)] == ["kexec", "systemctl"]
    assert describe(plan)[1] == "+ systemctl kexec"


@pytest.mark.integration
def test_kill_switch_is_a_command_of_step_1_only_when_installed(
    c1_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert steps.check(c1_settings).commands() == []
    assert "# skip the kill switch: scw-metadata is not installed" in describe(
        steps.check(c1_settings)
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "scw-metadata"
    monkeypatch.setenv("PATH", str(bin_dir))
    stand_in.write_text("#!/bin/sh\necho TAGS=1\necho TAGS_0=archkernel_disabled\n")
    stand_in.chmod(0o755)
    (metadata_run,) = [op for op in steps.check(c1_settings).ops if isinstance(op, Run)]
    assert metadata_run.argv == ("scw-metadata",)
    with pytest.raises(UserError, match="kill switch set"):
        metadata_run()
    stand_in.write_text("#!/bin/sh\nexit 3\n")  # a failing scw-metadata only warns
    metadata_run()


def test_tftp_steps_fetch_in_process_and_say_from_where(c1_settings: Settings) -> None:
    plan = steps.fetch_bootscript(c1_settings)
    assert plan.commands() == []
    work = c1_settings.workdir / "scaleway"
    assert describe(plan) == [
        "# fetch uboot.bootscript over TFTP from server (the server step 1 chooses) port 69 "
        f"into {work}/uboot.bootscript (rewritten only if it changed)"
    ]
    # the initrd's name comes from the bootscript step 2 fetches
    with pytest.raises(UserError, match="step 2 has not fetched the bootscript yet"):
        steps.fetch_initrd(c1_settings)


def test_shutdown_plan_replaces_the_final_shell(c1_settings: Settings) -> None:
    script = c1_settings.scaleway.root / "run/initramfs/shutdown"
    plan = steps.shutdown(c1_settings)
    assert describe(plan) == [f"# replace the last command of {script} ('/bin/sh') with `kexec -e`"]
    assert script.read_text() == OLD_SHUTDOWN  # planning changed nothing
    execute(plan)
    assert script.read_text() == "#!/bin/sh\numount -a\nkexec -e\n"
    assert describe(steps.shutdown(c1_settings)) == [
        f"# {script}: it already ends with kexec -e; left as it is"
    ]


def test_planning_writes_nothing(c1_settings: Settings) -> None:
    for step in (steps.check, steps.fetch_bootscript, steps.unpack, steps.pack, steps.kexec):
        step(c1_settings)
    assert not c1_settings.workdir.exists()
    with pytest.raises(UserError, match="step 1 has not found the kernel version yet"):
        steps.modules(c1_settings)


def test_the_initrd_unpack_limits_are_settings_read_by_unpack_and_pack(tmp_path: Path) -> None:
    from archkernel.plan import declared_settings
    from archkernel.scaleway import steps as scaleway_steps
    from archkernel.settings import load as load_settings

    (tmp_path / "s.toml").write_text(
        '[scaleway]\nmax_initrd_unpacked = "64MiB"\nmax_initrd_ratio = 10\n'
    )
    cfg = load_settings(str(tmp_path / "s.toml")).settings.scaleway
    assert (cfg.max_initrd_unpacked, cfg.max_initrd_ratio) == (64 << 20, 10)
    for step in (scaleway_steps.unpack, scaleway_steps.pack):
        assert {"scaleway.max_initrd_unpacked", "scaleway.max_initrd_ratio"} <= set(
            declared_settings(step)
        )
    (tmp_path / "bad.toml").write_text("[scaleway]\nmax_initrd_ratio = 1\n")
    with pytest.raises(UserError, match="max_initrd_ratio"):
        load_settings(str(tmp_path / "bad.toml"))
