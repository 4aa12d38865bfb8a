"""`archkernel demo scaleway_kexec`: a fake C1 on loopback, and what the workflow did to it.

`standing_c1(DIR)` builds the fake C1 of `archkernel.demo.c1` under DIR (the slow parts,
Debian's kernel modules compressed as Arch's are and the provider's initrd, once, in
DIR/template; the machine itself afresh in DIR/c1 every time), starts in.tftpd on
127.0.0.1 over its boot files and puts the recording `kexec` and `systemctl` first on
PATH until the block ends. After `archkernel run scaleway_kexec` ran against it,
`outcome()` reads what happened (the stand-ins' calls, the initrd it wrote) and `report()`
says it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from archkernel.demo import c1 as fake
from archkernel.demo.debian import debian_kernel_tree
from archkernel.errors import UserError
from archkernel.host.files import remove_path, write_text
from archkernel.host.run import render
from archkernel.log import complete_step, log

DEFAULT_DIR = Path("archkernel-demo-c1")
PURPOSE = "archkernel demo scaleway_kexec"
# What a template holds changed (2: pacman's database, the kernel config): made anew.
LAYOUT = 2


def _template(directory: Path) -> fake.Template:
    """The C1's template in `directory`: the one made before, else a new one."""
    record = directory / "template.json"
    if record.is_file():
        data = json.loads(record.read_text())
    if record.is_file() and data.get("layout") == LAYOUT:
        template = fake.Template(
            directory, data["version"], Path(data["kernel_tree"]), dict(data["compressed"])
        )
        if template.uinitrd.is_file() and template.root.is_dir():
            log.info("fake C1: reusing the kernel modules and initrd in %s", directory)
            return template
    remove_path(directory)
    with complete_step(f"Making the fake C1's kernel modules and provider initrd in {directory}"):
        template = fake.c1_template(directory, debian_kernel_tree())
    data = {
        "layout": LAYOUT,
        "version": template.version,
        "kernel_tree": str(template.kernel_tree),
        "compressed": template.compressed,
    }
    write_text(record, json.dumps(data, indent=1) + "\n")
    return template


@contextlib.contextmanager
def standing_c1(directory: Path) -> Iterator[fake.FakeC1]:
    """A fresh fake C1 in `directory`/c1, served by in.tftpd on loopback, its stand-ins
    first on PATH; all stopped and PATH restored when the block ends."""
    fake.check_c1_tools(PURPOSE)
    fake.needs_root(PURPOSE)
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    template = _template(directory / "template")
    base = directory / "c1"
    remove_path(base)
    c1 = fake.FakeC1.create(base, template)
    with fake.serving(c1) as server:
        log.info(
            "fake C1 in %s: in.tftpd serves %s on %s port %d; %s are first on PATH",
            base,
            c1.tftp,
            server.host,
            server.port,
            ", ".join(sorted(p.name for p in c1.bin.iterdir())),
        )
        saved = os.environ.get("PATH")
        os.environ["PATH"] = c1.path()
        try:
            yield c1
        finally:
            if saved is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = saved


@dataclass(frozen=True)
class Added:
    """One entry of the archive the workflow appended to the provider's initrd."""

    path: str
    kind: str  # file, directory
    mode: int
    size: int
    source: str | None = None  # a module: its file in the kernel's module tree


@dataclass(frozen=True)
class Outcome:
    """What scaleway_kexec did on the fake C1."""

    calls: list[list[str]]  # the stand-ins' argv lists, in order
    output: Path
    output_size: int
    provider_size: int  # the provider's payload, kept byte for byte at the start
    added: list[Added]

    @property
    def kexec_load(self) -> list[str] | None:
        """The recorded `kexec -l ...`, if any."""
        return next((c for c in self.calls if c[:2] == ["kexec", "-l"]), None)

    @property
    def command_line(self) -> str | None:
        """The command line `kexec -l` was given."""
        prefix = "--command-line="
        load = self.kexec_load or []
        return next((a.removeprefix(prefix) for a in load if a.startswith(prefix)), None)


def outcome(c1: fake.FakeC1) -> Outcome:
    """Read what the workflow left on `c1`: the stand-ins' calls and the new initrd."""
    from archkernel.formats import initramfs  # libarchive: only when there is one to read

    payload = c1.template.payload.read_bytes()
    data = c1.output.read_bytes()
    if not data.startswith(payload):
        raise UserError(f"{c1.output} does not start with the provider's initrd")
    provider = initramfs.read_entries(payload, source="the provider's initrd")
    entries = initramfs.read_entries(data, source=str(c1.output))
    manifest = json.loads((c1.workdir / "scaleway" / "modules.json").read_text())
    sources = {f"archkernel/modules/{m['name']}.ko": m["path"] for m in manifest["modules"]}
    added = [
        Added(e.path, e.type, e.mode, e.size, sources.get(e.path)) for e in entries[len(provider) :]
    ]
    return Outcome(c1.calls(), c1.output, len(data), len(payload), added)


def _kind(mode_type: str) -> str:
    return {"file": "", "dir": "/"}.get(mode_type, f" ({mode_type})")


def report(result: Outcome, c1: fake.FakeC1) -> list[str]:
    """The lines the demo ends with."""
    lines = ["archkernel demo scaleway_kexec: done"]
    if result.kexec_load is None:
        lines.append("  cmdline:   kexec -l was not called (see the log above)")
    else:
        lines.append(f"  cmdline:   {result.command_line}")
    lines.append(
        f"  initrd:    {result.output} ({result.output_size} bytes): the provider's "
        f"{result.provider_size} bytes unchanged, then an archive adding"
    )
    for entry in result.added:
        what = f"{stat.filemode(entry.mode)[1:]} {entry.size:>8}"
        name = f"/{entry.path}{_kind(entry.kind)}"
        source = f"  <- {entry.source}, decompressed" if entry.source else ""
        lines.append(f"             {what}  {name}{source}")
    lines.append(f"  recorded:  the stand-ins in {c1.bin} were asked (nothing was kexec'd):")
    for call in result.calls:
        lines.append(f"             {render(call)}")
    return lines
