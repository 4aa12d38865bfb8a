"""Benchmark: patching a provider initrd, old shell pipeline vs archkernel.formats.initramfs.

Run as `python -m bench.bench_initrd` (as root, like the service). It makes a ~30 MiB
gzip -9 provider initrd (a newc cpio of ~70 MiB of mixed text and random files behind a
fake 64-byte U-Boot header) and a few fake modules, then times:

  old: dd off the header, gunzip | cpio -i into a directory, copy the modules in, move
       /init aside, write the new /init, find . | cpio -o -H newc | gzip -9
  new: read_entries (to take the old /init) + patch (original payload kept, a small
       gzip'd archive appended)

and prints both times and their ratio (the target is new <= 0.25 x old).
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

from archkernel.formats import cpio, initramfs
from archkernel.formats.cpio import Entry
from archkernel.host.files import temporary_directory

KERNEL_VERSION = "6.6.1-arch1-1"
MODULES = ("phylink", "mvneta_bm", "mvneta", "nbd")
NEW_INIT = b"#!/bin/sh\n/bin/busybox --install -s\n. /init.scw\n"
UBOOT_MAGIC = 0x27051956


def make_tree(root: Path, *, text_mib: int, random_mib: int, seed: int = 1) -> None:
    """A provider-like tree: /init, /bin, and many files of text-like and random bytes."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(300)
    ]
    corpus = " ".join(rng.choices(words, k=1_200_000)).encode()  # ~8 MiB of word salad
    for d in ("bin", "sbin", "etc", "lib", "usr/lib", "usr/share/data", "usr/share/blobs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "init").write_bytes(b"#!/bin/sh\nexec switch_root /newroot /sbin/init\n")
    (root / "init").chmod(0o755)
    written, n = 0, 0
    while written < text_mib << 20:
        size = rng.choice((4096, 16384, 65536, 262144, 1 << 20))
        start = rng.randrange(0, len(corpus) - size)
        (root / f"usr/share/data/f{n:05d}.txt").write_bytes(corpus[start : start + size])
        written, n = written + size, n + 1
    written = 0
    while written < random_mib << 20:
        size = rng.choice((65536, 1 << 20, 4 << 20))
        (root / f"usr/share/blobs/b{n:05d}.bin").write_bytes(rng.randbytes(size))
        written, n = written + size, n + 1


def fake_uimage(payload: bytes) -> bytes:
    """A U-Boot-like ramdisk image: magic, payload size, zeros elsewhere."""
    header = struct.pack(">II", UBOOT_MAGIC, 0) + b"\0" * 4 + struct.pack(">I", len(payload))
    return header + b"\0" * (64 - len(header)) + payload


def shell(script: str, cwd: Path) -> None:
    subprocess.run(["sh", "-ec", script], cwd=cwd, check=True)


def old_pipeline(work: Path, uinitrd: Path, modules: Path) -> Path:
    """The old service's steps, as shell pipelines."""
    out = work / "old-initrd.gz"
    (work / "new-init").write_bytes(NEW_INIT)
    shell(
        f"""
        dd if={uinitrd} of=initrd.gz bs=4M iflag=skip_bytes skip=64 status=none
        mkdir root
        cd root
        gunzip -c ../initrd.gz | cpio -idm --quiet
        mkdir -p usr/lib/modules/{KERNEL_VERSION}
        cp {modules}/*.ko usr/lib/modules/{KERNEL_VERSION}/
        mv init init.scw
        cp ../new-init init
        chmod 755 init
        find . | cpio -o -H newc --quiet | gzip -9 > {out}
        """,
        work,
    )
    return out


def new_pipeline(work: Path, uinitrd: Path, modules: Path) -> Path:
    """archkernel.formats.initramfs: read the original once to take /init, append the rest."""
    out = work / "new-initrd"
    payload = uinitrd.read_bytes()[64:]
    entries = initramfs.read_entries(payload, source=uinitrd.name, with_data=lambda p: p == "init")
    old_init = cpio.original_init(entries)
    moddir = f"usr/lib/modules/{KERNEL_VERSION}"
    additions = [
        Entry.file("init", NEW_INIT, mode=0o755),
        Entry.file("init.scw", old_init.data or b"", mode=old_init.mode),
        Entry.directory("usr/lib/modules"),
        Entry.directory(moddir),
        *(
            Entry.file(f"{moddir}/{ko.name}", ko.read_bytes())
            for ko in sorted(modules.glob("*.ko"))
        ),
    ]
    out.write_bytes(initramfs.patch(payload, additions, source=uinitrd.name))
    return out


def timed(label: str, step: object, *args: Path) -> tuple[float, Path]:
    os.sync()  # the other run's dirty pages must not be written back on our clock
    start = time.perf_counter()
    result = step(*args)  # type: ignore[operator]
    elapsed = time.perf_counter() - start
    print(f"{label:>4}: {elapsed:7.2f} s", flush=True)
    return elapsed, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-mib", type=int, default=60, help="compressible data (MiB)")
    parser.add_argument("--random-mib", type=int, default=12, help="incompressible data (MiB)")
    args = parser.parse_args(argv)

    with temporary_directory(prefix="bench-initrd-") as work:
        start = time.perf_counter()
        tree, modules = work / "provider", work / "modules"
        tree.mkdir()
        modules.mkdir()
        make_tree(tree, text_mib=args.text_mib, random_mib=args.random_mib)
        rng = random.Random(2)
        for name in MODULES:
            (modules / f"{name}.ko").write_bytes(b"\x7fELF" + rng.randbytes(150_000))
        shell("find . | cpio -o -H newc --quiet | gzip -9 > ../payload.gz", tree)
        payload = (work / "payload.gz").read_bytes()
        uinitrd = work / "uInitrd-Linux-armv7l-v4.5.7"
        uinitrd.write_bytes(fake_uimage(payload))
        raw = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
        print(
            f"provider initrd: {len(payload) / 2**20:.1f} MiB gzip -9 of {raw / 2**20:.1f} MiB"
            f" (made in {time.perf_counter() - start:.1f} s)",
            flush=True,
        )

        old_s, old_out = timed("old", old_pipeline, work, uinitrd, modules)
        new_s, new_out = timed("new", new_pipeline, work, uinitrd, modules)

        # Both results must unpack to the same /init and modules.
        patched = new_out.read_bytes()
        assert patched.startswith(payload)
        for result in (old_out.read_bytes(), patched):
            assert initramfs.read_file(result, "init", "result") == NEW_INIT
            assert initramfs.read_file(result, f"usr/lib/modules/{KERNEL_VERSION}/nbd.ko", "r")
        print(
            f"sizes: old {old_out.stat().st_size / 2**20:.1f} MiB, "
            f"new {len(patched) / 2**20:.1f} MiB (+{(len(patched) - len(payload)) / 1024:.0f} KiB)"
        )
        ratio = new_s / old_s
        print(f"ratio new/old: {ratio:.3f} (target <= 0.25): {'ok' if ratio <= 0.25 else 'MISSED'}")
    return 0 if ratio <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
