"""archkernel.azure.publish.extents: which ranges an upload sends (pure)."""

from __future__ import annotations

import pytest

from archkernel.azure.publish import extents
from archkernel.azure.publish.secrets import public_url, redact

MiB = 1024 * 1024


def test_pages_widen_to_512_and_merge() -> None:
    assert extents.to_pages([(1, 2), (511, 513), (2048, 2049)], 4096) == [(0, 1024), (2048, 2560)]


def test_pages_clip_to_the_size() -> None:
    assert extents.to_pages([(3000, 5000)], 4096) == [(2560, 4096)]


def test_size_must_be_whole_pages() -> None:
    with pytest.raises(ValueError):
        extents.to_pages([], 1000)


def test_subtract_leaves_what_is_not_taken() -> None:
    assert extents.subtract([(0, 100), (200, 300)], [(50, 250)]) == [(0, 50), (250, 300)]
    assert extents.subtract([(0, 100)], [(0, 100)]) == []
    assert extents.subtract([(0, 100)], []) == [(0, 100)]
    assert extents.subtract([(0, 100)], [(10, 20), (30, 40)]) == [(0, 10), (20, 30), (40, 100)]


def test_split_cuts_on_the_4_mib_grid() -> None:
    assert extents.split([(3 * MiB, 9 * MiB)]) == [
        (3 * MiB, 4 * MiB),
        (4 * MiB, 8 * MiB),
        (8 * MiB, 9 * MiB),
    ]


def test_to_send_sends_the_footer_last_even_when_written() -> None:
    size = 64 * MiB + 512
    data = [(0, 6 * MiB), (64 * MiB, size)]
    plan = extents.to_send(data, [(0, 4 * MiB), (64 * MiB, size)], size)
    assert plan == [(4 * MiB, 6 * MiB), (64 * MiB, size)]


def test_to_send_of_an_empty_disk_is_the_footer() -> None:
    assert extents.to_send([], [], 8 * MiB + 512) == [(8 * MiB, 8 * MiB + 512)]


def test_every_write_is_aligned_and_at_most_4_mib() -> None:
    size = 100 * MiB + 512
    plan = extents.to_send([(123, 37 * MiB + 5), (50 * MiB + 7, 51 * MiB)], [(MiB, 2 * MiB)], size)
    for start, end in plan:
        assert start % 512 == 0 and end % 512 == 0
        assert 0 < end - start <= 4 * MiB
    # [0, 37 MiB + 512) less the written MiB, the MiB at 50 MiB, the footer.
    assert extents.total(plan) == (37 * MiB + 512 - MiB) + MiB + 512


def test_redact_removes_sas_and_keys() -> None:
    url = "https://acct.blob.core.windows.net/c/disk.vhd?sv=2024-01-01&se=2030&sp=rw&sig=SECRETSIG"
    text = redact(f"failed: {url} AccountKey=SECRETKEY; Bearer eyJSECRETTOKEN")
    for secret in ("SECRETSIG", "SECRETKEY", "eyJSECRETTOKEN"):
        assert secret not in text
    assert "acct.blob.core.windows.net/c/disk.vhd" in text
    assert public_url(url) == "https://acct.blob.core.windows.net/c/disk.vhd"


def test_progress_says_bytes_rate_and_time_left() -> None:
    import io

    from archkernel.azure.publish.upload import Progress

    bar = Progress(100 * MiB, stream=io.StringIO())
    bar.start -= 10  # ten seconds ago
    bar.done = 25 * MiB
    line = bar.line()
    assert line.startswith("upload: 25.0 of 100.0 MiB (25%), ")
    rate, left = line.split(", ")[1:3]
    assert 2.4 <= float(rate.split()[0]) <= 2.5  # MiB/s
    assert 29 <= float(left.split()[0]) <= 31  # seconds left
