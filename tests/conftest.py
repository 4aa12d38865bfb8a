"""Shared pytest configuration: what the markers do, and the fixtures several modules use.

Markers (registered in pyproject.toml; `--strict-markers` rejects any other):

- `integration`: runs real external tools (mkimage, sfdisk, pacstrap, a TFTP server ...).
- `vm`: boots a kernel in QEMU (slow). A VM boot runs QEMU, so every `vm` test is also an
  `integration` test.
- `root`: needs root (loop devices, mounts, namespaces, device nodes); skipped otherwise.

The quick tier, `pytest -m "not integration and not vm"`, needs nothing but Python.

The support code the fixtures are built on is in tests/support/, as plain functions and
context managers that bench/ uses without pytest.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import configuration as hypothesis_configuration
from hypothesis import settings as hypothesis_settings

# Before the imports below: failed asserts in the support code explain themselves too.
pytest.register_assert_rewrite("tests.support")

from archkernel.demo import offline  # noqa: E402
from tests.support import azurite as emulator  # noqa: E402
from tests.support import skips  # noqa: E402
from tests.support.c1 import FakeC1, Template, c1_template, needs_c1_tools, serving  # noqa: E402
from tests.support.evil_tftp import Behaviour, EvilServer, evil_tftp_servers  # noqa: E402
from tests.support.tftp import (  # noqa: E402
    TftpdHpa,
    TftpdUnavailable,
    TftpyServer,
    running_tftpd_hpa,
    tftpy_servers,
)
from tests.support.wheel import build_wheel  # noqa: E402

# --- property-based tests (tests/test_properties.py) ----------------------------------------
# `ci`, the default: a bounded run, no example database. The long run, nightly or by hand:
#   HYPOTHESIS_PROFILE=nightly pytest tests/test_properties.py
# hypothesis keeps its files (the nightly database included) in the temporary directory.
hypothesis_configuration.set_hypothesis_home_dir(Path(tempfile.gettempdir(), "hypothesis"))
hypothesis_settings.register_profile("ci", max_examples=150, deadline=None, database=None)
hypothesis_settings.register_profile("nightly", max_examples=20_000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --- markers ---------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("vm") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts, namespaces, device nodes)")


# --- CI: a skipped test is no pass -----------------------------------------------------------
# .ci/run sets TESTS_FAIL_ON_SKIP=1: CI installs every tool the tests need, so a skip there
# means a setup step is missing, and the run fails naming the skipped tests. A skip about
# the machine itself (tests/support/skips.py) is allowed.
_skipped: dict[str, str] = {}  # node id -> why


def _note_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        why = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if skips.MACHINE not in why:
            _skipped.setdefault(report.nodeid, why)


def _strict() -> bool:
    return os.environ.get("TESTS_FAIL_ON_SKIP") == "1"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)  # a whole module skipped


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _strict() and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _strict() and _skipped:
        terminalreporter.section("skipped tests fail this run (TESTS_FAIL_ON_SKIP=1)")
        for nodeid, why in _skipped.items():
            terminalreporter.write_line(f"{nodeid}: {why}")


# --- the offline repository (azure_vhd builds) -----------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> offline.OfflineRepo:
    """The offline repository, pacman.conf and settings.toml (archkernel.demo.offline),
    built once per test module."""
    return offline.build(tmp_path_factory.mktemp("azure-offline"))


# --- TFTP servers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tftpd_hpa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TftpdHpa]:
    """Debian's in.tftpd on 127.0.0.1, one per test module; put files with `.put()`."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running_tftpd_hpa(tmp_path_factory.mktemp("tftpd-root")))
        except TftpdUnavailable as exc:
            pytest.skip(str(exc))
        yield server


@pytest.fixture
def tftpy_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., TftpyServer]]:
    """Factory: `tftpy_server({"name": bytes | Truncate | Short | Stall}, timeout=0.25)`.

    Unknown names get TFTP error 1. `timeout` is the server's per-packet timeout and how
    often it checks for shutdown; keep it short. Servers stop at teardown, and a crash of
    the listener thread fails the test there.
    """
    with tftpy_servers(lambda: tmp_path_factory.mktemp("tftpy")) as start:
        yield start


@pytest.fixture
def evil_tftp() -> Iterator[Callable[[Behaviour], EvilServer]]:
    """Factory: `evil_tftp(Endless())` runs a malicious TFTP server on 127.0.0.1 with one
    scripted misbehaviour (tests/support/evil_tftp.py); it records what the client sent
    back. Servers stop at teardown, and a crash of one fails the test there."""
    with evil_tftp_servers() as start:
        yield start


# --- the fake Scaleway C1 --------------------------------------------------------------------


@pytest.fixture(scope="module")
def c1_base(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """The fake C1's expensive parts, built once per test module."""
    needs_c1_tools()
    return c1_template(tmp_path_factory.mktemp("c1-template"))


@pytest.fixture
def fake_c1(c1_base: Template, tmp_path: Path) -> Iterator[FakeC1]:
    """A fresh fake C1 with in.tftpd serving its files, stopped at teardown."""
    c1 = FakeC1.create(tmp_path / "c1", c1_base)
    with serving(c1):
        yield c1


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once per test session."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


# --- Azurite (azure_publish) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[emulator.Azurite]:
    """Azurite's blob service on 127.0.0.1 (tests/support/azurite.py), once per module,
    stopped at teardown; skips without Azure's SDKs (the `azure` extra) or Azurite."""
    pytest.importorskip("azure.storage.blob", reason="needs pip install '.[azure]'")
    if emulator.command() is None:
        pytest.skip("azurite-blob is not installed (.ci/setup installs it)")
    with emulator.running(tmp_path_factory.mktemp("azurite")) as running:
        yield running
