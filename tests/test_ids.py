"""The image's IDs, derived from one seed; the epoch; and step 1 recording them.

The expected IDs were worked out by hand, not by the code under test: the HMAC-SHA256 of
`archkernel:PURPOSE` keyed by `example seed` (`printf 'archkernel:root-uuid' | openssl dgst
-sha256 -hmac 'example seed'`), its first 16 bytes with the UUID version nibble set to 4
and the top bits of byte 8 to binary 10.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from archkernel.azure import ids, preflight, workspace
from archkernel.image import disk
from archkernel.plan import declared_settings, describe
from archkernel.settings import Settings, validate
from archkernel.units import GiB

SEED = "example seed"
# HMAC-SHA256(key="example seed", "archkernel:root-uuid") = 42ed39303ac3fc72 4454037240...
ROOT_UUID = "42ed3930-3ac3-4c72-8454-0372402cc79b"
# ... "archkernel:ext4-hash-seed" = 4f9990f5b478cc74 3fc638bfc0c4c293...
HASH_SEED = "4f9990f5-b478-4c74-bfc6-38bfc0c4c293"
# ... "archkernel:vhd-unique-id" = 05ec8cbb5fcdd774 a5b258f1bbba76bf...
VHD_ID = "05ec8cbb-5fcd-4774-a5b2-58f1bbba76bf"
# ... "archkernel:esp-volume-id" = ac7ccfa3...
ESP_VOLUME = "AC7C-CFA3"
# ... "archkernel:gpt-disk-guid" = 6562eaaaeffe9df6 af695f1df214e5a8...
DISK_GUID = "6562EAAA-EFFE-4DF6-AF69-5F1DF214E5A8"
PARTITIONS = {
    "bios_boot": "5A7E2079-5428-4BC6-B298-FE24B6B8243C",  # 5a7e20795428 7bc6 f298 ...
    "esp": "FB29D6E8-4C0E-4109-920D-B7CCCD697739",  # fb29d6e84c0e 6109 120d ...
    "root": "0699CE14-1328-4A32-B3F6-25FDC85F73A0",  # 0699ce141328 3a32 b3f6 ...
}
# ... "archkernel:mbr-disk-signature" = 7e9a0b18...
MBR_SIGNATURE = "0x7e9a0b18"


def settings(tmp_path: Path, **azure: Any) -> Settings:
    return validate(Settings, {"workdir": str(tmp_path / "build"), "azure": azure})


# --- the derivation -------------------------------------------------------------------------


def test_each_id_of_a_seed_by_hand() -> None:
    assert str(ids.derived_uuid(SEED, "root-uuid")) == ROOT_UUID
    assert str(ids.derived_uuid(SEED, "ext4-hash-seed")) == HASH_SEED
    assert str(ids.derived_uuid(SEED, "vhd-unique-id")) == VHD_ID
    assert ids.esp_volume_id(SEED) == ESP_VOLUME
    assert ids.mbr_signature(SEED) == MBR_SIGNATURE


def test_the_ids_of_a_hybrid_gpt_image() -> None:
    got = ids.derive(SEED, firmware="hybrid", table="gpt")
    assert got == ids.ImageIds(
        seed=SEED,
        root_uuid=ROOT_UUID,
        ext4_hash_seed=HASH_SEED,
        vhd_unique_id=VHD_ID,
        esp_volume=ESP_VOLUME,
        disk_guid=DISK_GUID,
        partition_guids=PARTITIONS,
    )


def test_an_image_records_only_the_ids_it_has() -> None:
    uefi = ids.derive(SEED, firmware="uefi", table="gpt")
    assert uefi.partition_guids == {"esp": PARTITIONS["esp"], "root": PARTITIONS["root"]}
    bios = ids.derive(SEED, firmware="bios", table="gpt")
    assert bios.esp_volume is None
    assert list(bios.partition_guids) == ["bios_boot", "root"]
    mbr = ids.derive(SEED, firmware="bios", table="mbr")
    assert (mbr.disk_guid, mbr.partition_guids, mbr.mbr_signature) == (None, {}, MBR_SIGNATURE)
    assert mbr.to_json() == {
        "seed": SEED,
        "root_uuid": ROOT_UUID,
        "ext4_hash_seed": HASH_SEED,
        "vhd_unique_id": VHD_ID,
        "mbr_signature": MBR_SIGNATURE,
    }


def test_another_seed_changes_every_id() -> None:
    one = ids.derive(SEED, firmware="hybrid", table="gpt").identifiers()
    other = ids.derive("another seed", firmware="hybrid", table="gpt").identifiers()
    assert set(one) == set(other) and len(one) == 8
    assert all(one[k] != other[k] for k in one)


def test_the_json_record_reads_back() -> None:
    image = ids.derive(SEED, firmware="hybrid", table="gpt")
    assert ids.ImageIds.from_json(json.loads(json.dumps(image.to_json()))) == image


def test_the_layout_takes_the_disk_and_partition_guids() -> None:
    image = ids.derive(SEED, firmware="uefi", table="gpt")
    layout = ids.with_ids(disk.plan_layout(GiB, "gpt", boot="uefi"), image)
    assert layout.disk_guid == DISK_GUID
    assert [(p.role, p.guid) for p in layout.partitions] == [
        ("esp", PARTITIONS["esp"]),
        ("root", PARTITIONS["root"]),
    ]
    assert "uuid=0699CE14-1328-4A32-B3F6-25FDC85F73A0" in disk.sfdisk_script(layout)
    mbr = ids.with_ids(disk.plan_layout(GiB, "mbr"), ids.derive(SEED, firmware="bios", table="mbr"))
    assert "label-id: 0x7e9a0b18\n" in disk.sfdisk_script(mbr)
    # Before step 1 ran there are none: sfdisk picks.
    assert ids.with_ids(disk.plan_layout(GiB, "mbr"), None).disk_signature is None


# --- the seed -------------------------------------------------------------------------------


def test_a_given_seed_is_used_as_it_is(tmp_path: Path) -> None:
    got = ids.image_ids(settings(tmp_path, seed=SEED, generation=2, disk_size="1GiB"))
    assert (got.seed, got.root_uuid, got.esp_volume) == (SEED, ROOT_UUID, ESP_VOLUME)


def test_the_default_seed_follows_the_settings_that_shape_the_image(tmp_path: Path) -> None:
    base = ids.seed_of(settings(tmp_path))
    assert base.startswith("settings:") and len(base) == len("settings:") + 64
    # Where the packages come from, where the outputs go, the work directory: the same image.
    assert ids.seed_of(settings(tmp_path, mirror="https://example.org/$repo/os/$arch")) == base
    assert ids.seed_of(settings(tmp_path, output="other.vhd")) == base
    assert ids.seed_of(settings(tmp_path / "elsewhere")) == base
    # What the image is, its disk included: other IDs.
    assert ids.seed_of(settings(tmp_path, disk_size="31GiB")) != base
    assert ids.seed_of(settings(tmp_path, partition_table="mbr")) != base
    assert ids.seed_of(settings(tmp_path, hostname="other")) != base
    assert ids.seed_of(settings(tmp_path, extra_packages=["git"])) != base
    assert ids.seed_of(settings(tmp_path, generation=2, disk_size="1GiB")) != base


def test_the_seed_settings_are_the_image_shaping_keys() -> None:
    assert "azure.hostname" in ids.SEED_SETTINGS and "azure.user" in ids.SEED_SETTINGS
    for key in ("azure.mirror", "azure.pacman_conf", "azure.output"):
        assert key not in ids.SEED_SETTINGS
    for key in ("azure.disk_size", "azure.partition_table", "azure.kernel_cmdline"):
        assert key in ids.SEED_SETTINGS
    assert "azure.seed" not in ids.SEED_SETTINGS


def test_a_user_password_enters_the_default_seed_only_as_a_digest(tmp_path: Path) -> None:
    secret = "$6$saltsalt$thisisnotarealhashbutlookslikeone0123456789abcdefghijklmnop"
    user = {"name": "arch", "password_hash": secret}
    one, other = (
        ids.seed_of(settings(tmp_path, user=user)),
        ids.seed_of(settings(tmp_path, user={**user, "password_hash": secret + "x"})),
    )
    assert one != other and secret not in one


def test_a_blank_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not blank"):
        settings(tmp_path, seed="  ")


# --- step 1 ---------------------------------------------------------------------------------


def test_step_1_declares_what_the_seed_is_made_of(tmp_path: Path) -> None:
    declared = declared_settings(preflight.preflight)
    assert "azure.seed" in declared and "azure.partition_table" in declared
    assert set(ids.SEED_SETTINGS) <= set(declared)


def test_step_1_writes_ids_json_and_leaves_an_unchanged_one_alone(tmp_path: Path) -> None:
    given = tmp_path / "pacman.conf"
    given.write_text("[options]\n")
    s = settings(tmp_path, pacman_conf=str(given), seed=SEED, boot="hybrid", disk_size="1GiB")
    p = workspace.paths(s)
    plan = preflight.preflight(s)
    shown = "\n".join(describe(plan))
    assert f"write {p.ids}: every ID of the image (root_uuid," in shown
    assert "derived from the seed (azure.seed)" in shown
    p.work.mkdir(parents=True)
    (ids_op,) = [op for op in plan.ops if "every ID of the image" in "".join(op.lines())]
    ids_op()
    record = json.loads(p.ids.read_text())
    assert record["root_uuid"] == ROOT_UUID and record["disk_guid"] == DISK_GUID
    assert record["partition_guids"] == PARTITIONS
    assert workspace.recorded_ids(p) == ids.derive(SEED, firmware="hybrid", table="gpt")
    mtime = p.ids.stat().st_mtime_ns
    ids_op()
    assert p.ids.stat().st_mtime_ns == mtime


def test_an_ids_json_of_an_older_version_is_not_read(tmp_path: Path) -> None:
    p = workspace.paths(settings(tmp_path))
    p.work.mkdir(parents=True)
    p.ids.write_text(json.dumps({"root_uuid": ROOT_UUID}))
    assert workspace.recorded_ids(p) is None


# --- the epoch ------------------------------------------------------------------------------


def test_without_an_epoch_the_build_says_once_that_it_carries_the_build_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ids, "_said", set())
    s = settings(tmp_path)
    with caplog.at_level(logging.WARNING, logger="archkernel"):
        assert ids.source_date_epoch(s) is None
        assert ids.source_date_epoch(s) is None
    said = [r.getMessage() for r in caplog.records if "carry the build time" in r.getMessage()]
    assert len(said) == 1
    assert said[0].startswith("neither build.source_date_epoch nor SOURCE_DATE_EPOCH is set")


def test_with_an_epoch_nothing_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ids, "_said", set())
    s = validate(Settings, {"build": {"source_date_epoch": 1_700_000_000}})
    with caplog.at_level(logging.WARNING, logger="archkernel"):
        assert ids.source_date_epoch(s) == 1_700_000_000
    assert caplog.records == []
    assert ids.epoch_env(1_700_000_000) == {"SOURCE_DATE_EPOCH": "1700000000"}
    assert ids.epoch_env(None) == {}
