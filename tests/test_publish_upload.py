"""The upload engine (archkernel.azure.publish.upload) against a real Azurite.

The VHDs are sparse files with data at known offsets; what the engine sent is judged by
reading the page blob back with the SDK and asking Azurite for its page ranges.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from archkernel.azure.publish import upload
from archkernel.errors import UserError
from tests.support import azurite as emulator
from tests.support.publish import make_vhd, random_chunks

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def merged(client: Any) -> list[tuple[int, int]]:
    """The blob's written ranges as [start, end), adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for r in client.list_page_ranges():
        if r.cleared:
            continue
        if out and out[-1][1] == r.start:
            out[-1] = (out[-1][0], r.end + 1)
        else:
            out.append((r.start, r.end + 1))
    return out


def sas_access(az: emulator.Azurite, name: str, *, seconds: list[float] | None = None) -> Any:
    """Access through SAS URLs whose lifetimes are `seconds` in turn (then an hour)."""
    from azure.storage.blob import BlobClient

    lifetimes = list(seconds or [])
    urls = [az.sas_url("vhds", name, seconds=lifetimes.pop(0) if lifetimes else 3600)]

    def renew() -> None:
        urls.append(az.sas_url("vhds", name, seconds=lifetimes.pop(0) if lifetimes else 3600))

    access = upload.Access(
        connect=lambda: BlobClient.from_blob_url(urls[-1], **upload.CLIENT_OPTIONS),
        name=f"blob {name}",
        renew=renew,
    )
    return access, urls


def test_only_the_data_is_sent_and_the_blob_equals_the_vhd(
    azurite: emulator.Azurite, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    azurite.container("vhds")
    chunks = random_chunks({0: MiB, 10 * MiB: 4096, 30 * MiB: 4 * MiB})
    chunks[40 * MiB] = bytes(4 * MiB)  # allocated, but all zero: not sent
    vhd = make_vhd(tmp_path / "disk.vhd", 64 * MiB, chunks)
    access, _ = sas_access(azurite, "data.vhd")

    sent = upload.upload(vhd, access, create=True, workers=4)

    blob = azurite.blob("vhds", "data.vhd")
    assert blob.download_blob().readall() == vhd.read_bytes()
    footer = (64 * MiB, 64 * MiB + 512)
    assert merged(blob) == [(0, MiB), (10 * MiB, 10 * MiB + 4096), (30 * MiB, 34 * MiB), footer]
    assert sent.bytes_sent == MiB + 4096 + 4 * MiB + 512
    assert sent.zero_skipped == 4 * MiB
    assert sent.already == 0 and sent.renewals == 0
    assert "sig=" not in caplog.text  # no SAS in what was logged


def test_an_expired_sas_is_renewed(azurite: emulator.Azurite, tmp_path: Path) -> None:
    azurite.container("vhds")
    vhd = make_vhd(tmp_path / "disk.vhd", 16 * MiB, random_chunks({MiB: 2 * MiB}))
    access, _ = sas_access(azurite, "renew.vhd", seconds=[-60])

    sent = upload.upload(vhd, access, create=True)

    assert sent.renewals == 1
    assert azurite.blob("vhds", "renew.vhd").download_blob().readall() == vhd.read_bytes()


def test_an_expired_sas_that_cannot_be_renewed_is_a_user_error(
    azurite: emulator.Azurite, tmp_path: Path
) -> None:
    from azure.storage.blob import BlobClient

    azurite.container("vhds")
    vhd = make_vhd(tmp_path / "disk.vhd", 8 * MiB, random_chunks({0: MiB}))
    url = azurite.sas_url("vhds", "stale.vhd", seconds=-60)
    access = upload.Access(connect=lambda: BlobClient.from_blob_url(url), name="blob stale.vhd")
    with pytest.raises(UserError) as caught:
        upload.upload(vhd, access, create=True)
    assert "403" in str(caught.value) and "expired" in str(caught.value)
    assert url.split("sig=")[1].split("&")[0] not in str(caught.value)


def test_throttling_is_retried_with_back_off(azurite: emulator.Azurite, tmp_path: Path) -> None:
    from azure.storage.blob import BlobClient

    azurite.container("vhds")
    vhd = make_vhd(tmp_path / "disk.vhd", 16 * MiB, random_chunks({0: 4 * MiB, 8 * MiB: MiB}))
    answers = [(503, {}), (429, {"Retry-After": "0"}), (503, {})]

    def fault(method: str, path: str) -> tuple[int, dict[str, str]] | None:
        if method == "PUT" and "comp=page" in path and answers:
            return answers.pop(0)
        return None

    with emulator.faulty(azurite, fault) as proxy:
        port = proxy.server_address[1]
        url = azurite.sas_url("vhds", "busy.vhd").replace(f":{azurite.port}/", f":{port}/")
        access = upload.Access(
            connect=lambda: BlobClient.from_blob_url(url, **upload.CLIENT_OPTIONS),
            name="blob busy.vhd",
        )
        start = time.monotonic()
        sent = upload.upload(vhd, access, create=True, workers=1, backoff=upload.Backoff(first=0.2))
        elapsed = time.monotonic() - start

    assert [status for _, _, status in proxy.injected] == [503, 429, 503]
    assert sent.retries == 3
    # Back-offs of 0.2 s (try 1), 0 s (the 429 said Retry-After: 0), 0.8 s (try 3).
    assert elapsed >= 0.2 + 0.8 - 0.05
    assert azurite.blob("vhds", "busy.vhd").download_blob().readall() == vhd.read_bytes()


def test_throttling_without_end_is_a_user_error(azurite: emulator.Azurite, tmp_path: Path) -> None:
    from azure.storage.blob import BlobClient

    azurite.container("vhds")
    vhd = make_vhd(tmp_path / "disk.vhd", 8 * MiB, random_chunks({0: MiB}))

    def fault(method: str, path: str) -> tuple[int, dict[str, str]] | None:
        return (503, {}) if method == "PUT" and "comp=page" in path else None

    with emulator.faulty(azurite, fault) as proxy:
        port = proxy.server_address[1]
        url = azurite.sas_url("vhds", "down.vhd").replace(f":{azurite.port}/", f":{port}/")
        access = upload.Access(
            connect=lambda: BlobClient.from_blob_url(url, **upload.CLIENT_OPTIONS),
            name="blob down.vhd",
        )
        with pytest.raises(UserError) as caught:
            upload.upload(vhd, access, create=True, backoff=upload.Backoff(tries=3, first=0.01))
    assert "failed 3 times" in str(caught.value)


def test_a_blob_of_another_vhd_is_not_resumed_into(
    azurite: emulator.Azurite, tmp_path: Path
) -> None:
    azurite.container("vhds")
    first = make_vhd(tmp_path / "a.vhd", 8 * MiB, random_chunks({0: MiB}, seed=1))
    second = make_vhd(tmp_path / "b.vhd", 8 * MiB, random_chunks({MiB: MiB}, seed=2))
    access, _ = sas_access(azurite, "shared.vhd")
    upload.upload(first, access, create=True, identity="a" * 64)

    with pytest.raises(UserError, match="holds another VHD's upload"):
        upload.upload(second, access, create=True, identity="b" * 64)
    again = upload.upload(first, access, create=True, identity="a" * 64)

    assert again.bytes_sent == 512  # only the footer: the blob held the rest
    blob = azurite.blob("vhds", "shared.vhd")
    assert blob.download_blob().readall() == first.read_bytes()


UPLOADER = """
import sys
from azure.storage.blob import BlobClient
from archkernel.azure.publish import upload
url, vhd = sys.argv[1], sys.argv[2]
access = upload.Access(connect=lambda: BlobClient.from_blob_url(url, **upload.CLIENT_OPTIONS),
                       name="blob")
upload.upload(vhd, access, create=False, workers=2)
"""


def test_a_killed_upload_resumes_with_only_what_is_missing(
    azurite: emulator.Azurite, tmp_path: Path
) -> None:
    azurite.container("vhds")
    size = 512 * MiB
    layout = {n * 8 * MiB: 4 * MiB for n in range(size // (8 * MiB))}  # 256 MiB of data
    vhd = make_vhd(tmp_path / "disk.vhd", size, random_chunks(layout))
    blob = azurite.blob("vhds", "killed.vhd")
    blob.create_page_blob(size + 512)
    url = azurite.sas_url("vhds", "killed.vhd")

    child = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, url, str(vhd)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 300
        while child.poll() is None:
            if sum(e - s for s, e in merged(blob)) >= 40 * MiB:
                break
            assert time.monotonic() < deadline, "40 MiB never arrived within 300 s"
            time.sleep(0.02)
        assert child.poll() is None, "the upload ended before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()

    # A page whose body had fully arrived is still written after the client dies: wait
    # until the service's ranges have not changed for 2 s before counting them.
    held, unchanged, deadline = merged(blob), 0, time.monotonic() + 120
    while unchanged < 10:
        assert time.monotonic() < deadline, "Azurite's page ranges never settled"
        time.sleep(0.2)
        again = merged(blob)
        unchanged = unchanged + 1 if again == held else 0
        held = again
    held_bytes = sum(e - s for s, e in held)
    assert 40 * MiB <= held_bytes < 256 * MiB
    assert held[-1][1] <= size, "the footer was written before the data"

    access, _ = sas_access(azurite, "killed.vhd")
    sent = upload.upload(vhd, access)

    assert sent.already == held_bytes
    assert sent.bytes_sent == 256 * MiB + 512 - held_bytes
    assert blob.download_blob().readall() == vhd.read_bytes()


def test_a_connection_string_that_may_not_write_names_it_in_the_hint(
    azurite: emulator.Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from archkernel.azure.publish import steps
    from archkernel.settings import Secret, Settings
    from archkernel.settings.schema import AzurePublishSettings, AzureSettings

    azurite.container("vhds")
    vhd = make_vhd(tmp_path / "disk.vhd", 8 * MiB, random_chunks({0: MiB}))
    other_key = base64.b64encode(b"not the account's key" * 3).decode()
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING",
        azurite.connection_string.replace(emulator.KEY, other_key),
    )
    url = Secret(f"{azurite.endpoint}/vhds/denied.vhd")
    settings = Settings(
        azure=AzureSettings(publish=AzurePublishSettings(target="blob", blob_url=url))
    )

    with pytest.raises(UserError) as caught:
        upload.upload(vhd, steps.blob_access(settings), create=True)

    assert "refused the request (403)" in caught.value.message
    assert caught.value.hint and "AZURE_STORAGE_CONNECTION_STRING" in caught.value.hint
    assert "blob_url expired" not in caught.value.hint  # no SAS was given
    assert other_key not in str(caught.value)


def test_a_sas_that_may_not_read_says_the_upload_needs_read(
    azurite: emulator.Azurite, tmp_path: Path
) -> None:
    import datetime

    from azure.storage.blob import BlobClient, BlobSasPermissions, generate_blob_sas

    azurite.container("vhds")
    vhd = make_vhd(tmp_path / "disk.vhd", 8 * MiB, random_chunks({0: MiB}))
    # What `az storage blob generate-sas --permissions cw` gives: enough for a dense upload.
    token = generate_blob_sas(
        emulator.ACCOUNT,
        "vhds",
        "writeonly.vhd",
        account_key=emulator.KEY,
        permission=BlobSasPermissions(create=True, write=True),
        expiry=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
    )
    url = f"{azurite.endpoint}/vhds/writeonly.vhd?{token}"
    access = upload.Access(connect=lambda: BlobClient.from_blob_url(url), name="blob writeonly.vhd")

    with pytest.raises(UserError) as caught:
        upload.upload(vhd, access, create=True)

    assert "refused the request (403)" in caught.value.message
    assert caught.value.hint and "sp=rcw" in caught.value.hint
    assert token.split("sig=")[1].split("&")[0] not in str(caught.value)
