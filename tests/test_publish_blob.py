"""azure_publish, target blob, end to end through the `archkernel` command, into Azurite:
with a SAS in azure.publish.blob_url, and with AZURE_STORAGE_CONNECTION_STRING.

Also: the Azure SDKs stay optional (archkernel and the other workflows import without
them; azure_publish says how to install them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import azurite as emulator
from tests.support.cli import REPO, run_archkernel
from tests.support.publish import random_chunks, verified

MiB = 1024 * 1024


def project(tmp_path: Path, blob_url: str) -> Path:
    (tmp_path / "settings.toml").write_text(
        f'workdir = "build"\n[azure.publish]\ntarget = "blob"\nblob_url = "{blob_url}"\n'
    )
    return tmp_path


@pytest.mark.integration
def test_blob_target_with_a_sas_url(azurite: emulator.Azurite, tmp_path: Path) -> None:
    azurite.container("images")
    vhd = verified(tmp_path / "build", 48 * MiB, random_chunks({0: MiB, 20 * MiB: 3 * MiB}))
    url = azurite.sas_url("images", "arch.vhd")
    project(tmp_path, url)

    # ARCHKERNEL_AUDIT_SETTINGS: a step reading a setting it did not declare fails.
    done = run_archkernel(tmp_path, "", "run", "azure_publish", ARCHKERNEL_AUDIT_SETTINGS="1")
    assert done.returncode == 0, done.stderr
    again = run_archkernel(tmp_path, "", "run", "azure_publish")
    assert again.returncode == 0, again.stderr

    blob = azurite.blob("images", "arch.vhd")
    assert blob.download_blob().readall() == vhd.read_bytes()
    record = json.loads((tmp_path / "build/azure/publish.json").read_text())
    assert record["target"] == "blob"
    assert record["upload"]["destination"] == url.split("?")[0]
    # Sent once: the second run found the steps up to date (a re-run would have sent
    # only the footer and recorded 512).
    assert record["upload"]["bytes_sent"] == 4 * MiB + 512
    state = (tmp_path / "build/.doit.json").read_text()
    for text in (done.stdout, done.stderr, again.stderr, state, json.dumps(record)):
        assert "sig=" not in text and url.split("sig=")[1][:20] not in text


@pytest.mark.integration
def test_blob_target_with_a_connection_string(azurite: emulator.Azurite, tmp_path: Path) -> None:
    azurite.container("images")
    vhd = verified(tmp_path / "build", 16 * MiB, random_chunks({2 * MiB: MiB}))
    project(tmp_path, f"{azurite.endpoint}/images/conn.vhd")

    done = run_archkernel(
        tmp_path,
        "",
        "run",
        "azure_publish",
        AZURE_STORAGE_CONNECTION_STRING=azurite.connection_string,
    )

    assert done.returncode == 0, done.stderr
    assert azurite.blob("images", "conn.vhd").download_blob().readall() == vhd.read_bytes()
    assert emulator.KEY not in done.stderr + done.stdout
    assert "AccountKey" not in (tmp_path / "build/azure/publish.json").read_text()


HIDE_AZURE = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "azure" or name.startswith("azure."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
"""


def test_archkernel_works_without_the_azure_sdks(tmp_path: Path) -> None:
    """With the SDKs hidden (a sitecustomize), the workflows load, step 1 of a blob
    publish passes (a SAS needs no SDK), and step 2 says what to install."""
    hider = tmp_path / "hide"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(HIDE_AZURE)
    verified(tmp_path / "build", 8 * MiB, random_chunks({0: MiB}))
    project(tmp_path, "https://acct.blob.core.windows.net/c/a.vhd?sv=1&sig=abc")
    env = {"PYTHONPATH": f"{hider}:{REPO}"}

    listed = run_archkernel(tmp_path, "", "list", **env)
    done = run_archkernel(tmp_path, "", "run", "azure_publish", **env)

    assert listed.returncode == 0, listed.stderr
    assert "azure_vhd" in listed.stdout and "azure_publish" in listed.stdout
    assert done.returncode == 1
    assert "pip install 'archkernel[azure]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "build/azure/publish-check.json").is_file()


@pytest.mark.integration
def test_a_vhd_restored_from_ci_artifacts_publishes(
    azurite: emulator.Azurite, tmp_path: Path
) -> None:
    """The CI publish job's path: the artifacts (sparse tar of the VHD, verify.json,
    manifest.json, as .ci/azure-artifacts packs them) put back by
    .ci/azure/restore-artifact into a fresh work directory, then azure_publish."""
    built = tmp_path / "built"
    vhd = verified(built, 32 * MiB, random_chunks({5 * MiB: 2 * MiB}))
    artifacts = tmp_path / "dist"
    artifacts.mkdir()
    subprocess.run(
        ["tar", "--sparse", "-I", "zstd", "-cf", artifacts / f"{vhd.name}.tar.zst",
         "-C", vhd.parent, vhd.name],
        check=True,
    )  # fmt: skip
    for name in ("verify.json", "manifest.json"):
        shutil.copy(vhd.parent / name, artifacts / name)
    # The fresh runner: only the artifacts, at the work directory the settings name.
    restored_vhd = vhd.read_bytes()
    shutil.rmtree(built)
    azurite.container("cirun")
    project(tmp_path, azurite.sas_url("cirun", "restored.vhd"))
    settings = tmp_path / "settings.toml"
    settings.write_text(settings.read_text().replace('workdir = "build"', f'workdir = "{built}"'))

    restore = subprocess.run(
        [REPO / ".ci/azure/restore-artifact", settings, artifacts],
        capture_output=True,
        text=True,
        check=False,
    )
    assert restore.returncode == 0, restore.stderr
    done = run_archkernel(tmp_path, "", "run", "azure_publish", "--settings", str(settings))

    assert done.returncode == 0, done.stderr
    blob = azurite.blob("cirun", "restored.vhd")
    assert blob.download_blob().readall() == restored_vhd
