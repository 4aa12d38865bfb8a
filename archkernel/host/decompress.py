"""zstd data decompressed in memory: libarchive's raw reader, else the `zstd` command.

Python's standard library reads gzip and xz but not zstd. libarchive usually can; where
it is missing or built without zstd, the `zstd` command (through `run()`) does it.
"""

from __future__ import annotations

import tempfile

from archkernel.host.run import run


class CorruptData(Exception):
    """Decompression failed; the text says why."""


def zstd_decompress(data: bytes) -> bytes:
    """Decompress zstd data: libarchive's raw reader, else the zstd command.

    Raises CorruptData when the data is damaged or cut short.
    """
    try:
        import libarchive  # lazily: most callers never need it
        from libarchive.exception import ArchiveError
    except (ImportError, OSError):  # OSError: the libarchive C library is missing
        return _zstd_command(data)
    blocks: list[bytes] = []
    try:
        with libarchive.memory_reader(data, format_name="raw", filter_name="zstd") as archive:
            for entry in archive:
                blocks.extend(bytes(block) for block in entry.get_blocks())
    except ValueError:  # this libarchive was built without zstd
        return _zstd_command(data)
    except ArchiveError as exc:
        raise CorruptData(str(exc).split(" (errno=")[0]) from exc
    return b"".join(blocks)


def _zstd_command(data: bytes) -> bytes:
    with tempfile.TemporaryFile() as out:
        proc = run(["zstd", "-dc"], check=False, stdin=data, stdout_file=out.fileno())
        if proc.returncode != 0:
            raise CorruptData(proc.stderr.strip().splitlines()[-1] if proc.stderr else "")
        out.seek(0)
        return out.read()
