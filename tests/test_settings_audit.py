"""A step that reads a setting it did not declare fails under the audit; a declared one runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from doit.exceptions import TaskFailed

from archkernel.plan import Plan, reads
from archkernel.settings import Loaded, Settings, load
from archkernel.settings.audit import covered, recording, undeclared
from tasks.steps import ENV_AUDIT, Step, Workflow, _action


def test_recording_names_every_value_read_by_its_dotted_key(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text('[azure.user]\nname = "arch"\n')
    seen: set[str] = set()
    s = recording(load(str(tmp_path / "settings.toml")).settings, seen)
    assert s.azure.hostname == "archlinux"
    assert s.azure.user is not None
    assert s.azure.user.name == "arch"
    _ = s.workdir
    assert seen == {"azure.hostname", "azure.user.name", "workdir"}


def test_methods_and_properties_of_a_section_record_what_they_read() -> None:
    seen: set[str] = set()
    s = recording(Settings(), seen)
    assert s.azure.firmware == "bios"  # a property over generation and boot
    assert {"azure.generation", "azure.boot"} <= seen
    assert isinstance(s.azure, type(Settings().azure))


def test_a_section_declaration_covers_its_keys() -> None:
    assert covered("azure.user.name", ["azure.user"])
    assert covered("azure.hostname", ["azure.hostname"])
    assert not covered("azure.hostname", ["azure.host"])
    assert not covered("azure.user", ["azure.user.name"])
    assert undeclared({"azure.user.name", "azure.locale", "workdir"}, ["azure.user"]) == [
        "azure.locale",
        "workdir",
    ]


@reads("azure.hostname")
def declared(settings: Settings) -> Plan:
    """write the host name"""
    return Plan().do("use it", lambda: settings.azure.hostname)


@reads("azure.hostname")
def reads_more(settings: Settings) -> Plan:
    """write the host name and the locale"""
    return Plan().do("use them", lambda: (settings.azure.hostname, settings.azure.locale))


def _run_step(function, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv(ENV_AUDIT, "1")
    monkeypatch.chdir(tmp_path)
    loaded: Loaded = load(None)
    step = Step.of(function)
    workflow = Workflow("audit", "audit", lambda s: [step])
    workflow.steps(loaded)
    return step, _action(workflow, step, loaded.settings)()


def test_a_step_reading_an_undeclared_setting_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, result = _run_step(reads_more, tmp_path, monkeypatch)
    assert isinstance(result, TaskFailed)
    assert "azure.locale" in str(result)
    assert "azure.hostname" not in str(result).split("declare:")[1]


def test_a_step_reading_only_what_it_declares_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step, result = _run_step(declared, tmp_path, monkeypatch)
    assert result is None
    assert step.settings == ("azure.hostname",)
    assert (step.id, step.doc) == ("01_declared", "write the host name")
