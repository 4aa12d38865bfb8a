"""The CI scripts' own logic."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _have_lists(directory: Path) -> bool:
    script = '. .ci/lib.sh; have_package_lists "$1"'
    done = subprocess.run(["bash", "-c", script, "-", str(directory)], cwd=REPO, check=False)
    return done.returncode == 0


@pytest.mark.parametrize(
    "name",
    [
        "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages",
        "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4",
        "archive.ubuntu.com_ubuntu_dists_noble_main_binary-amd64_Packages.zst",
    ],
)
@pytest.mark.integration
def test_package_lists_are_found_compressed_or_not(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"lists")
    assert _have_lists(tmp_path)


@pytest.mark.integration
def test_no_package_lists_means_an_update(tmp_path: Path) -> None:
    assert not _have_lists(tmp_path)
    (tmp_path / "lock").write_bytes(b"")
    (tmp_path / "deb.debian.org_debian_dists_bookworm_InRelease").write_bytes(b"x")
    assert not _have_lists(tmp_path)
    (tmp_path / "x_Packages.lz4").write_bytes(b"")  # empty: a failed download
    assert not _have_lists(tmp_path)
