"""archkernel.azure.publish.gallery: the names Azure accepts and the request bodies (pure)."""

from __future__ import annotations

import shlex

import pytest

from archkernel.azure.publish import gallery
from archkernel.settings import Settings
from archkernel.settings.schema import AzurePublishSettings, AzureSettings

SUB = "00000000-1111-2222-3333-444444444444"


def settings(generation: int = 2, **publish: object) -> Settings:
    base = {
        "subscription": SUB,
        "resource_group": "rg-arch",
        "region": "westeurope",
        "image_version": "1.0.0",
    }
    pub = AzurePublishSettings(**{**base, **publish})  # type: ignore[arg-type]
    return Settings(azure=AzureSettings(generation=generation, publish=pub))


def test_complete_settings_have_no_problems() -> None:
    assert gallery.name_problems(settings()) == []


def test_missing_settings_are_all_named_at_once() -> None:
    s = Settings(azure=AzureSettings(publish=AzurePublishSettings()))
    assert gallery.name_problems(s) == [
        "azure.publish.subscription is not set",
        "azure.publish.resource_group is not set",
        "azure.publish.region is not set",
        "azure.publish.image_version is not set",
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("subscription", "not-a-uuid"),
        ("gallery", "my-gallery"),  # galleries take no '-'
        ("image_definition", "_arch"),
        ("disk_name", "disk."),
        ("resource_group", "rg."),
        ("region", "West Europe"),
        ("image_version", "1.0"),
        ("image_version", "01.0.0"),
        ("image_version", "4294967296.0.0"),
    ],
)
def test_names_azure_refuses(key: str, value: str) -> None:
    # The disk is named apart: its default name comes from the image definition's.
    changed: dict[str, object] = {"disk_name": "upload", key: value}
    problems = gallery.name_problems(settings(2, **changed))
    assert len(problems) == 1 and f"azure.publish.{key}" in problems[0], problems


def test_a_security_type_needs_generation_2() -> None:
    problems = gallery.name_problems(settings(generation=1, security_type="TrustedLaunch"))
    assert problems == [
        "azure.publish.security_type 'TrustedLaunch' needs a generation 2 image "
        "(azure.generation = 2)"
    ]


def test_the_upload_disk_is_named_after_definition_and_version() -> None:
    assert gallery.disk_name(settings()) == "archlinux-1.0.0-upload"
    assert gallery.disk_name(settings(disk_name="mine")) == "mine"


def test_a_trusted_launch_disk_says_so_and_gen1_standard_does_not() -> None:
    trusted = gallery.disk_body(settings(security_type="TrustedLaunch"), 1024 * 1024 + 512, "0")
    assert trusted["properties"]["securityProfile"] == {"securityType": "TrustedLaunch"}
    plain = gallery.disk_body(settings(generation=1), 1024 * 1024 + 512, "0" * 64)
    assert plain["tags"] == {"archkernel-vhd-sha256": "0" * 64}
    assert "securityProfile" not in plain["properties"]
    assert plain["properties"]["hyperVGeneration"] == "V1"
    feats = gallery.image_body(settings(generation=1))["properties"]["features"]
    assert feats == [{"name": "DiskControllerTypes", "value": "SCSI, NVMe"}]


def test_the_vm_line_quotes_what_the_shell_would_split() -> None:
    s = settings(resource_group="rg (arch)")
    line = gallery.vm_create_line(s, "/subscriptions/x/y")
    words = shlex.split(line)
    assert words[:3] == ["az", "vm", "create"]
    assert words[words.index("--resource-group") + 1] == "rg (arch)"
    assert words[words.index("--image") + 1] == "/subscriptions/x/y"
    assert words[-2:] == ["--security-type", "Standard"]


def test_where_the_image_goes_is_not_part_of_the_image() -> None:
    """Where [azure.publish] sends the image changes neither its IDs (the seed) nor its
    manifest, so azure_vhd does not rebuild when only the target changes (and a blob_url's
    SAS never reaches the manifest)."""
    from archkernel.azure import ids, manifest

    assert not [k for k in ids.SEED_SETTINGS if k.startswith("azure.publish")]
    # The one publish setting about the image itself: the disk controllers it supports.
    recorded = {k for k in manifest.SETTINGS if k.startswith("azure.publish")}
    assert recorded <= {"azure.publish.disk_controller_types"}
