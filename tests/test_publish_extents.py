"""archkernel.azure.publish.extents: which ranges an upload sends (pure)."""

from __future__ import annotations

from pathlib import Path

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
    with_user = "https://user:PASSWORD@acct.blob.core.windows.net:443/c/disk.vhd?sig=S#f"
    assert public_url(with_user) == "https://acct.blob.core.windows.net:443/c/disk.vhd"


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


# A blob URL with no host: the SDK's ValueError quotes it whole, SAS included.
HOSTLESS = "https:///images/arch.vhd?sv=2024-01-01&sp=rw&sig=HOSTLESSSECRET"


def test_a_blob_url_without_a_host_is_refused_by_step_1() -> None:
    from archkernel.azure.publish import check
    from archkernel.settings import Secret, Settings
    from archkernel.settings.schema import AzurePublishSettings, AzureSettings

    pub = AzurePublishSettings(target="blob", blob_url=Secret(HOSTLESS))
    problems = check.blob_problems(Settings(azure=AzureSettings(publish=pub)))
    assert len(problems) == 1 and "https:///images/arch.vhd'" in problems[0]
    assert "HOSTLESSSECRET" not in problems[0]


def test_a_url_the_sdk_refuses_is_a_user_error_without_its_sas(tmp_path: Path) -> None:
    from azure.storage.blob import BlobClient

    from archkernel.azure.publish import upload
    from archkernel.errors import UserError

    vhd = tmp_path / "disk.vhd"
    vhd.write_bytes(bytes(4096))
    access = upload.Access(
        connect=lambda: BlobClient.from_blob_url(HOSTLESS), name="https:///images/arch.vhd"
    )
    with pytest.raises(UserError) as caught:
        upload.upload(vhd, access, create=True)
    assert "HOSTLESSSECRET" not in str(caught.value)
    assert "Invalid URL" in str(caught.value)


def test_an_unreachable_resource_manager_is_a_user_error() -> None:
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    from archkernel.azure.publish import arm
    from archkernel.errors import UserError

    for error in (ServiceRequestError, ServiceResponseError):

        def fail(error: type[Exception] = error) -> None:
            raise error("Connection refused: /subscriptions/s/disks/d?api-version=2024-03-02")

        with pytest.raises(UserError) as caught:
            arm.call("reading the disk d", fail)
        assert str(caught.value).startswith("reading the disk d failed: Resource Manager ")
        assert caught.value.hint and "arm_endpoint" in caught.value.hint


def test_credentials_that_give_no_token_are_named_with_the_login_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from azure.identity import EnvironmentCredential
    from azure.mgmt.compute import ComputeManagementClient

    from archkernel.azure.publish import arm
    from archkernel.errors import UserError

    # The SDK's own credential with nothing to go on: as a token that can no longer be
    # renewed mid-publish, it raises before any request leaves.
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    client = ComputeManagementClient(EnvironmentCredential(), "sub", base_url="https://127.0.0.1:9")
    with pytest.raises(UserError) as caught:
        arm.call("reading the disk d", lambda: client.disks.get("rg", "d"))
    said = str(caught.value)
    assert said.startswith("reading the disk d failed: the Azure credentials gave no token: ")
    assert "HTTP None" not in said
    assert caught.value.hint and "az login" in caught.value.hint
