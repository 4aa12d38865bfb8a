"""Step 1 of azure_publish: what must hold before any request is sent.

The VHD passes `vhd check` (Azure's footer rules); step 9's report on it is green and
names it; the manifest step 9 wrote with that report gives the VHD's sha256, and the file
still has it (a VHD changed after its check is refused). Then the target's settings: the
gallery's names are names Azure accepts, or the blob target has a URL. Last, the
credentials resolve (a token, or a SAS in the URL, or a connection string). All but the
last read only local files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from archkernel.azure.publish import gallery
from archkernel.azure.publish.secrets import public_url
from archkernel.errors import UserError
from archkernel.formats import vhd_file
from archkernel.host.files import sha256_file
from archkernel.settings import Settings

ENV_CONNECTION = "AZURE_STORAGE_CONNECTION_STRING"


@dataclass(frozen=True)
class Verified:
    """The VHD step 9 passed: its name, size and sha256."""

    name: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


def _load(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"there is no {what} ({path})",
            "build and check the image first: archkernel run azure_vhd",
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"the {what} {path} is not a JSON object")
    return data


def verified_vhd(vhd: Path, report: Path, manifest: Path) -> Verified:
    """The VHD, if `vhd check` passes, step 9's `report` on it is green, and the VHD's
    sha256 is the one `manifest` recorded; a UserError otherwise."""
    vhd_file.check_or_raise(vhd)
    found = _load(report, "verify report")
    if found.get("image") != str(vhd):
        raise UserError(
            f"the verify report {report} is about {found.get('image')!r}, not {vhd}",
            "run step 9 of azure_vhd again: archkernel run azure_vhd",
        )
    if found.get("ok") is not True:
        raise UserError(
            f"{vhd} failed its checks (verify report {report}): it is not published",
            f"read {report.with_suffix('.txt')}, fix the image and build it again",
        )
    recorded = _load(manifest, "manifest").get("outputs", {}).get(vhd.name, {})
    expected = recorded.get("sha256") if isinstance(recorded, dict) else None
    if not expected:
        raise UserError(f"the manifest {manifest} records no sha256 for {vhd.name}")
    actual = sha256_file(vhd)
    if actual != expected:
        raise UserError(
            f"{vhd} changed after it was checked (sha256 {actual[:16]}..., the verify step "
            f"saw {expected[:16]}...)",
            "check it again: archkernel run azure_vhd (step 9 runs on the new file)",
        )
    return Verified(vhd.name, vhd.stat().st_size, actual)


def blob_problems(settings: Settings) -> list[str]:
    """What is wrong with the blob target's settings (empty: nothing)."""
    url = settings.azure.publish.blob_url
    if url is None:
        return ["azure.publish.blob_url is not set (target = 'blob')"]
    plain = public_url(url.get_secret_value())
    parts = urlsplit(plain)
    # The SDK quotes a URL it cannot parse (SAS included) in its error: refuse it here.
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or plain.rstrip("/").count("/") < 4
    ):
        return [f"azure.publish.blob_url {plain!r} is not https://ACCOUNT.../CONTAINER/BLOB"]
    if not plain.lower().endswith(".vhd"):
        return [f"azure.publish.blob_url {plain!r}: the blob's name must end in .vhd"]
    return []


def has_sas(url: str) -> bool:
    """Whether the blob URL carries a shared access signature."""
    return "sig=" in url.partition("?")[2]


def target_problems(settings: Settings) -> list[str]:
    """Every problem of the target's settings."""
    if settings.azure.publish.target == "blob":
        return blob_problems(settings)
    return gallery.name_problems(settings)


def raise_on_problems(problems: list[str]) -> None:
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise UserError(
            f"the [azure.publish] settings are not complete:\n{lines}",
            "set them in settings.toml (settings.toml.example lists every key)",
        )
