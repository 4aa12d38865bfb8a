"""The Arch package: built with makepkg from the checkout, its files, .PKGINFO and unit."""

from __future__ import annotations

import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_USER = "archkernel-build"
SHIPPED = [
    "PKGBUILD",
    "archkernel.install",
    "packaging",
    "archkernel",
    "tasks",
    "dodo.py",
    "pyproject.toml",
    "README.md",
    "settings.toml.example",
]

pytestmark = [pytest.mark.integration, pytest.mark.root]


def _ensure_user() -> None:
    try:
        pwd.getpwnam(BUILD_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--create-home", BUILD_USER], check=True)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(package file, root it was unpacked into)."""
    _ensure_user()
    # pytest's own temporary directories are private to root; the build user needs its own.
    work = Path(tempfile.mkdtemp(prefix="archkernel-makepkg-"))
    try:
        yield _build(work, tmp_path_factory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(work: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    for name in SHIPPED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / name)
    subprocess.run(["chown", "-R", BUILD_USER, str(work)], check=True)
    # makepkg refuses root. On Debian, python's install scheme needs the hint to use /usr.
    result = subprocess.run(
        [
            "runuser",
            "-u",
            BUILD_USER,
            "--",
            "env",
            "DEB_PYTHON_INSTALL_LAYOUT=deb_system",
            "PATH=/usr/bin:/bin",
            "makepkg",
            "--nodeps",
            "--noconfirm",
            "--nosign",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (pkg,) = work.glob("archkernel-*.pkg.tar.*")
    root = tmp_path_factory.mktemp("pkgroot")
    subprocess.run(["bsdtar", "-xf", str(pkg), "-C", str(root)], check=True)
    return pkg, root


def test_package_holds_the_command_unit_hook_and_settings(package: tuple[Path, Path]) -> None:
    pkg, _ = package
    files = set(
        subprocess.run(
            ["bsdtar", "-tf", str(pkg)], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    for needed in [
        "usr/bin/archkernel",
        "usr/lib/systemd/system/archkernel-load.service",
        "usr/share/libalpm/hooks/archkernel.hook",
        "etc/archkernel/settings.toml",
        ".INSTALL",
        ".PKGINFO",
    ]:
        assert needed in files, needed
    assert any(
        re.search(r"site-packages|dist-packages", f) and f.endswith("archkernel/scaleway/steps.py")
        for f in files
    )
    assert not any("/tests/" in f for f in files)


def test_pkginfo_declares_arch_dependencies_and_backup(package: tuple[Path, Path]) -> None:
    _, root = package
    info = (root / ".PKGINFO").read_text()
    fields: dict[str, list[str]] = {}
    for line in info.splitlines():
        if " = " in line and not line.startswith("#"):
            key, value = line.split(" = ", 1)
            fields.setdefault(key, []).append(value)
    assert fields["pkgname"] == ["archkernel"]
    assert fields["arch"] == ["any"]
    assert fields["backup"] == ["etc/archkernel/settings.toml"]
    for dep in [
        "python",
        "python-doit",
        "python-tftpy",
        "python-libarchive-c",
        "python-pydantic",
        "kexec-tools",
    ]:
        assert dep in fields["depend"], dep


def test_installed_settings_are_valid_and_keep_state_in_var_lib(package: tuple[Path, Path]) -> None:
    from archkernel.settings import load

    _, root = package
    loaded = load(root / "etc/archkernel/settings.toml", env={})
    assert loaded.settings.workdir == Path("/var/lib/archkernel")


def test_unit_passes_systemd_analyze_verify(package: tuple[Path, Path]) -> None:
    _, root = package
    unit = root / "usr/lib/systemd/system/archkernel-load.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", str(unit)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    text = unit.read_text()
    for line in [
        "Type=oneshot",
        "ConditionKernelCommandLine=!archkernel",
        "DefaultDependencies=no",
        "Before=local-fs-pre.target systemd-remount-fs.service",
        "WantedBy=sysinit.target",
        "ExecStart=/usr/bin/archkernel run scaleway_kexec",
    ]:
        assert line in text.splitlines(), line


def test_install_script_removes_generated_files(package: tuple[Path, Path], tmp_path: Path) -> None:
    _, root = package
    script = (root / ".INSTALL").read_text()
    # Run post_remove against a fake root by rewriting its absolute paths.
    fake = tmp_path / "sys"
    (fake / "var/lib/archkernel").mkdir(parents=True)
    (fake / "var/lib/archkernel/.doit.json").write_text("{}")
    (fake / "boot").mkdir()
    (fake / "boot/initramfs-archkernel.img").write_bytes(b"x")
    (fake / "boot/zImage").write_bytes(b"k")
    rewritten = script.replace(" /var/", f" {fake}/var/").replace(" /boot/", f" {fake}/boot/")
    subprocess.run(["sh", "-c", rewritten + "\npost_remove\n"], check=True)
    assert not (fake / "var/lib/archkernel").exists()
    assert not (fake / "boot/initramfs-archkernel.img").exists()
    assert (fake / "boot/zImage").exists()


def test_hook_prepares_without_kexec(package: tuple[Path, Path]) -> None:
    _, root = package
    hook = (root / "usr/share/libalpm/hooks/archkernel.hook").read_text()
    exec_line = next(line for line in hook.splitlines() if line.startswith("Exec"))
    assert "run scaleway_kexec --to 6" in exec_line
    assert "When = PostTransaction" in hook
