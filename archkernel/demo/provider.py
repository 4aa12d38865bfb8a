"""What a Scaleway C1's boot server hands out, made with the provider's own tools.

`uboot.bootscript` is a U-Boot script image (`mkimage -T script`) of a multi-line script
like the C1's, which loads a kernel, the initrd and a DTB; the initrd is a U-Boot ramdisk
image (`mkimage -T ramdisk -C none`) of a gzip'd newc archive written by GNU cpio whose
first entry is `.`, as the provider's `find . | cpio` writes it. It holds an `/init`
shaped like the provider's (`. /functions`, `cp -rf / /initramfs`, `. ./boot-local`) that
reports and powers off, `/functions`, `/boot-local`, the `/shutdown` with its `kexec)`
branch, `/bin/busybox` with its applet links, a hard link and device nodes (so making it
needs root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from archkernel.errors import UserError
from archkernel.host.run import package_hint, run

INITRD_NAME = "initrd/uInitrd-Linux-armv7l-v3.x"
BOOTSCRIPT_NAME = "uboot.bootscript"
BUSYBOX = "/bin/busybox"  # Debian's busybox-static
# mkimage stamps images with the time: a fixed one makes the same images every time.
SOURCE_DATE_EPOCH = "1500000000"
TOOLS = ("mkimage", "cpio", "gzip")

# The provider's /init, shaped like its v3.15 /init: it sources /functions by absolute
# path, installs the busybox applets, keeps a copy of / in /initramfs for shutdown
# (`cp -rf`), mounts the pseudo file systems and sources the boot mode by *relative* path
# (`. ./boot-local`), never using `$0`. On the C1 it then sets up the network and NBD and
# switches root; this one reports what a test needs to see and powers the machine off.
# `$$` is 1 only while it runs as PID 1, that is when the new /init sources it.
PROVIDER_INIT = """\
#!/bin/sh
# Scaleway-style initrd init (test stand-in): the provider's steps, then report, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin

# Loading functions
. /functions

log_begin_msg "Installing busybox"
busybox mkdir -p /bin /sbin /etc /proc /sys /newroot /usr/bin /usr/sbin
/bin/busybox --install -s
log_end_msg

log_begin_msg "Cloning initramfs for shutdown..."
mkdir /initramfs
cp -rf / /initramfs 2>/dev/null
log_end_msg

[ -d /dev ] || mkdir -m 0755 /dev
emount -t devtmpfs -o mode=0755 udev /dev
emount -t sysfs -o nodev,noexec,nosuid sysfs /sys
emount -t proc -o nodev,noexec,nosuid proc /proc

echo "PROVIDER-INIT-OK pid=$$"
if [ "$(get_any is_in_kexec no)" = "yes" ]; then
\techo "PROVIDER-KEXEC=yes"
else
\techo "PROVIDER-KEXEC=no"
fi
echo "PROVIDER-CMDLINE: $(cat /proc/cmdline)"
for module in /sys/module/*; do
\t[ -e "$module/initstate" ] && echo "PROVIDER-MODULE-LOADED ${module##*/}"
done
[ -r /sys/module/nbd/parameters/nbds_max ] &&
\techo "PROVIDER-NBDS-MAX=$(cat /sys/module/nbd/parameters/nbds_max)"
[ -f /initramfs/functions ] && [ -f /initramfs/shutdown ] && echo "PROVIDER-INITRAMFS-COPY=yes"

# Defaults
root=$(get_any root "/dev/nbd0")
boot=$(get_any boot "local")

# Import boot-type functions
case "${boot}" in
    local)
        . ./boot-local
        ;;
    *)
        echo "PROVIDER-BOOT-UNKNOWN ${boot}"
        ;;
esac
mountroot
echo "PROVIDER-INIT-DONE"
poweroff -f
"""
# A few of the provider's /functions, as it writes them (get_opt reads /proc/cmdline).
FUNCTIONS = """\
# -*- shell-script -*-
log_begin_msg() {
    echo ">>> ${*}..."
}
log_end_msg() {
    :
}
esuccess() {
    echo ">>> ${*}"
}
emount() {
    mount "$@"
}
get_opt() {
    key=$1
    default=$2
    ret=$(cat /proc/cmdline 2>/dev/null | tr " " "\\n" | grep "^$1=" | head -n 1 | cut -d "=" -f 2)
    if [ -z "$ret" ]; then
        echo "$default"
    else
        echo "$ret"
    fi
}
get_any() {
    get_opt "$@"
}
"""
# /boot-local: the provider's attaches /dev/nbd0 and mounts the root partition.
BOOT_LOCAL = """\
# -*- shell-script -*-
mountroot() {
    echo "PROVIDER-BOOT-LOCAL-OK root=${root} cwd=$(pwd)"
}
"""
# /shutdown since v3.12.4: a `case` whose `kexec)` branch runs kexec -e, ending in a shell.
SHUTDOWN = """\
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

APPLETS = ["sh", "ash", "mount", "umount", "mkdir", "cat", "grep", "insmod", "echo", "ls"]
SBIN_APPLETS = ["poweroff", "reboot", "switch_root", "modprobe"]


def bootscript_text(initrd: str = INITRD_NAME) -> str:
    """A U-Boot script like the C1's: a kernel, the initrd and a DTB over TFTP, bootm.

    The initrd is neither the first nor the last file fetched, addresses come from
    variables, separators are tabs and runs of spaces: a parser must follow `bootm`.
    """
    return (
        "# Scaleway C1 boot script\n"
        "echo 'Booting from ${serverip}'\n"
        'setenv bootargs "console=ttyS0,115200 ip=dhcp root=/dev/nbd0 nbd.max_parts=8"\n'
        "setenv kernel_addr  0x00200000\n"
        "setenv\tinitrd_addr\t0x02000000\n"
        "setenv fdt_addr 0x01f00000\n"
        "setenv kernel_path kernel/armv7l-mainline-lts-4.9-4.9.93-rev1\n"
        "# tftp ${initrd_addr} initrd/uInitrd-Linux-armv7l-v2.x   (before 2016)\n"
        "tftp ${kernel_addr} ${kernel_path}\n"
        f"tftpboot\t${{initrd_addr}}   {initrd}\n"
        "tftp ${fdt_addr} dtb/armada-xp-scaleway-c1.dtb\n"
        "bootm ${kernel_addr} ${initrd_addr} ${fdt_addr}\n"
    )


def output_of(
    argv: Sequence[str | os.PathLike[str]],
    dest: Path,
    *,
    stdin: str | None = None,
    cwd: Path | None = None,
) -> bytes:
    """Run `argv` with its stdout in the file `dest`; return what it wrote (binary output:
    `run` decodes what it captures)."""
    with open(dest, "wb") as out:
        run(argv, stdin=stdin, cwd=cwd, stdout_file=out.fileno())
    return dest.read_bytes()


def mkimage(kind: str, payload: bytes, name: str, work: Path) -> bytes:
    """`mkimage -A arm -O linux -T KIND -C none` over `payload` (fixed timestamp)."""
    src, out = work / f".{kind}.in", work / f".{kind}.img"
    src.write_bytes(payload)
    argv = ["mkimage", "-A", "arm", "-O", "linux", "-T", kind, "-C", "none", "-n", name]
    run([*argv, "-d", src, out], env={"SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}, capture=True)
    data = out.read_bytes()
    src.unlink()
    out.unlink()
    return data


def script_image(text: str, work: Path) -> bytes:
    """A U-Boot script image of `text`, made by mkimage."""
    return mkimage("script", text.encode(), "boot script", work)


def gnu_cpio_gzip(tree: Path, work: Path) -> bytes:
    """`find . | sort | cpio -o -H newc -R 0:0 | gzip -9 -n` of `tree` (`work`: scratch)."""
    names = run(["find", "."], cwd=tree, capture=True).stdout
    ordered = "\n".join(sorted(names.splitlines())) + "\n"
    archive = work / ".initrd.cpio"
    cpio = ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"]
    try:
        output_of(cpio, archive, stdin=ordered, cwd=tree)
        return output_of(["gzip", "-9", "-n", "-c", archive], work / ".initrd.cpio.gz")
    finally:
        archive.unlink(missing_ok=True)
        (work / ".initrd.cpio.gz").unlink(missing_ok=True)


def provider_tree(tree: Path, init: str = PROVIDER_INIT, extra: Mapping[str, bytes] = {}) -> None:
    """A busybox initrd tree like the provider's: /init, busybox links, devices, a hard link."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "etc", "proc", "sys", "run", "lib"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    busybox = BUSYBOX if Path(BUSYBOX).is_file() else shutil.which("busybox")
    if busybox is None:
        raise UserError("busybox is not installed", package_hint("busybox"))
    shutil.copy2(busybox, tree / "bin/busybox")
    for applet in APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    for applet in SBIN_APPLETS:
        (tree / "sbin" / applet).symlink_to("../bin/busybox")
    (tree / "init").write_text(init)
    (tree / "init").chmod(0o755)
    (tree / "functions").write_text(FUNCTIONS)
    (tree / "boot-local").write_text(BOOT_LOCAL)
    (tree / "shutdown").write_text(SHUTDOWN)
    (tree / "shutdown").chmod(0o755)
    (tree / "etc/issue").write_text("Scaleway initrd (test)\n")
    os.link(tree / "etc/issue", tree / "etc/issue.net")
    (tree / "etc/ntpsrv").write_text("ntp.int.scaleway.com\n")
    (tree / "etc/ntpsrv").chmod(0o600)
    os.mknod(tree / "dev/console", stat.S_IFCHR | 0o600, os.makedev(5, 1))
    os.mknod(tree / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(tree / "dev/nbd0", stat.S_IFBLK | 0o660, os.makedev(43, 0))
    for name, data in extra.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)


def provider_initrd(work: Path, extra: Mapping[str, bytes] = {}) -> tuple[bytes, bytes]:
    """The provider's uInitrd and its payload (gzip'd newc cpio written by GNU cpio)."""
    with tempdir(work, "provider-tree") as tree:
        provider_tree(tree, extra=extra)
        payload = gnu_cpio_gzip(tree, work)
    return mkimage("ramdisk", payload, "initrd", work), payload


@contextlib.contextmanager
def tempdir(parent: Path, name: str) -> Iterator[Path]:
    """`parent/name`, made empty, removed when the block ends."""
    path = parent / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
