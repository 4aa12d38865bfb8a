"""Compressed data decompressed in memory: kernel modules, and zstd data in general.

Python's standard library reads gzip and xz but not zstd. libarchive usually can; where
it is missing or built without zstd, the `zstd` command (through `run()`) does it: that
is why this lives with the host helpers and not in `formats`.
"""

from __future__ import annotations

import lzma
import tempfile
import zlib

from archkernel.errors import UserError
from archkernel.formats.compression import GZIP_MAGIC, XZ_MAGIC, ZSTD_MAGIC
from archkernel.formats.kmod import ELF_MAGIC, MODULE_SUFFIXES
from archkernel.host.run import run


class CorruptData(Exception):
    """Decompression failed; the text says why."""


class TooLarge(CorruptData):
    """The data expands past the limit it was given."""


def zstd_decompress(data: bytes, limit: int | None = None) -> bytes:
    """Decompress zstd data: libarchive's raw reader, else the zstd command.

    Raises CorruptData when the data is damaged or cut short, TooLarge when it expands
    past `limit` bytes (libarchive stops there; the command's output is checked after).
    """
    try:
        import libarchive  # lazily: most callers never need it
        from libarchive.exception import ArchiveError
    except (ImportError, OSError):  # OSError: the libarchive C library is missing
        return _zstd_command(data, limit)
    blocks: list[bytes] = []
    size = 0
    try:
        with libarchive.memory_reader(data, format_name="raw", filter_name="zstd") as archive:
            for entry in archive:
                for block in entry.get_blocks():
                    size += len(block)
                    _check_size(size, limit)
                    blocks.append(bytes(block))
    except ValueError:  # this libarchive was built without zstd
        return _zstd_command(data, limit)
    except ArchiveError as exc:
        raise CorruptData(str(exc).split(" (errno=")[0]) from exc
    return b"".join(blocks)


def _check_size(size: int, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise TooLarge(f"it expands to more than {limit} bytes")


def _zstd_command(data: bytes, limit: int | None) -> bytes:
    with tempfile.TemporaryFile() as out:
        proc = run(["zstd", "-dc"], check=False, stdin=data, stdout_file=out.fileno())
        if proc.returncode != 0:
            raise CorruptData(proc.stderr.strip().splitlines()[-1] if proc.stderr else "")
        _check_size(out.seek(0, 2), limit)
        out.seek(0)
        return out.read()


def _bounded_gzip(data: bytes, limit: int) -> bytes:
    inflate = zlib.decompressobj(wbits=31)  # gzip header and trailer
    out = inflate.decompress(data, limit + 1)
    _check_size(len(out), limit)
    if not inflate.eof:
        raise CorruptData("the gzip data is cut short")
    return out


def _bounded_xz(data: bytes, limit: int) -> bytes:
    unxz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out = unxz.decompress(data, max_length=limit + 1)
    _check_size(len(out), limit)
    if not unxz.eof:
        raise CorruptData("the xz data is cut short")
    return out


# suffix -> (format name, magic bytes)
_MODULE_COMPRESSION = {
    ".ko.gz": ("gzip", GZIP_MAGIC),
    ".ko.xz": ("xz", XZ_MAGIC),
    ".ko.zst": ("zstd", ZSTD_MAGIC),
}


# The largest module of a distribution kernel is tens of MiB uncompressed (a GPU driver).
MAX_MODULE_SIZE = 256 * 1024 * 1024


def decompress_module(data: bytes, relpath: str, limit: int = MAX_MODULE_SIZE) -> bytes:
    """The uncompressed ELF object of module file `relpath` whose content is `data`.

    The compression is chosen by suffix (.ko, .ko.gz, .ko.xz, .ko.zst) and must match
    the data's magic bytes; the result must be an ELF object of at most `limit` bytes
    (a module that expands past it is refused before it is all in memory). busybox insmod
    needs this as it may not read compressed modules.
    """
    suffix = next((s for s in _MODULE_COMPRESSION if relpath.endswith(s)), None)
    if suffix is None:
        if not relpath.endswith(".ko"):
            raise UserError(
                f"{relpath} is not a kernel module file name",
                f"module files end in {', '.join(MODULE_SUFFIXES)}",
            )
        result = data
    else:
        kind, magic = _MODULE_COMPRESSION[suffix]
        if not data.startswith(magic):
            raise UserError(
                f"{relpath} is not {kind}-compressed (it starts with {data[:6].hex(' ')})",
                "the module file is corrupt or misnamed: reinstall the kernel package",
            )
        try:
            if kind == "gzip":
                result = _bounded_gzip(data, limit)
            elif kind == "xz":
                result = _bounded_xz(data, limit)
            else:
                result = zstd_decompress(data, limit)
        except TooLarge as exc:
            raise UserError(
                f"{relpath} is not a plausible kernel module: {exc}",
                "the module file is corrupt or hostile: reinstall the kernel package",
            ) from exc
        except (OSError, EOFError, zlib.error, lzma.LZMAError, CorruptData) as exc:
            raise UserError(
                f"cannot decompress {relpath} ({kind}): {exc or 'corrupt data'}",
                "the module file is corrupt: reinstall the kernel package",
            ) from exc
    if not result.startswith(ELF_MAGIC):
        raise UserError(
            f"{relpath} is not an ELF kernel module (it starts with {result[:4].hex(' ')})",
            "the module file is corrupt: reinstall the kernel package",
        )
    return result
