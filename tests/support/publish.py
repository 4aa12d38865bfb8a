"""What azure_publish starts from, without a whole azure_vhd build: a sparse fixed VHD with
data at chosen offsets, and step 9's files about it (verify.json, manifest.json) with
the keys that step writes and azure_publish reads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from archkernel.formats import vhd_file
from tests.support.files import sparse_file, write_at

MiB = 1024 * 1024
VHD_NAME = "archlinux-azure.vhd"


def random_chunks(layout: dict[int, int], seed: int = 1) -> dict[int, bytes]:
    """offset -> that many pseudo-random bytes (none all zero)."""
    chunks = {}
    for n, (offset, length) in enumerate(sorted(layout.items())):
        block = hashlib.sha256(f"{seed}-{n}".encode()).digest()
        chunks[offset] = (block * (length // len(block) + 1))[:length]
    return chunks


def make_vhd(path: Path, disk_size: int, chunks: dict[int, bytes]) -> Path:
    """A fixed VHD of a `disk_size` disk (whole MiB) holding `chunks`, as sparse as it gets."""
    sparse_file(path, disk_size)
    write_at(path, chunks)
    vhd_file.append_footer(path, timestamp=0)
    return path


def verified(workdir: Path, disk_size: int, chunks: dict[int, bytes], ok: bool = True) -> Path:
    """`workdir/azure/archlinux-azure.vhd` and step 9's report and manifest about it."""
    work = workdir.resolve() / "azure"
    work.mkdir(parents=True, exist_ok=True)
    vhd = make_vhd(work / VHD_NAME, disk_size, chunks)
    digest = hashlib.sha256()
    with open(vhd, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    report = {"image": str(vhd), "ok": ok, "checks": []}
    (work / "verify.json").write_text(json.dumps(report, indent=2) + "\n")
    outputs = {VHD_NAME: {"size": os.path.getsize(vhd), "sha256": digest.hexdigest()}}
    (work / "manifest.json").write_text(json.dumps({"manifest": 1, "outputs": outputs}) + "\n")
    return vhd
