"""zstd decompression in memory: through libarchive, and through the zstd command without it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from archkernel.errors import UserError
from archkernel.host import decompress

# A zstd frame holding a tiny ELF object (the fixture of test_kmod).
ELF = b"\x7fELF tiny module"
ZSTD_ELF = bytes.fromhex("28b52ffd04588100007f454c462074696e79206d6f64756c65db2aa9a1")


def test_zstd_decompress() -> None:
    assert decompress.zstd_decompress(ZSTD_ELF) == ELF


def test_zstd_decompress_refuses_truncated_data() -> None:
    with pytest.raises(decompress.CorruptData):
        decompress.zstd_decompress(ZSTD_ELF[:-6])


@pytest.mark.integration
def test_zstd_decompress_falls_back_to_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import libarchive

    def no_zstd(*args: object, **kwargs: object) -> None:
        raise ValueError("the read filter 'zstd' is not available")

    monkeypatch.setattr(libarchive, "memory_reader", no_zstd)
    if shutil.which("zstd") is None:
        pytest.skip("needs the zstd command")
    assert decompress.zstd_decompress(ZSTD_ELF) == ELF
    with pytest.raises(decompress.CorruptData):
        decompress.zstd_decompress(ZSTD_ELF[:-6])


# A module that expands far past any real one: 8 MiB of ELF, made by the real compressors.
BOMB = b"\x7fELF" + bytes(8 * 1024 * 1024 - 4)
LIMIT = 1024 * 1024


def _compressed(tool: list[str], data: bytes) -> bytes:
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout


@pytest.mark.integration
@pytest.mark.parametrize(
    ("suffix", "tool"),
    [(".ko.gz", ["gzip", "-c"]), (".ko.xz", ["xz", "-c"]), (".ko.zst", ["zstd", "-c"])],
)
def test_a_module_that_expands_past_the_limit_is_refused(suffix: str, tool: list[str]) -> None:
    bomb = _compressed(tool, BOMB)
    assert len(bomb) < 64 * 1024  # a small file...
    with pytest.raises(UserError, match="not a plausible kernel module") as info:
        decompress.decompress_module(bomb, f"kernel/x{suffix}", limit=LIMIT)
    assert "more than 1048576 bytes" in info.value.message
    # ... that is fine under a limit it fits.
    whole = decompress.decompress_module(bomb, f"kernel/x{suffix}", limit=len(BOMB))
    assert whole == BOMB


@pytest.mark.integration
@pytest.mark.parametrize(("suffix", "tool"), [(".ko.gz", ["gzip", "-c"]), (".ko.xz", ["xz", "-c"])])
def test_a_module_cut_short_is_corrupt_not_accepted(suffix: str, tool: list[str]) -> None:
    cut = _compressed(tool, BOMB)[:-16]
    with pytest.raises(UserError, match="cannot decompress"):
        decompress.decompress_module(cut, f"kernel/x{suffix}", limit=len(BOMB))


@pytest.mark.integration
def test_the_zstd_command_output_is_held_to_the_limit_too(monkeypatch: pytest.MonkeyPatch) -> None:
    import libarchive

    def no_zstd(*args: object, **kwargs: object) -> None:
        raise ValueError("the read filter 'zstd' is not available")

    monkeypatch.setattr(libarchive, "memory_reader", no_zstd)
    with pytest.raises(decompress.TooLarge):
        decompress.zstd_decompress(_compressed(["zstd", "-c"], BOMB), LIMIT)
