"""The steps of azure_publish (the order is in tasks/azure_publish.py).

Target "gallery": 1 check, 2 disk (the managed disk to upload into), 3 upload (grant a
write SAS, upload, then revoke; a failed upload leaves the disk in ActiveUpload, which the
next run goes on with through a new grant), 4 gallery (gallery, image
definition, image version), 5 cleanup (delete the upload disk; print the version's ID and
an `az vm create` line). Target "blob": 1 check, 2 upload (to the page blob at
azure.publish.blob_url).

Each step records what it made in `workdir/azure/publish.json` (IDs, the blob's URL
without its SAS, bytes sent, seconds) and writes its own stamp, the next step's input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archkernel.azure import workspace
from archkernel.azure.publish import arm, check, gallery, upload
from archkernel.azure.publish.secrets import public_url, sdk
from archkernel.errors import UserError
from archkernel.host.files import write_if_changed, write_text
from archkernel.log import log
from archkernel.plan import Plan, reads
from archkernel.settings import Settings


def _keys(*names: str) -> tuple[str, ...]:
    return tuple(f"azure.publish.{name}" for name in names)


# What each step reads, so that a changed setting re-runs only the steps it concerns (a
# new keep_disk does not upload again). Resource Manager calls read the subscription and
# endpoint; the upload disk's name is made of its setting, the definition and the version.
ARM = _keys("subscription", "arm_endpoint", "resource_group")
DISK_NAME = _keys("disk_name", "image_definition", "image_version")
CHECK_SETTINGS = ("azure.publish", "azure.output", "azure.generation")
DISK_SETTINGS = (
    *ARM,
    *DISK_NAME,
    *_keys("region", "disk_controller_types", "security_type"),
    "azure.generation",
)
UPLOAD_SETTINGS = (
    *ARM,
    *DISK_NAME,
    *_keys("target", "blob_url", "parallel", "access_seconds"),
    "azure.output",
)
IMAGE_STEP_SETTINGS = (
    *ARM,
    *_keys("region", "gallery", "image_definition", "image_version", "publisher", "offer"),
    *_keys("sku", "target_regions", "replica_count", "disk_controller_types", "security_type"),
    "azure.generation",
)
CLEANUP_SETTINGS = (*ARM, *DISK_NAME, *_keys("keep_disk", "security_type"), "azure.generation")


@dataclass(frozen=True)
class PublishPaths:
    """azure_publish's files, beside the azure_vhd work files in `workdir/azure`."""

    work: Path

    @property
    def record(self) -> Path:
        return self.work / "publish.json"

    def stamp(self, step: str) -> Path:
        return self.work / f"publish-{step}.json"


def paths(settings: Settings) -> PublishPaths:
    return PublishPaths(settings.workdir.resolve() / "azure")


def record(settings: Settings, key: str, value: Any) -> None:
    """Add `key` to publish.json (what was made); never a secret."""
    path = paths(settings).record
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[key] = value
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def stamp(settings: Settings, step: str, value: Any) -> None:
    write_if_changed(
        paths(settings).stamp(step), (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    )


def _verified(settings: Settings) -> dict[str, Any]:
    return dict(json.loads(paths(settings).stamp("check").read_text())["vhd"])


# --- step 1 ---------------------------------------------------------------------------------


@reads(*CHECK_SETTINGS)
def check_vhd(settings: Settings) -> Plan:
    """check the VHD, its verify report and sha256, the target's names and credentials

    Refuses a VHD that fails `vhd check`, that step 9 did not pass, or that changed since;
    then settings Azure would refuse; then credentials that do not resolve. Nothing is
    sent to Azure before the first three passed.
    """
    p, w = paths(settings), workspace.paths(settings)
    pub = settings.azure.publish

    def run() -> None:
        verified = check.verified_vhd(w.vhd, w.report, w.manifest)
        check.raise_on_problems(check.target_problems(settings))
        if pub.target == "gallery":
            arm.resolve_credentials(settings, [arm.scope(settings)])
        else:
            blob_credentials(settings)  # raises when none resolve
        stamp(settings, "check", {"target": pub.target, "vhd": verified.to_json()})
        record(settings, "vhd", verified.to_json())
        record(settings, "target", pub.target)

    return Plan().do(
        f"check {w.vhd} (vhd check, {w.report.name} green, sha256 as in {w.manifest.name}), "
        f"the [azure.publish] settings and the credentials; write {p.stamp('check').name}",
        run,
    )


# --- the blob target ------------------------------------------------------------------------


def blob_credentials(settings: Settings) -> Any:
    """What the BlobClient authenticates with: None (a SAS in the URL), a connection
    string (`str`), or a token credential."""
    url = settings.azure.publish.blob_url
    assert url is not None  # step 1 checked it
    if check.has_sas(url.get_secret_value()):
        return None
    if os.environ.get(check.ENV_CONNECTION):
        return os.environ[check.ENV_CONNECTION]
    arm.resolve_credentials(settings, [arm.STORAGE_SCOPE])
    return arm.credential()


def blob_access(settings: Settings) -> upload.Access:
    """The page blob of the blob target: created by the upload when missing."""
    blob = sdk("azure.storage.blob")
    url = settings.azure.publish.blob_url
    assert url is not None
    secret = url.get_secret_value()
    found = blob_credentials(settings)

    def connect() -> Any:
        if isinstance(found, str):
            named = blob.BlobClient.from_blob_url(public_url(secret))
            return blob.BlobClient.from_connection_string(
                found, named.container_name, named.blob_name, **upload.CLIENT_OPTIONS
            )
        return blob.BlobClient.from_blob_url(secret, credential=found, **upload.CLIENT_OPTIONS)

    access = upload.Access(connect=connect, name=public_url(secret))
    if isinstance(found, str):
        access.refused = (
            f"the account key or SAS in {check.ENV_CONNECTION} does not allow writing this "
            "blob: give one that does, or a SAS in azure.publish.blob_url"
        )
    elif found is not None:
        access.refused = (
            "the identity you logged in as may not write this blob: it needs the Storage Blob "
            "Data Contributor role on the container (or give a SAS in azure.publish.blob_url)"
        )
    return access


def _progress(total: int) -> upload.Progress:
    return upload.Progress(total)


def _upload(settings: Settings, access: upload.Access, create: bool) -> dict[str, Any]:
    """Upload; a blob we create is marked with the VHD's sha256 (the disk has its tag).
    What was sent."""
    vhd = workspace.paths(settings).vhd
    sent = upload.upload(
        vhd,
        access,
        create=create,
        identity=_verified(settings)["sha256"] if create else None,
        workers=settings.azure.publish.parallel,
        progress=_progress,
    )
    log.info(
        "uploaded %s to %s: %d of %d data bytes sent (%d held already), %.1f s",
        vhd.name, access.name, sent.bytes_sent, sent.data_bytes, sent.already, sent.seconds,
    )  # fmt: skip
    return sent.to_json()


def _record_upload(settings: Settings, destination: str, result: dict[str, Any]) -> None:
    record(settings, "upload", {"destination": destination, **result})
    stamp(settings, "upload", {"destination": destination, "vhd": _verified(settings)})


# --- the gallery target ---------------------------------------------------------------------


@reads(*DISK_SETTINGS)
def disk(settings: Settings) -> Plan:
    """create the managed disk to upload into (createOption Upload)"""
    name = gallery.disk_name(settings)

    def run() -> None:
        size, sha256 = _verified(settings)["size"], _verified(settings)["sha256"]
        disk_id = arm.create_disk(arm.compute(settings), settings, size, sha256)
        record(settings, "disk", {"id": disk_id, "upload_size_bytes": size})
        stamp(settings, "disk", {"id": disk_id, "vhd": _verified(settings)})

    return Plan().do(
        f"create the managed disk {name} for upload in {settings.azure.publish.resource_group} "
        f"({settings.azure.publish.region}), its size the VHD's with the footer",
        run,
    )


def disk_access(settings: Settings, client: Any) -> upload.Access:
    """The upload disk through a SAS from grantAccess. An expired SAS is renewed by
    granting again: a disk in ActiveUpload is granted a new SAS to go on with its upload
    (Microsoft's direct-upload page, 2019), while revoking ends the upload for good (or is
    refused without the footer)."""
    sas = [arm.grant(client, settings)]
    blob = sdk("azure.storage.blob")
    return upload.Access(
        connect=lambda: blob.BlobClient.from_blob_url(sas[-1], **upload.CLIENT_OPTIONS),
        name=f"the disk {gallery.disk_name(settings)}",
        renew=lambda: sas.append(arm.grant(client, settings)),
    )


@reads(*UPLOAD_SETTINGS)
def upload_vhd(settings: Settings) -> Plan:
    """upload the VHD's data (sparse, parallel, resumable); then revoke the access"""
    pub = settings.azure.publish
    if pub.target == "blob":

        def send_blob() -> None:
            access = blob_access(settings)
            _record_upload(settings, access.name, _upload(settings, access, create=True))

        return Plan().do(
            f"upload the VHD's data extents to {public_url(pub.blob_url.get_secret_value())}"
            if pub.blob_url is not None
            else "upload the VHD's data extents to azure.publish.blob_url",
            send_blob,
        )
    name = gallery.disk_name(settings)

    def send() -> None:
        client = arm.compute(settings)
        vhd = _verified(settings)
        found = arm.upload_disk(client, settings, vhd["size"], vhd["sha256"])
        state = None if found is None else arm.text(found.disk_state)
        if state == "Unattached":
            # Revoked by a run before this one, which ended before its record: Azure
            # took the footer, which is sent after all the data.
            log.info("the disk %s holds the whole upload already (revoked)", name)
            done = upload.Sent(size=vhd["size"]).to_json()
            _record_upload(
                settings, f"the disk {name}", {**done, "finished_by_an_earlier_run": True}
            )
            return
        if state not in ("ReadyToUpload", "ActiveUpload"):
            raise UserError(
                f"the disk {name} is {state or 'gone'}, not ready for an upload",
                "`archkernel run azure_publish --from 2` makes a missing disk again; a disk "
                "in another state is in use: delete it or choose another azure.publish.disk_name",
            )
        access = disk_access(settings, client)
        try:
            sent = _upload(settings, access, create=False)
        except BaseException:
            log.warning(
                "the upload to %s stopped before its footer: the disk stays in ActiveUpload "
                "and its write access valid until it expires (azure.publish.access_seconds); "
                "run the step again to go on with the upload, or delete the disk",
                name,
            )
            raise
        arm.revoke(client, settings)
        _record_upload(settings, access.name, sent)

    return Plan().do(
        f"grant write access to {name} (a killed run's upload goes on through a new grant); "
        f"send the VHD's data extents the disk does not hold, {pub.parallel} writes at a "
        "time, then its footer; revoke the access (the disk becomes Unattached)",
        send,
    )


@reads(*IMAGE_STEP_SETTINGS)
def image(settings: Settings) -> Plan:
    """make the gallery and image definition if missing, then the image version from the disk"""
    pub = settings.azure.publish

    def run() -> None:
        client = arm.compute(settings)
        disk_id = json.loads(paths(settings).stamp("disk").read_text())["id"]
        definition = arm.ensure_gallery(client, settings)
        version = arm.create_version(client, settings, disk_id)
        record(settings, "image_definition", {"id": definition})
        record(settings, "image_version", {"id": version})
        stamp(settings, "gallery", {"image_version": version})

    return Plan().do(
        f"make the gallery {pub.gallery} and image definition {pub.image_definition} when "
        f"missing, then image version {pub.image_version} in {pub.region} "
        f"(+ {', '.join(pub.target_regions) or 'no other region'}); wait for it",
        run,
    )


@reads(*CLEANUP_SETTINGS)
def cleanup(settings: Settings) -> Plan:
    """delete the upload disk (unless keep_disk); print the image version and a VM line"""
    pub = settings.azure.publish

    def run() -> None:
        version = json.loads(paths(settings).stamp("gallery").read_text())["image_version"]
        if pub.keep_disk:
            log.info("keeping the upload disk %s (keep_disk)", gallery.disk_name(settings))
        else:
            arm.delete_disk(arm.compute(settings), settings)
        record(settings, "disk_deleted", not pub.keep_disk)
        stamp(settings, "cleanup", {"image_version": version, "disk_deleted": not pub.keep_disk})
        print(f"image version: {version}")
        print(f"start a VM from it:\n  {gallery.vm_create_line(settings, version)}")

    what = "keep the upload disk" if pub.keep_disk else "delete the upload disk"
    return Plan().do(f"{what}; print the image version's ID and an az vm create line", run)
