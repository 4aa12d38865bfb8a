"""The Resource Manager requests of the gallery target, as data (pure).

Request bodies in the REST API's own shape (Microsoft.Compute `disks`, `galleries`,
`galleries/images`, `galleries/images/versions`), resource IDs, the checks of the names
Azure accepts, and the `az vm create` line printed at the end. `arm` sends them.
"""

from __future__ import annotations

import re
import shlex
import uuid
from typing import Any

from archkernel.settings import Settings

# Azure's naming rules (Microsoft.Compute): galleries take letters, digits, '.' and '_';
# image definitions and disks also '-'; a version is MAJOR.MINOR.PATCH (32-bit integers).
_NAMES = {
    "resource_group": (
        re.compile(r"[-\w.()]{0,89}[-\w()]"),
        "1-90 letters, digits, -, _, ., ( and ); not ending with .",
    ),
    "gallery": (re.compile(r"[A-Za-z0-9][A-Za-z0-9._]{0,79}"), "1-80 letters, digits, . and _"),
    "image_definition": (
        re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}"),
        "1-80 letters, digits, -, . and _",
    ),
    "disk_name": (
        re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,78}[A-Za-z0-9_])?"),
        "1-80 letters, digits, -, . and _; not starting with -, . or _ nor ending with - or .",
    ),
    "region": (re.compile(r"[a-z0-9]{2,40}"), "a region name such as westeurope"),
}
# The upload disk's tag naming the VHD it is for (its sha256).
VHD_TAG = "archkernel-vhd-sha256"
_VERSION = re.compile(r"(0|[1-9][0-9]{0,9})\.(0|[1-9][0-9]{0,9})\.(0|[1-9][0-9]{0,9})")


def disk_name(settings: Settings) -> str:
    """The upload disk's name: the setting, or `<definition>-<version>-upload`."""
    pub = settings.azure.publish
    return pub.disk_name or f"{pub.image_definition}-{pub.image_version}-upload"


def name_problems(settings: Settings) -> list[str]:
    """What is wrong with the gallery target's settings (empty: nothing)."""
    pub = settings.azure.publish
    problems = []
    if pub.subscription is None:
        problems.append("azure.publish.subscription is not set")
    else:
        try:
            uuid.UUID(pub.subscription)
        except ValueError:
            problems.append(f"azure.publish.subscription {pub.subscription!r} is not a UUID")
    values = {
        "resource_group": pub.resource_group,
        "gallery": pub.gallery,
        "image_definition": pub.image_definition,
        "disk_name": disk_name(settings),
        "region": pub.region,
    }
    for key, value in values.items():
        pattern, rule = _NAMES[key]
        if value is None:
            problems.append(f"azure.publish.{key} is not set")
        elif not pattern.fullmatch(value):
            problems.append(f"azure.publish.{key} {value!r} is not a valid name ({rule})")
    for region in pub.target_regions:
        if not _NAMES["region"][0].fullmatch(region):
            problems.append(f"azure.publish.target_regions: {region!r} is not a region name")
    if pub.image_version is None:
        problems.append("azure.publish.image_version is not set")
    elif not _VERSION.fullmatch(pub.image_version) or any(
        int(n) > 2**31 - 1 for n in pub.image_version.split(".")
    ):
        problems.append(
            f"azure.publish.image_version {pub.image_version!r} is not MAJOR.MINOR.PATCH"
        )
    if settings.azure.generation == 1 and pub.security_type != "Standard":
        problems.append(
            f"azure.publish.security_type {pub.security_type!r} needs a generation 2 image "
            "(azure.generation = 2)"
        )
    return problems


def hyper_v_generation(settings: Settings) -> str:
    return f"V{settings.azure.generation}"


def controllers(settings: Settings) -> str:
    """`DiskControllerTypes` as Azure writes it: `SCSI, NVMe`."""
    return ", ".join(settings.azure.publish.disk_controller_types)


def resource_id(settings: Settings, kind: str, *names: str) -> str:
    """A Microsoft.Compute resource ID: kind `disks` with a name, `galleries` with 1-3."""
    pub = settings.azure.publish
    base = (
        f"/subscriptions/{pub.subscription}/resourceGroups/{pub.resource_group}"
        f"/providers/Microsoft.Compute/{kind}/{names[0]}"
    )
    parts = ["images", "versions"]
    for part, name in zip(parts, names[1:], strict=False):
        base += f"/{part}/{name}"
    return base


def disk_body(settings: Settings, upload_size: int, sha256: str) -> dict[str, Any]:
    """The empty managed disk to upload into: `createOption: Upload`, the VHD's file size
    (footer included), the image's generation, controllers and security type; tagged with
    the VHD's sha256, so a later run resumes only into a disk of the same VHD."""
    pub = settings.azure.publish
    properties: dict[str, Any] = {
        "osType": "Linux",
        "hyperVGeneration": hyper_v_generation(settings),
        "creationData": {"createOption": "Upload", "uploadSizeBytes": upload_size},
        "supportedCapabilities": {"diskControllerTypes": controllers(settings)},
    }
    if pub.security_type == "TrustedLaunch":
        properties["securityProfile"] = {"securityType": "TrustedLaunch"}
    return {
        "location": pub.region,
        "tags": {VHD_TAG: sha256},
        "sku": {"name": "Standard_LRS"},
        "properties": properties,
    }


def grant_body(settings: Settings) -> dict[str, Any]:
    """grantAccess: write, to a VHD, for `access_seconds`."""
    return {
        "access": "Write",
        "durationInSeconds": settings.azure.publish.access_seconds,
        "fileFormat": "VHD",
    }


def gallery_body(settings: Settings) -> dict[str, Any]:
    return {
        "location": settings.azure.publish.region,
        "properties": {"description": "Arch Linux images built by archkernel"},
    }


def image_body(settings: Settings) -> dict[str, Any]:
    """The image definition: OS, generation, identifier and features."""
    pub = settings.azure.publish
    features = [{"name": "DiskControllerTypes", "value": controllers(settings)}]
    if pub.security_type != "Standard":
        features.append({"name": "SecurityType", "value": pub.security_type})
    return {
        "location": pub.region,
        "properties": {
            "osType": "Linux",
            "osState": "Generalized",
            "hyperVGeneration": hyper_v_generation(settings),
            "architecture": "x64",
            "identifier": {"publisher": pub.publisher, "offer": pub.offer, "sku": pub.sku},
            "features": features,
        },
    }


def version_body(settings: Settings, disk_id: str) -> dict[str, Any]:
    """The image version made from the uploaded disk, replicated to the target regions."""
    pub = settings.azure.publish
    regions = list(dict.fromkeys([pub.region or "", *pub.target_regions]))
    return {
        "location": pub.region,
        "properties": {
            "publishingProfile": {
                "targetRegions": [
                    {"name": r, "regionalReplicaCount": pub.replica_count} for r in regions
                ],
                "replicaCount": pub.replica_count,
            },
            "storageProfile": {"osDiskImage": {"source": {"id": disk_id}}},
        },
    }


def vm_create_line(settings: Settings, version_id: str) -> str:
    """An `az vm create` command that starts a VM from the image version."""
    pub = settings.azure.publish
    argv = [
        "az", "vm", "create",
        "--resource-group", pub.resource_group or "",
        "--name", "archlinux-vm",
        "--image", version_id,
        "--admin-username", "arch",
        "--generate-ssh-keys",
    ]  # fmt: skip
    if pub.security_type == "Standard" and settings.azure.generation == 2:
        argv += ["--security-type", "Standard"]
    return shlex.join(argv)
