"""The Resource Manager calls of the gallery target, through azure-mgmt-compute.

The bodies come from `gallery` (pure); this module sends them and waits for the
long-running operations, saying what it waits for. Credentials are
`DefaultAzureCredential` (Azure CLI login, environment, managed identity, workload
identity federation in GitHub Actions). No SAS, token or key is logged or returned
anywhere but to the upload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from archkernel.azure.publish import gallery
from archkernel.azure.publish.secrets import redact, redacted_first_line, sdk
from archkernel.errors import UserError
from archkernel.log import log
from archkernel.settings import Settings

T = TypeVar("T")
STORAGE_SCOPE = "https://storage.azure.com/.default"


def text(value: Any) -> str:
    """An SDK enum's value (`ActiveUpload`), or the string itself: str() of an enum member
    is its qualified name."""
    return str(getattr(value, "value", value))


CREDENTIALS_HINT = (
    "log in with `az login`, or set AZURE_CLIENT_ID/AZURE_TENANT_ID and a secret "
    "or a federated token (GitHub Actions: azure/login with OIDC)"
)


def credential() -> Any:
    """Azure's default credential chain (the tests put a stand-in's here)."""
    identity = sdk("azure.identity")
    return identity.DefaultAzureCredential(exclude_interactive_browser_credential=True)


def scope(settings: Settings) -> str:
    return settings.azure.publish.arm_endpoint.rstrip("/") + "/.default"


def resolve_credentials(settings: Settings, scopes: list[str]) -> None:
    """Get a token for each of `scopes` now, so that missing credentials fail step 1."""
    cred = credential()
    core = sdk("azure.core.exceptions")
    for s in scopes:
        try:
            cred.get_token(s)
        except core.ClientAuthenticationError as exc:
            raise UserError(
                f"no Azure credentials for {s}: {redacted_first_line(exc)}", CREDENTIALS_HINT
            ) from None


def compute(settings: Settings) -> Any:
    """A ComputeManagementClient for the subscription, at `arm_endpoint`."""
    pub = settings.azure.publish
    module = sdk("azure.mgmt.compute")
    return module.ComputeManagementClient(
        credential(),
        pub.subscription,
        base_url=pub.arm_endpoint,
        credential_scopes=[scope(settings)],
        polling_interval=5,
    )


def call(what: str, fn: Callable[[], T]) -> T:
    """`fn()`, with the SDK's errors as UserErrors (redacted)."""
    core = sdk("azure.core.exceptions")
    try:
        return fn()
    except core.HttpResponseError as exc:
        if isinstance(exc, core.ClientAuthenticationError) and exc.status_code is None:
            # The credential got (or renewed) no token: Resource Manager was not asked.
            raise UserError(
                f"{what} failed: the Azure credentials gave no token: {redacted_first_line(exc)}",
                CREDENTIALS_HINT,
            ) from None
        raise UserError(
            f"{what} failed: HTTP {exc.status_code} {redacted_first_line(exc)}",
            "check the subscription, resource group and your role on them "
            "(Contributor on the resource group is enough)",
        ) from None
    except (core.ServiceRequestError, core.ServiceResponseError) as exc:
        raise UserError(
            f"{what} failed: Resource Manager did not answer: {redact(str(exc))}",
            "check the network and azure.publish.arm_endpoint, then run the step again",
        ) from None


def wait(poller: Any, what: str, every: float = 30.0) -> Any:
    """The result of a long-running operation, logging how long it has taken."""
    start = time.monotonic()
    while not poller.done():
        poller.wait(every)
        if not poller.done():
            log.info("%s: %s after %.0f s", what, poller.status(), time.monotonic() - start)
    return poller.result()


def _not_found(fn: Callable[[], T]) -> Callable[[], T | None]:
    core = sdk("azure.core.exceptions")

    def guarded() -> T | None:
        try:
            return fn()
        except core.ResourceNotFoundError:
            return None

    return guarded


def get_disk(client: Any, settings: Settings) -> Any:
    pub = settings.azure.publish
    name = gallery.disk_name(settings)
    return call(
        f"reading the disk {name}",
        _not_found(lambda: client.disks.get(pub.resource_group, name)),
    )


def upload_disk(client: Any, settings: Settings, upload_size: int, sha256: str) -> Any:
    """The upload disk for this VHD (createOption Upload, its size, tagged with its
    sha256) if it exists, else None; UserError for a disk of that name that is not it."""
    pub = settings.azure.publish
    name = gallery.disk_name(settings)
    found = get_disk(client, settings)
    if found is None:
        return None
    size = found.creation_data.upload_size_bytes
    ours = (found.tags or {}).get(gallery.VHD_TAG) == sha256
    if ours and text(found.creation_data.create_option) == "Upload" and size == upload_size:
        return found
    raise UserError(
        f"a disk {name} exists in {pub.resource_group} and is not this VHD's upload disk "
        f"(its tag {gallery.VHD_TAG} names another VHD, or none)",
        "delete it, or choose another azure.publish.disk_name",
    )


def create_disk(client: Any, settings: Settings, upload_size: int, sha256: str) -> str:
    """The upload disk's ID: made (createOption Upload, tagged with the VHD's sha256), or
    the one a killed run made for the same VHD."""
    pub = settings.azure.publish
    name = gallery.disk_name(settings)
    found = upload_disk(client, settings, upload_size, sha256)
    if found is not None:
        log.info("the upload disk %s exists already (a run before this one made it)", name)
        return str(found.id)
    body = gallery.disk_body(settings, upload_size, sha256)
    poller = call(
        f"creating the disk {name}",
        lambda: client.disks.begin_create_or_update(pub.resource_group, name, body),
    )
    disk = call(f"creating the disk {name}", lambda: wait(poller, f"creating the disk {name}"))
    return str(disk.id)


def grant(client: Any, settings: Settings) -> str:
    """A write SAS to the upload disk (grantAccess). The caller keeps it to itself."""
    pub = settings.azure.publish
    name = gallery.disk_name(settings)
    body = gallery.grant_body(settings)
    poller = call(
        f"granting access to {name}",
        lambda: client.disks.begin_grant_access(pub.resource_group, name, body),
    )
    access = call(f"granting access to {name}", lambda: wait(poller, f"granting access to {name}"))
    return str(access.access_sas)


def revoke(client: Any, settings: Settings) -> None:
    """End the write access (revokeAccess); the disk leaves the upload state."""
    pub = settings.azure.publish
    name = gallery.disk_name(settings)
    poller = call(
        f"revoking the access to {name}",
        lambda: client.disks.begin_revoke_access(pub.resource_group, name),
    )
    call(f"revoking the access to {name}", lambda: wait(poller, f"revoking access to {name}"))


def ensure_gallery(client: Any, settings: Settings) -> str:
    """The gallery and the image definition, made when missing; the definition's ID."""
    pub = settings.azure.publish
    rg, g, i = pub.resource_group, pub.gallery, pub.image_definition
    found = call(f"reading the gallery {g}", _not_found(lambda: client.galleries.get(rg, g)))
    if found is None:
        body = gallery.gallery_body(settings)
        poller = call(
            f"creating the gallery {g}",
            lambda: client.galleries.begin_create_or_update(rg, g, body),
        )
        call(f"creating the gallery {g}", lambda: wait(poller, f"creating the gallery {g}"))
    image = call(
        f"reading the image definition {i}",
        _not_found(lambda: client.gallery_images.get(rg, g, i)),
    )
    if image is None:
        body = gallery.image_body(settings)
        poller = call(
            f"creating the image definition {i}",
            lambda: client.gallery_images.begin_create_or_update(rg, g, i, body),
        )
        image = call(f"creating the image definition {i}", lambda: wait(poller, f"creating {i}"))
    elif text(image.hyper_v_generation) != gallery.hyper_v_generation(settings):
        raise UserError(
            f"the image definition {i} is for {text(image.hyper_v_generation)} VMs, the VHD for "
            f"{gallery.hyper_v_generation(settings)}",
            "choose another azure.publish.image_definition",
        )
    return str(image.id)


def create_version(client: Any, settings: Settings, disk_id: str) -> str:
    """The image version from the uploaded disk (waits for the replication)."""
    pub = settings.azure.publish
    rg, g, i, v = pub.resource_group, pub.gallery, pub.image_definition, pub.image_version
    found = call(
        f"reading the image version {v}",
        _not_found(lambda: client.gallery_image_versions.get(rg, g, i, v)),
    )
    if found is not None and text(found.provisioning_state) == "Succeeded":
        return str(found.id)
    body = gallery.version_body(settings, disk_id)
    poller = call(
        f"creating the image version {v}",
        lambda: client.gallery_image_versions.begin_create_or_update(rg, g, i, v, body),
    )
    version = call(
        f"creating the image version {v}",
        lambda: wait(poller, f"creating and replicating the image version {v}"),
    )
    return str(version.id)


def delete_disk(client: Any, settings: Settings) -> None:
    pub = settings.azure.publish
    name = gallery.disk_name(settings)
    poller = call(
        f"deleting the disk {name}",
        lambda: client.disks.begin_delete(pub.resource_group, name),
    )
    call(f"deleting the disk {name}", lambda: wait(poller, f"deleting the disk {name}"))
