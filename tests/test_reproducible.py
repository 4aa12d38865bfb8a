"""Reproducible images: the same inputs make the same bytes, another seed other IDs.

Read this as the documentation of what "reproducible" means for azure_vhd. Each variant
(generation 1 with cloud-init, generation 2, hybrid, waagent) is built twice from the offline
repository with the same settings and the same epoch, in two work directories, one after
the other (so the clock has moved on: every build takes several seconds) and with another
TZ; the first takes the epoch from SOURCE_DATE_EPOCH, the second from the
`build.source_date_epoch` setting. Both VHDs must hash the same. Then:

- re-running steps 6-9 alone on the first build makes the same bytes again;
- a third build with another `azure.seed` differs in every ID that `ids.json` records, and
  its image tree in nothing but those IDs (and the GRUB core image built from them);
- without an epoch the build still works and says once that the image carries the build time.

Every build runs with ARCHKERNEL_AUDIT_SETTINGS=1: a step that reads a setting it does not
declare (the seed's, the epoch) fails the build.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from archkernel.demo import offline
from archkernel.formats.vhd import parse_footer
from tests.support.azure import STEPS, Build, outcomes

pytestmark = [pytest.mark.integration, pytest.mark.root]

EPOCH = 1_700_000_000  # 2023-11-14 22:13:20 UTC
# The same in the VHD footer's count of seconds since 2000-01-01 (946684800 after 1970).
VHD_EPOCH = 1_700_000_000 - 946_684_800
UEFI_DISK = {"ARCHKERNEL_AZURE__DISK_SIZE": "1GiB"}  # room for the 256 MiB ESP
VARIANTS = {
    "gen1-cloud-init": {},
    "gen2": {"ARCHKERNEL_AZURE__GENERATION": "2", **UEFI_DISK},
    "hybrid": {"ARCHKERNEL_AZURE__BOOT": "hybrid", **UEFI_DISK},
    "waagent": {"ARCHKERNEL_AZURE__PROVISIONING": "waagent"},
}
AUDIT = {"ARCHKERNEL_AUDIT_SETTINGS": "1"}
# The files of the image tree that hold an ID: fstab (root UUID, ESP volume ID), grub.cfg
# (root UUID), and GRUB's core images, whose early config finds the root by its UUID.
HOLD_IDS = {"etc/fstab", "boot/grub/grub.cfg"}
# i386-pc's core.img is compressed: the UUID in it cannot be replaced to compare.
BUILT_FROM_IDS = {"boot/grub/i386-pc/core.img"}
NOT_SET = {"SOURCE_DATE_EPOCH": ""}  # whatever the caller's environment says


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def build(repo: offline.OfflineRepo, name: str, **env: str) -> Build:
    """A finished build of azure_vhd in `repo.dir / name` with the settings audit on."""
    made = Build(repo, repo.dir / name, {**AUDIT, **env})
    result = made.run()
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Traceback" not in result.stderr
    return made


def ids_of(made: Build) -> dict[str, str]:
    """Every ID in ids.json by a flat name (`partition_guids.root`), the seed left out."""
    record = json.loads((made.azure / "ids.json").read_text())
    flat = {k: v for k, v in record.items() if isinstance(v, str) and k != "seed"}
    flat.update({f"partition_guids.{k}": v for k, v in record.get("partition_guids", {}).items()})
    return flat


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, repo: offline.OfflineRepo) -> tuple[Build, Build]:
    """One variant built twice: the epoch from SOURCE_DATE_EPOCH, then from the setting."""
    name, variant = request.param, VARIANTS[request.param]
    first = build(repo, f"{name}-1", SOURCE_DATE_EPOCH=str(EPOCH), TZ="UTC", **variant)
    second = build(
        repo,
        f"{name}-2",
        ARCHKERNEL_BUILD__SOURCE_DATE_EPOCH=str(EPOCH),
        TZ="Pacific/Kiritimati",  # UTC+14
        **NOT_SET,
        **variant,
    )
    return first, second


# --- same inputs, same bytes ----------------------------------------------------------------


def test_two_builds_make_byte_identical_vhds(pair: tuple[Build, Build]) -> None:
    first, second = pair
    assert first.azure != second.azure
    assert sha256(first.vhd) == sha256(second.vhd)
    assert ids_of(first) == ids_of(second)


def test_the_footer_carries_the_ids_unique_id_and_the_epoch(pair: tuple[Build, Build]) -> None:
    first, _ = pair
    with open(first.vhd, "rb") as f:
        f.seek(-512, os.SEEK_END)
        footer = parse_footer(f.read(512))
    record = json.loads((first.azure / "ids.json").read_text())
    assert str(footer.unique_id) == record["vhd_unique_id"]
    assert footer.timestamp == VHD_EPOCH


@pytest.fixture(scope="module")
def gen1(repo: offline.OfflineRepo) -> Build:
    return build(repo, "gen1-again", SOURCE_DATE_EPOCH=str(EPOCH))


def test_rerunning_steps_6_to_9_makes_the_same_bytes_again(gen1: Build) -> None:
    before = sha256(gen1.vhd)
    again = gen1.run("--from", "6")
    assert again.returncode == 0, again.stderr[-5000:]
    assert outcomes(again.stderr) == {
        **{step: "up to date" for step in STEPS[:5]},
        **{step: "done in" for step in STEPS[5:]},
    }
    assert sha256(gen1.vhd) == before


def test_the_image_holds_no_build_log_and_no_host_path(gen1: Build) -> None:
    tree = gen1.azure / "image-root"
    assert list((tree / "var/log").iterdir()) == []
    work = os.fsencode(str(gen1.workdir))
    holding = [
        str(p.relative_to(tree))
        for p in tree.rglob("*")
        if p.is_file() and not p.is_symlink() and work in p.read_bytes()
    ]
    assert holding == []
    dates = [
        (p.parent.name, p.read_text().split("%INSTALLDATE%\n")[1].split("\n")[0])
        for p in tree.glob("var/lib/pacman/local/*/desc")
    ]
    assert dates and {date for _, date in dates} == {str(EPOCH)}


# --- another seed, other IDs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def reseeded(repo: offline.OfflineRepo) -> tuple[Build, Build]:
    """The hybrid image (it has every kind of ID) from the default seed and another seed."""
    variant = VARIANTS["hybrid"]
    default = build(repo, "hybrid-default-seed", SOURCE_DATE_EPOCH=str(EPOCH), **variant)
    other = build(
        repo,
        "hybrid-other-seed",
        SOURCE_DATE_EPOCH=str(EPOCH),
        ARCHKERNEL_AZURE__SEED="other",
        **variant,
    )
    return default, other


def test_another_seed_changes_every_id(reseeded: tuple[Build, Build]) -> None:
    default, other = reseeded
    ids, others = ids_of(default), ids_of(other)
    assert sorted(ids) == [
        "disk_guid",
        "esp_volume",
        "ext4_hash_seed",
        "partition_guids.bios_boot",
        "partition_guids.esp",
        "partition_guids.root",
        "root_uuid",
        "vhd_unique_id",
    ]
    assert sorted(others) == sorted(ids)
    assert [k for k in ids if ids[k] == others[k]] == []
    assert json.loads((other.azure / "ids.json").read_text())["seed"] == "other"
    assert sha256(default.vhd) != sha256(other.vhd)


def entries(tree: Path) -> dict[str, tuple[int, int, int, int]]:
    """path -> (mode, uid, gid, mtime) of every entry of `tree`."""
    found = {}
    for path in [tree, *tree.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(tree))] = (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime))
    return found


def test_another_seed_changes_nothing_but_what_holds_an_id(reseeded: tuple[Build, Build]) -> None:
    default, other = reseeded
    ours, theirs = ids_of(default), ids_of(other)
    one, two = default.azure / "image-root", other.azure / "image-root"
    assert entries(one) == entries(two), "the same files, owners, modes and times"
    differ = []
    for name, (mode, *_) in entries(one).items():
        if not stat.S_ISREG(mode):
            continue
        mine, yours = (one / name).read_bytes(), (two / name).read_bytes()
        for key, value in theirs.items():
            for form in {value, value.lower(), value.upper()}:
                yours = yours.replace(form.encode(), ours[key].encode())
        if mine != yours:
            differ.append(name)
        elif (one / name).read_bytes() != (two / name).read_bytes():
            assert name in HOLD_IDS | {"boot/grub/x86_64-efi/core.efi"}, name
    assert set(differ) <= BUILT_FROM_IDS, differ


# --- no epoch -------------------------------------------------------------------------------


def test_without_an_epoch_the_build_works_and_says_once_it_carries_the_build_time(
    repo: offline.OfflineRepo,
) -> None:
    made = Build(repo, repo.dir / "no-epoch", {**AUDIT, **NOT_SET})
    result = made.run()
    assert result.returncode == 0, result.stderr[-5000:]
    said = [line for line in result.stderr.splitlines() if "carry the build time" in line]
    assert said == [
        "warning: neither build.source_date_epoch nor SOURCE_DATE_EPOCH is set: the image "
        "will carry the build time (file times, file system and VHD time stamps), so rebuilds "
        "differ; set one (seconds since 1970) for byte-identical rebuilds"
    ]
