"""azure_publish, target gallery, end to end: the real azure-mgmt-compute and
azure-storage-blob clients against the Resource Manager stand-in
(tests/support/arm_standin.py, HTTPS on loopback) and Azurite behind it.

The requests are asserted against Microsoft.Compute's documented REST API: paths,
api-version, bodies (`creationData.createOption: Upload`, `uploadSizeBytes`, grantAccess's
`access`/`fileFormat`, the image definition's identifier and features, the version's
source and target regions), and the order (revoke after the footer, before the version;
delete last). The stand-in keeps the disk states as Azure documents them: a disk in
ActiveUpload is granted again to go on with its upload; revoking before the footer is
refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobClient

from archkernel.azure.publish import arm
from archkernel.errors import UserError
from archkernel.plan import execute
from archkernel.settings import Settings, load
from archkernel.settings.audit import recording, undeclared
from tasks import azure_publish
from tasks.steps import Step
from tests.support import arm_standin
from tests.support import azurite as emulator
from tests.support.publish import random_chunks, verified

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
PREFIX = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-arch/providers/Microsoft.Compute"
DISK = f"{PREFIX}/disks/archlinux-1.0.0-upload"
VERSION = f"{PREFIX}/galleries/archgallery/images/archlinux/versions/1.0.0"


@pytest.fixture
def standin(
    azurite: emulator.Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[arm_standin.StandIn]:
    """The stand-in, trusted by the SDK (REQUESTS_CA_BUNDLE), with a static token."""
    with arm_standin.running(azurite, tmp_path) as running:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(running.ca_file))
        token = arm_standin.StaticToken()
        monkeypatch.setattr(arm, "credential", lambda: token)
        running.token = token  # type: ignore[attr-defined]
        yield running


def settings_for(tmp_path: Path, standin: arm_standin.StandIn, extra: str = "") -> Settings:
    text = f"""
workdir = "{tmp_path / "build"}"
[azure]
generation = 2
[azure.publish]
subscription = "{SUBSCRIPTION}"
resource_group = "rg-arch"
region = "westeurope"
gallery = "archgallery"
image_version = "1.0.0"
target_regions = ["northeurope"]
replica_count = 2
security_type = "TrustedLaunchSupported"
arm_endpoint = "{standin.url}"
{extra}
"""
    (tmp_path / "settings.toml").write_text(text)
    return load(tmp_path / "settings.toml", env={}, cwd=tmp_path).settings


def record_of(tmp_path: Path) -> dict[str, Any]:
    return dict(json.loads((tmp_path / "build/azure/publish.json").read_text()))


def through_disk(tmp_path: Path, standin: arm_standin.StandIn) -> tuple[Settings, list[Step]]:
    """Settings and steps for the VHD in tmp_path/build, run up to the upload disk."""
    settings = settings_for(tmp_path, standin)
    steps = azure_publish.build(settings)
    for step in steps[:2]:
        execute(step.plan(settings))
    return settings, steps


def failed_upload(standin: arm_standin.StandIn, settings: Settings, step: Step) -> None:
    """Run the upload step with every SAS handed out expired: it fails after 5 renewals."""
    standin.sas_seconds.extend([-60] * 6)
    with pytest.raises(UserError, match="after 5 new SAS"):
        execute(step.plan(settings))


def run_all(settings: Settings) -> None:
    """Each step's plan, made and carried out on settings that record what is read: no
    step reads a setting it did not declare (its up-to-date check would miss it)."""
    for step in azure_publish.build(settings):
        seen: set[str] = set()
        execute(step.plan(recording(settings, seen)))
        assert undeclared(seen, [*step.settings, "workdir"]) == [], step.id


def test_gallery_publish_end_to_end(
    standin: arm_standin.StandIn,
    azurite: emulator.Azurite,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    vhd = verified(tmp_path / "build", 64 * MiB, random_chunks({0: MiB, 33 * MiB: 2 * MiB}))
    settings = settings_for(tmp_path, standin)

    run_all(settings)

    calls = [(r.method, r.path) for r in standin.calls()]
    assert calls == [
        ("GET", DISK),
        ("PUT", DISK),
        ("GET", DISK),  # the long-running PUT's final GET
        ("GET", DISK),  # the upload step: finished by a run before this one?
        ("POST", f"{DISK}/beginGetAccess"),
        ("POST", f"{DISK}/endGetAccess"),  # after the footer: the disk is Unattached
        ("GET", f"{PREFIX}/galleries/archgallery"),
        ("PUT", f"{PREFIX}/galleries/archgallery"),
        ("GET", f"{PREFIX}/galleries/archgallery"),
        ("GET", f"{PREFIX}/galleries/archgallery/images/archlinux"),
        ("PUT", f"{PREFIX}/galleries/archgallery/images/archlinux"),
        ("GET", f"{PREFIX}/galleries/archgallery/images/archlinux"),
        ("GET", VERSION),
        ("PUT", VERSION),
        ("GET", VERSION),
        ("DELETE", DISK),
    ]
    assert all(r.api_version for r in standin.calls())
    assert all(r.authorized for r in standin.requests)

    put_disk = standin.calls("PUT", DISK)[0].body
    assert put_disk == {
        "location": "westeurope",
        "tags": {"archkernel-vhd-sha256": hashlib.sha256(vhd.read_bytes()).hexdigest()},
        "sku": {"name": "Standard_LRS"},
        "properties": {
            "osType": "Linux",
            "hyperVGeneration": "V2",
            "creationData": {"createOption": "Upload", "uploadSizeBytes": 64 * MiB + 512},
            "supportedCapabilities": {"diskControllerTypes": "SCSI, NVMe"},
        },
    }
    assert standin.calls("POST", "/beginGetAccess")[0].body == {
        "access": "Write",
        "durationInSeconds": 3600,
        "fileFormat": "VHD",
    }
    image = standin.calls("PUT", "/images/archlinux")[0].body["properties"]
    assert image["identifier"] == {
        "publisher": "archkernel",
        "offer": "archlinux",
        "sku": "rolling",
    }
    assert image["hyperVGeneration"] == "V2" and image["osType"] == "Linux"
    assert image["features"] == [
        {"name": "DiskControllerTypes", "value": "SCSI, NVMe"},
        {"name": "SecurityType", "value": "TrustedLaunchSupported"},
    ]
    version = standin.calls("PUT", VERSION)[0].body["properties"]
    assert version["storageProfile"] == {"osDiskImage": {"source": {"id": DISK}}}
    assert version["publishingProfile"]["targetRegions"] == [
        {"name": "westeurope", "regionalReplicaCount": 2},
        {"name": "northeurope", "regionalReplicaCount": 2},
    ]

    # The disk's data (in Azurite) is the VHD, byte for byte; the disk is gone.
    blob = azurite.blob(arm_standin.DISK_CONTAINER, "archlinux-1.0.0-upload")
    assert blob.download_blob().readall() == vhd.read_bytes()
    assert DISK.lower() not in standin.resources

    record = json.loads((tmp_path / "build/azure/publish.json").read_text())
    assert record["image_version"]["id"] == VERSION
    assert record["disk"]["id"] == DISK
    assert record["upload"]["bytes_sent"] == 3 * MiB + 512
    assert record["disk_deleted"] is True
    out = capsys.readouterr().out
    assert f"--image {VERSION}" in out and "az vm create" in out

    # No SAS or token anywhere we write or log.
    written = " ".join(p.read_text() for p in (tmp_path / "build/azure").glob("publish*.json"))
    for text in (written, caplog.text, out):
        assert "sig=" not in text and "standin-token" not in text


def test_a_failed_upload_is_not_revoked_and_the_next_run_goes_on_with_it(
    standin: arm_standin.StandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    verified(tmp_path / "build", 16 * MiB, random_chunks({0: MiB}))
    settings, steps = through_disk(tmp_path, standin)
    with caplog.at_level(logging.INFO):
        failed_upload(standin, settings, steps[2])  # every SAS it is handed has expired

    # Renewed by granting again, never revoked: revoking would end the upload for good.
    access = [r.path.rsplit("/", 1)[1] for r in standin.calls("POST")]
    assert access == ["beginGetAccess"] * 6
    assert standin.disk_state(DISK) == "ActiveUpload"
    assert "run the step again to go on with the upload" in caplog.text
    assert not (tmp_path / "build/azure/publish-upload.json").exists()

    # The next run is granted a valid SAS, sends the rest, revokes, and goes on.
    standin.requests.clear()
    for step in steps[2:]:
        execute(step.plan(settings))
    access = [r.path.rsplit("/", 1)[1] for r in standin.calls("POST")]
    assert access == ["beginGetAccess", "endGetAccess"]
    assert record_of(tmp_path)["image_version"]


def test_a_run_that_ended_after_its_revoke_is_not_uploaded_again(
    standin: arm_standin.StandIn, tmp_path: Path
) -> None:
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}))
    settings = settings_for(tmp_path, standin)
    steps = azure_publish.build(settings)
    for step in steps[:3]:
        execute(step.plan(settings))
    assert standin.disk_state(DISK) == "Unattached"
    (tmp_path / "build/azure/publish-upload.json").unlink()  # killed before its record
    standin.requests.clear()

    execute(steps[2].plan(settings))

    assert standin.calls("POST") == []  # Azure grants no write access to it any more
    upload = record_of(tmp_path)["upload"]
    assert upload["finished_by_an_earlier_run"] is True and upload["bytes_sent"] == 0
    assert upload["size"] == 8 * MiB + 512  # the VHD's, footer included
    for step in steps[3:]:
        execute(step.plan(settings))
    assert record_of(tmp_path)["image_version"]["id"] == VERSION


@pytest.mark.parametrize("damage", ["footer", "report", "changed"])
def test_a_bad_vhd_is_refused_before_any_request(
    standin: arm_standin.StandIn, tmp_path: Path, damage: str
) -> None:
    vhd = verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}), ok=damage != "report")
    if damage == "footer":
        with open(vhd, "r+b") as f:
            f.seek(8 * MiB)
            f.write(b"notavhd!")
    if damage == "changed":
        with open(vhd, "r+b") as f:
            f.write(b"X")
    settings = settings_for(tmp_path, standin)

    with pytest.raises(UserError) as caught:
        execute(azure_publish.build(settings)[0].plan(settings))

    expected = {"footer": "not a VHD", "report": "failed its checks", "changed": "changed after"}
    assert expected[damage] in str(caught.value)
    assert standin.requests == []
    assert standin.token.scopes == []  # type: ignore[attr-defined]


def test_names_azure_refuses_are_refused_before_any_request(
    standin: arm_standin.StandIn, tmp_path: Path
) -> None:
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}))
    settings = settings_for(tmp_path, standin, 'disk_name = "-bad-"')
    object.__setattr__(settings.azure.publish, "image_version", "1.0")
    with pytest.raises(UserError) as caught:
        execute(azure_publish.build(settings)[0].plan(settings))
    assert "disk_name '-bad-'" in str(caught.value)
    assert "image_version '1.0' is not MAJOR.MINOR.PATCH" in str(caught.value)
    assert standin.requests == []


def test_a_killed_runs_upload_goes_on_through_a_new_grant_and_an_expired_sas_is_renewed(
    standin: arm_standin.StandIn, azurite: emulator.Azurite, tmp_path: Path
) -> None:
    vhd = verified(tmp_path / "build", 16 * MiB, random_chunks({0: 2 * MiB}))
    settings, steps = through_disk(tmp_path, standin)
    # A killed run: access granted, part of the data sent, never revoked.
    compute = arm.compute(settings)
    sas = arm.grant(compute, settings)
    BlobClient.from_blob_url(sas).upload_page(vhd.read_bytes()[:MiB], offset=0, length=MiB)
    assert standin.disk_state(DISK) == "ActiveUpload"
    with pytest.raises(UserError, match="InvalidVhd"):  # Azure's answer before the footer
        arm.revoke(compute, settings)
    assert standin.disk_state(DISK) == "ActiveUpload"
    standin.requests.clear()
    standin.sas_seconds.append(-60)  # the next SAS has expired already

    execute(steps[2].plan(settings))

    access = [r.path.rsplit("/", 1)[1] for r in standin.calls("POST")]
    # Grant (expired), grant again (the renewal), revoke after the footer.
    assert access == ["beginGetAccess", "beginGetAccess", "endGetAccess"]
    upload = record_of(tmp_path)["upload"]
    assert upload["renewals"] == 1 and upload["already"] == MiB  # the killed run's MiB
    blob = azurite.blob(arm_standin.DISK_CONTAINER, "archlinux-1.0.0-upload")
    assert blob.download_blob().readall() == vhd.read_bytes()
    assert standin.disk_state(DISK) == "Unattached"


def test_an_abandoned_upload_disk_is_deleted_and_made_again(
    standin: arm_standin.StandIn, tmp_path: Path
) -> None:
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}, seed=1))
    settings, steps = through_disk(tmp_path, standin)
    failed_upload(standin, settings, steps[2])
    assert standin.disk_state(DISK) == "ActiveUpload"

    # A new build instead: its upload disk must be made anew; the user deletes the old one.
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}, seed=2))
    execute(steps[0].plan(settings))
    with pytest.raises(UserError, match="is not this VHD's upload disk"):
        execute(steps[2].plan(settings))  # step 3 checks the disk's tag itself too
    arm.delete_disk(arm.compute(settings), settings)
    for step in steps[1:]:
        execute(step.plan(settings))
    assert len(standin.calls("PUT", DISK)) == 2
    assert record_of(tmp_path)["image_version"]["id"] == VERSION


def test_an_upload_disk_of_another_vhd_is_not_reused(
    standin: arm_standin.StandIn, tmp_path: Path
) -> None:
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}, seed=1))
    settings, steps = through_disk(tmp_path, standin)
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}, seed=2))  # a new build

    execute(steps[0].plan(settings))
    with pytest.raises(UserError, match="is not this VHD's upload disk"):
        execute(steps[1].plan(settings))
    assert len(standin.calls("PUT", DISK)) == 1


def test_an_upload_disk_deleted_meanwhile_says_how_to_make_it_again(
    standin: arm_standin.StandIn, tmp_path: Path
) -> None:
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}))
    settings, steps = through_disk(tmp_path, standin)
    arm.delete_disk(arm.compute(settings), settings)
    standin.requests.clear()
    with pytest.raises(UserError) as caught:
        execute(steps[2].plan(settings))
    assert "the disk archlinux-1.0.0-upload is gone, not ready for an upload" in str(caught.value)
    assert caught.value.hint and "archkernel run azure_publish --from 2" in caught.value.hint
    assert standin.calls("POST") == []  # nothing granted
