"""The image's identifiers, every one derived from a single seed, and the build's epoch.

Two builds with the same seed give the same IDs, and so (with the same epoch) the same
bytes; another seed changes every ID. The derivation, as systemd derives its
application-specific IDs:

    bytes(purpose) = HMAC-SHA256(key = seed, message = "archkernel:" + purpose)
    UUID(purpose)  = the first 16 bytes, with the RFC 9562 version 4 and variant bits set

| ID                          | purpose                   | form                      |
| root file system UUID       | `root-uuid`               | UUID                      |
| ext4 directory hash seed    | `ext4-hash-seed`          | UUID                      |
| ESP (FAT) volume ID         | `esp-volume-id`           | first 4 bytes, `XXXX-XXXX` |
| GPT disk GUID               | `gpt-disk-guid`           | UUID (upper case)         |
| GPT partition GUID of ROLE  | `gpt-partition-guid:ROLE` | UUID (upper case)         |
| MBR disk signature          | `mbr-disk-signature`      | first 4 bytes, `0x...`    |
| VHD footer unique ID        | `vhd-unique-id`           | UUID                      |

ROLE is `bios_boot`, `esp` or `root`. The seed is `azure.seed`, or by default
`settings:` followed by the SHA-256 of the canonical JSON (sorted keys, no blanks) of the
settings that make the image (`SEED_SETTINGS`: every `azure` key but those in
`NOT_IN_SEED`; secrets as their digests), so two different images never share IDs by
accident. Step 1 records them all in `ids.json`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from archkernel.image.disk import Layout, plan_layout
from archkernel.log import log
from archkernel.settings import AzureSettings, Settings, subset

# Not what the image is: where the packages come from, where the build runs, the VHD's
# file name, the boot test, and the seed itself. The same image from another mirror or in
# a container keeps its IDs. The disk (size, table, file system, kernel command line) is
# part of the image: another disk is another image, with IDs of its own.
NOT_IN_SEED = frozenset(
    {
        "seed",
        "mirror",
        "pacman_conf",
        "package_cache",
        "builder",
        "container_runtime",
        "bootstrap_mirror",
        "bootstrap_tarball",
        "bootstrap_sha256",
        "bootstrap_keyring",
        "output",
        "boottest_marker",
        "boottest_timeout",
        "publish",  # azure_publish: where the image goes, not what it is
    }
)
# What the default seed is a digest of; a key added to `[azure]` enters it unless it is
# listed above.
SEED_SETTINGS = tuple(f"azure.{f.name}" for f in fields(AzureSettings) if f.name not in NOT_IN_SEED)
# What step 1 reads to derive the IDs: the seed, what its default is made of, and what
# says which IDs the image has (GPT or MBR; the firmware, an ESP or not, is in the seed).
ID_SETTINGS = ("azure.seed", *SEED_SETTINGS)
EPOCH_SETTING = "build.source_date_epoch"
PREFIX = "archkernel:"
PARTITION_ROLES = ("bios_boot", "esp", "root")


def digest(seed: str, purpose: str) -> bytes:
    """HMAC-SHA256 of `purpose` keyed by `seed`: the 32 bytes every ID is cut from."""
    return hmac.new(seed.encode(), (PREFIX + purpose).encode(), hashlib.sha256).digest()


def derived_uuid(seed: str, purpose: str) -> uuid.UUID:
    """The UUID for `purpose`: 16 bytes of `digest`, as a version 4 (RFC 9562) UUID."""
    return uuid.UUID(bytes=digest(seed, purpose)[:16], version=4)


def esp_volume_id(seed: str) -> str:
    """The FAT volume ID of the EFI system partition, `XXXX-XXXX`."""
    word = digest(seed, "esp-volume-id")[:4].hex().upper()
    return f"{word[:4]}-{word[4:]}"


def mbr_signature(seed: str) -> str:
    """The MBR disk signature, `0x` and 8 hex digits (sfdisk's `label-id` of a dos label)."""
    return "0x" + digest(seed, "mbr-disk-signature")[:4].hex()


def default_seed(settings: Settings) -> str:
    """`settings:` and the SHA-256 of the canonical JSON of `SEED_SETTINGS`."""
    values = subset(settings, list(SEED_SETTINGS))
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "settings:" + hashlib.sha256(text.encode()).hexdigest()


def seed_of(settings: Settings) -> str:
    """The seed: `azure.seed`, else `default_seed`."""
    given = settings.azure.seed
    return given if given is not None else default_seed(settings)


@dataclass(frozen=True)
class ImageIds:
    """Every identifier of one image, as `ids.json` records them (GUIDs and UUIDs as text).

    IDs an image does not have are None (an ESP volume ID for BIOS, GPT GUIDs for MBR);
    `partition_guids` maps a partition's role to its GUID.
    """

    seed: str
    root_uuid: str
    ext4_hash_seed: str
    vhd_unique_id: str
    esp_volume: str | None = None
    disk_guid: str | None = None
    partition_guids: dict[str, str] = field(default_factory=dict)
    mbr_signature: str | None = None

    def to_json(self) -> dict[str, Any]:
        """What `ids.json` holds: the seed and every ID the image has."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in data.items() if v not in (None, {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageIds:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def identifiers(self) -> dict[str, str]:
        """Every ID by a flat name (`partition_guid:root`), the seed left out."""
        flat = {k: v for k, v in self.to_json().items() if k not in ("seed", "partition_guids")}
        flat.update({f"partition_guid:{r}": g for r, g in self.partition_guids.items()})
        return flat


def derive(seed: str, *, firmware: str, table: str) -> ImageIds:
    """The IDs of an image booting with `firmware` ('bios', 'uefi', 'hybrid') from a disk
    with a `table` ('gpt', 'mbr'), derived from `seed` (see the module's docstring)."""
    roles = ["root"]
    if table == "gpt" and firmware in ("bios", "hybrid"):
        roles.insert(0, "bios_boot")
    if firmware != "bios":
        roles.insert(-1, "esp")
    gpt = table == "gpt"
    return ImageIds(
        seed=seed,
        root_uuid=str(derived_uuid(seed, "root-uuid")),
        ext4_hash_seed=str(derived_uuid(seed, "ext4-hash-seed")),
        vhd_unique_id=str(derived_uuid(seed, "vhd-unique-id")),
        esp_volume=esp_volume_id(seed) if firmware != "bios" else None,
        disk_guid=str(derived_uuid(seed, "gpt-disk-guid")).upper() if gpt else None,
        partition_guids={
            role: str(derived_uuid(seed, f"gpt-partition-guid:{role}")).upper()
            for role in (roles if gpt else [])
        },
        mbr_signature=None if gpt else mbr_signature(seed),
    )


def with_ids(layout: Layout, ids: ImageIds | None) -> Layout:
    """`layout` with the disk GUID and partition GUIDs (GPT) or the disk signature (MBR)
    of `ids`; as it is without them (a plan made before step 1 ran), then sfdisk picks."""
    if ids is None:
        return layout
    gpt = layout.table == "gpt"
    roles = {part.role for part in layout.partitions} if gpt else set()
    return plan_layout(
        layout.disk_size,
        layout.table,
        boot=layout.boot,
        disk_guid=ids.disk_guid if gpt else None,
        partition_guids={r: g for r, g in ids.partition_guids.items() if r in roles},
        disk_signature=None if gpt else ids.mbr_signature,
    )


def image_ids(settings: Settings) -> ImageIds:
    """The IDs of the image these settings describe (reads `ID_SETTINGS`)."""
    az = settings.azure
    return derive(seed_of(settings), firmware=az.firmware, table=az.partition_table)


# --- the epoch -------------------------------------------------------------------------------

_said: set[str] = set()


def source_date_epoch(settings: Settings) -> int | None:
    """`build.source_date_epoch` (whose default is $SOURCE_DATE_EPOCH): the time the image
    carries. Without one, says once (per process) that the image carries the build time."""
    epoch = settings.build.source_date_epoch
    if epoch is None and EPOCH_SETTING not in _said:
        _said.add(EPOCH_SETTING)
        log.warning(
            "neither build.source_date_epoch nor SOURCE_DATE_EPOCH is set: the image will "
            "carry the build time (file times, file system and VHD time stamps), so rebuilds "
            "differ; set one (seconds since 1970) for byte-identical rebuilds"
        )
    return epoch


def epoch_env(epoch: int | None) -> dict[str, str]:
    """The environment a build tool needs to use `epoch` (none without one)."""
    return {} if epoch is None else {"SOURCE_DATE_EPOCH": str(epoch)}
