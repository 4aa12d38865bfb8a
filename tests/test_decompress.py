"""zstd decompression in memory: through libarchive, and through the zstd command without it."""

from __future__ import annotations

import shutil

import pytest

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
