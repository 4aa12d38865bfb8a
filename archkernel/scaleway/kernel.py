"""Which installed kernel `scaleway.kernel` is, and the version of its module directory.

In order, the first that answers wins:

1. the `scaleway.kernel_version` setting;
2. pacman's local database: the package that owns the kernel image (`boot/zImage`) and the
   `usr/lib/modules/<version>/` it ships (how Arch Linux ARM's `linux-armv7` is found:
   it writes no `pkgbase`);
3. the module directories with a `pkgbase` file (Arch Linux's x86_64 kernels);
4. every module directory.

Where several remain, the one matching the kernel image is chosen: the version the image
itself carries (`image_version`), or a copy of the image in the module directory; with no
way to choose, the error lists them all. `choose` decides from plain data; `find` reads
the system for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from archkernel.errors import UserError
from archkernel.scaleway import pacman

MAX_IMAGE = 64 * 1024 * 1024  # read of a kernel image, at most
MAX_UNPACKED = 128 * 1024 * 1024  # decompressed while looking for the version, at most
_BANNER = re.compile(rb"Linux version ([\x21-\x7e]{1,64}) \(")
_GZIP, _XZ = b"\x1f\x8b\x08", b"\xfd7zXZ\x00"
SET_IT = "set scaleway.kernel_version to the one to boot"


@dataclass(frozen=True)
class Owner:
    """A package owning the kernel image: `linux-armv7 6.2.10-1` and its module versions."""

    label: str
    versions: tuple[str, ...]


@dataclass(frozen=True)
class Evidence:
    """What the system says about its kernels (read by `find`, judged by `choose`)."""

    kernel: str  # as configured, e.g. /boot/zImage
    on_disk: tuple[str, ...]  # module directories present
    owners: tuple[Owner, ...] = ()
    pkgbase: tuple[str, ...] = ()  # module directories with a pkgbase file
    image_version: str | None = None  # the version the kernel image carries, if read
    same_image: tuple[str, ...] = ()  # module directories holding a copy of the image


@dataclass(frozen=True)
class Found:
    """The kernel's module directory version, and how it was found (for the log)."""

    version: str
    how: str
    package: str | None = None
    notes: tuple[str, ...] = field(default=())


def _narrow(candidates: list[str], ev: Evidence) -> str | None:
    """The one candidate matching the kernel image, if exactly one does."""
    for matching in (
        [v for v in candidates if v == ev.image_version],
        [v for v in candidates if v in ev.same_image],
    ):
        if len(matching) == 1:
            return matching[0]
    return None


def _several(what: list[str], ev: Evidence) -> UserError:
    shown = f"; the image says {ev.image_version}" if ev.image_version else ""
    return UserError(
        f"several kernels are installed ({', '.join(what)}) and none is known to be "
        f"{ev.kernel}{shown}",
        SET_IT,
    )


def choose(ev: Evidence, configured: str | None) -> Found:
    """The module directory version of the kernel `ev.kernel` (pure)."""
    if configured:
        if configured not in ev.on_disk:
            raise UserError(
                f"kernel_version {configured!r}: usr/lib/modules/{configured} does not exist",
                "set scaleway.kernel_version to one of the directories there, or remove it",
            )
        return Found(configured, "scaleway.kernel_version")
    if len(ev.owners) == 1:
        owner = ev.owners[0]
        present = [v for v in owner.versions if v in ev.on_disk]
        how = f"pacman: {owner.label} owns {ev.kernel}"
        if len(present) == 1:
            return Found(present[0], how, owner.label)
        if present:
            chosen = _narrow(present, ev)
            if chosen:
                return Found(chosen, how, owner.label)
            raise _several([f"{v} ({owner.label})" for v in present], ev)
        if owner.versions:
            raise UserError(
                f"{owner.label} owns {ev.kernel} and ships usr/lib/modules/"
                f"{owner.versions[0]}/, which does not exist",
                f"reinstall it: pacman -S {owner.label.split()[0]}",
            )
    elif len(ev.owners) > 1:
        listed = [(v, o.label) for o in ev.owners for v in o.versions if v in ev.on_disk]
        chosen = _narrow([v for v, _ in listed], ev)
        if chosen:
            label = next(lab for v, lab in listed if v == chosen)
            return Found(chosen, f"pacman: {label} owns {ev.kernel}", label)
        shown = [f"{v} ({lab})" for v, lab in listed] or [o.label for o in ev.owners]
        raise _several(shown, ev)
    notes = (
        (f"{ev.owners[0].label} owns it but ships no usr/lib/modules/<version>/",)
        if ev.owners
        else ("no package in pacman's database owns it",)
    )
    if ev.pkgbase:
        if len(ev.pkgbase) == 1:
            return Found(ev.pkgbase[0], "the only module directory with a pkgbase", notes=notes)
        chosen = _narrow(list(ev.pkgbase), ev)
        if chosen:
            return Found(chosen, "the module directory matching the image", notes=notes)
        raise _several(list(ev.pkgbase), ev)
    if not ev.on_disk:
        raise UserError(
            "no kernel found: usr/lib/modules holds no module directory",
            "install the Arch kernel package (e.g. linux-armv7), or set scaleway.kernel_version",
        )
    chosen = _narrow(list(ev.on_disk), ev)
    if chosen:
        return Found(chosen, "the module directory matching the image", notes=notes)
    if len(ev.on_disk) == 1 and ev.image_version is None:
        return Found(ev.on_disk[0], "the only module directory", notes=notes)
    if len(ev.on_disk) == 1:
        raise UserError(
            f"{ev.kernel} is Linux {ev.image_version} but the only module directory is "
            f"{ev.on_disk[0]}",
            "install the modules of the kernel you boot, or point scaleway.kernel at its image",
        )
    raise _several(list(ev.on_disk), ev)


# --- reading -------------------------------------------------------------------------------


def image_version(data: bytes) -> str | None:
    """The kernel release a kernel image carries, or None when it cannot be read.

    x86's bzImage names it in its setup header; an uncompressed image has the
    `Linux version X (` banner; an ARM zImage (or a uImage around one) holds the image
    gzip- or xz-compressed after its decompressor: decompressed here, bounded, until the
    banner shows.
    """
    if data[0x202:0x206] == b"HdrS" and len(data) > 0x210:
        offset = int.from_bytes(data[0x20E:0x210], "little") + 0x200
        text = data[offset : offset + 256].split(b"\0", 1)[0].split(b" ", 1)[0]
        if text and text.isascii() and text.decode().isprintable():
            return text.decode()
    m = _BANNER.search(data)
    if m:
        return m.group(1).decode()
    for magic in (_XZ, _GZIP):
        start = data.find(magic)
        tries = 0
        while start >= 0 and tries < 8:
            found = _banner_in(data[start:], xz=magic == _XZ)
            if found:
                return found
            start, tries = data.find(magic, start + 1), tries + 1
    return None


def _banner_in(stream: bytes, *, xz: bool) -> str | None:
    """Decompress `stream` in chunks until the banner shows (None: not there, or not data)."""
    import lzma  # only when no package names the kernel: not on every boot
    import zlib

    chunk = 1 << 20
    seen, tail = 0, b""
    try:
        if xz:
            xz_decoder = lzma.LZMADecompressor(lzma.FORMAT_XZ)
            pos = 0
            # At most `chunk` bytes out per call: 1 MiB of xz can hold gigabytes of zeros.
            while seen < MAX_UNPACKED and not xz_decoder.eof:
                if xz_decoder.needs_input:
                    if pos >= len(stream):
                        break
                    block, pos = stream[pos : pos + chunk], pos + chunk
                else:
                    block = b""
                out = xz_decoder.decompress(block, max_length=chunk)
                seen += len(out)
                m = _BANNER.search(tail + out)
                if m:
                    return m.group(1).decode()
                tail = (tail + out)[-256:]
        else:
            gz_decoder = zlib.decompressobj(31)
            pending = stream
            while seen < MAX_UNPACKED and not gz_decoder.eof:
                out = gz_decoder.decompress(pending, chunk)
                pending = gz_decoder.unconsumed_tail
                if not out and not pending:
                    break  # the input ends before the stream does
                seen += len(out)
                m = _BANNER.search(tail + out)
                if m:
                    return m.group(1).decode()
                tail = (tail + out)[-256:]
    except (lzma.LZMAError, zlib.error):
        return None
    return None


def _read_image(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(MAX_IMAGE)


def find(root: Path, kernel: str, configured: str | None) -> Found:
    """Read what `choose` needs from the system under `root` and choose."""
    moddirs = root / "usr/lib/modules"
    on_disk = tuple(
        sorted(
            p.name
            for p in (moddirs.iterdir() if moddirs.is_dir() else [])
            if p.is_dir() and not p.name.startswith("extramodules")
        )
    )
    image = root / kernel.lstrip("/")
    if configured:
        return choose(Evidence(kernel, on_disk), configured)
    owners = tuple(
        Owner(p.label, tuple(p.module_versions())) for p in pacman.owners(root, kernel.lstrip("/"))
    )
    ev = Evidence(
        kernel,
        on_disk,
        owners,
        tuple(v for v in on_disk if (moddirs / v / "pkgbase").is_file()),
    )
    owned = [v for o in owners for v in o.versions if v in on_disk]
    if len(owners) == 1 and len(owned) == 1:
        return choose(ev, None)  # the usual case: no need to read the image
    data = _read_image(image)
    same = tuple(
        v
        for v in on_disk
        for name in ("vmlinuz", "zImage")
        if (moddirs / v / name).is_file()
        and (moddirs / v / name).stat().st_size == len(data)
        and (moddirs / v / name).read_bytes() == data
    )
    return choose(Evidence(kernel, on_disk, owners, ev.pkgbase, image_version(data), same), None)
