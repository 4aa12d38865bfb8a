"""Settings: sources, environment overrides, one clear line per bad value, the example file."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from archkernel import settings as s
from archkernel.errors import UserError
from archkernel.settings import cache

REPO = Path(__file__).resolve().parent.parent


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> s.Loaded:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return s.load(path, env=env or {}, cwd=tmp_path)


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_text(tmp_path, text, env)
    return info.value.message


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[azure]\ndisk_size = "30 GB"',
            "azure.disk_size: '30 GB' is not a size; write e.g. 30GiB or 30720MiB",
        ),
        (
            '[azure]\ndisk_size = "2000GiB"',
            "azure.disk_size: '2000GiB' is larger than Azure's 1023GiB",
        ),
        ('[azure]\nhostname = "bad_host"', "azure.hostname: 'bad_host' is not a valid host name"),
        ('[azure]\nhostname = "-x"', "azure.hostname: '-x' is not a valid host name"),
        ('[azure.user]\nname = "Root"', "azure.user.name: 'Root' is not a valid user name"),
        (
            '[azure]\npackages = ["ok", "no spaces"]',
            "azure.packages.1: 'no spaces' is not a valid pacman package name",
        ),
        (
            '[azure]\nlocale = "en_US.UTF-8\\nX=1"',
            "azure.locale: 'en_US.UTF-8\\nX=1' must be a single line",
        ),
        (
            '[azure]\nkernel_cmdline = "quiet; reboot"',
            "azure.kernel_cmdline: 'quiet; reboot' may hold only printable",
        ),
        (
            '[scaleway]\nkernel = "boot/zImage"',
            "scaleway.kernel: 'boot/zImage' must be an absolute path",
        ),
        (
            '[scaleway]\nbootscript = "../etc/shadow"',
            "scaleway.bootscript: '../etc/shadow' must be a relative path without '..'",
        ),
        (
            '[scaleway]\ntftp_server = "10.0.0.300"',
            "scaleway.tftp_server: '10.0.0.300' is not an IPv4 address",
        ),
        (
            "[scaleway]\ntftp_port = 70000",
            "scaleway.tftp_port: 70000 is not valid: input should be less than or equal to 65535",
        ),
        (
            '[azure]\nprovisioning = "chef"',
            "azure.provisioning: 'chef' is not valid: input should be 'cloud-init' or 'waagent'",
        ),
        (
            '[azure.user]\nname = "a"\nssh_authorized_keys = ["not a key"]',
            "azure.user.ssh_authorized_keys.0: 'not a key' is not an SSH public key line",
        ),
        ('[azure]\ndisk_sise = "8GiB"', "azure.disk_sise: unknown key (typo?)"),
        ('[azuer]\nhostname = "x"', "azuer: unknown key (typo?)"),
        ('[azure]\ngeneration = 2\nboot = "bios"', "azure: generation 2 VMs boot UEFI"),
        (
            '[azure]\nboot = "hybrid"\npartition_table = "mbr"',
            "azure: boot = 'hybrid' needs partition_table = 'gpt'",
        ),
        (
            '[azure]\nbootstrap_tarball = "a.tar.zst"',
            "azure: bootstrap_tarball needs bootstrap_sha256",
        ),
    ],
)
def test_each_bad_value_gives_one_line(tmp_path: Path, toml: str, expected: str) -> None:
    message = error_of(tmp_path, toml)
    lines = message.splitlines()[1:]
    assert len(lines) == 1, message
    assert lines[0].strip().startswith(expected), message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    message = error_of(tmp_path, 'typo = 1\n[azure]\nhostname = "a b"\ndisk_size = "1TB"\n')
    assert len(message.splitlines()) == 4
    assert "typo: unknown key" in message


def test_password_hash_is_checked_but_never_echoed(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[azure.user]\nname = "a"\npassword_hash = "hunter2"\n')
    assert "hunter2" not in message
    assert "azure.user.password_hash: **** is not a crypt(3) password hash" in message


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[azure]\nhostname = "x"\ndisk_size = = 3\n')
    assert str(tmp_path / "settings.toml") in message
    assert re.search(r"line 3, column \d+", message), message


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        # Deeper than the TOML parser can recurse: it cannot say where, only what.
        (
            "[azure]\nextra_packages = " + "[" * 500 + "]" * 500,
            {},
            "invalid settings ({file}):\n  lists or tables nested more than 32 levels deep",
        ),
        (
            "[azure]\nextra_packages = " + "[" * 40 + "]" * 40,
            {},
            "invalid settings ({file}):\n"
            "  azure.extra_packages: lists or tables nested more than 32 levels deep",
        ),
        # Dotted keys nest tables without any bracket, as deep as the line is long.
        (
            "[azure]\n" + ".".join(["user"] * 3000) + " = 1",
            {},
            "invalid settings ({file}):\n"
            "  azure.user.user: lists or tables nested more than 32 levels deep",
        ),
        (
            "",
            {"ARCHKERNEL_AZURE__EXTRA_PACKAGES": "[" * 500 + "]" * 500},
            "invalid settings (the environment):\n  azure.extra_packages: lists or tables "
            "nested more than 32 levels deep (set by ARCHKERNEL_AZURE__EXTRA_PACKAGES)",
        ),
        (
            "",
            {"ARCHKERNEL_AZURE__EXTRA_PACKAGES": "[" + "{a=" * 40 + "1" + "}" * 40 + "]"},
            "invalid settings (the environment):\n  azure.extra_packages: lists or tables "
            "nested more than 32 levels deep (set by ARCHKERNEL_AZURE__EXTRA_PACKAGES)",
        ),
    ],
    ids=["file-500", "file-40", "dotted-keys", "env-500", "env-tables"],
)
def test_deeply_nested_values_are_a_settings_error(
    tmp_path: Path, toml: str, env: dict[str, str], expected: str
) -> None:
    message = error_of(tmp_path, toml, env)
    assert message == expected.format(file=tmp_path / "settings.toml")


@pytest.mark.parametrize(
    ("toml", "env", "shown"),
    [
        ('workdir = "out\\u0000put"', {}, "'out\\x00put'"),
        ('workdir = "out\\nput"', {}, "'out\\nput'"),
        ("", {"ARCHKERNEL_WORKDIR": "out\nput"}, "'out\\nput'"),
    ],
    ids=["nul", "newline", "newline-from-env"],
)
def test_workdir_must_be_one_line_without_nul(
    tmp_path: Path, toml: str, env: dict[str, str], shown: str
) -> None:
    message = error_of(tmp_path, toml, env)
    credit = " (set by ARCHKERNEL_WORKDIR)" if env else ""
    assert message.splitlines()[1:] == [
        f"  workdir: {shown} must be a single line without NUL characters{credit}"
    ]


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        s.load(tmp_path / "nope.toml", env={}, cwd=tmp_path)


def test_source_order(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a.toml", "b.toml", "c.toml"))
    for p in (a, b, c):
        p.write_text(f'[azure]\nhostname = "{p.stem}"\n')
    (tmp_path / "settings.toml").write_text('[azure]\nhostname = "cwd"\n')
    env = {s.ENV_SETTINGS: str(c)}
    assert s.load(a, doit_var=str(b), env=env, cwd=tmp_path).settings.azure.hostname == "a"
    assert s.load(None, doit_var=str(b), env=env, cwd=tmp_path).settings.azure.hostname == "b"
    assert s.load(None, env=env, cwd=tmp_path).settings.azure.hostname == "c"
    assert s.load(None, env={}, cwd=tmp_path).settings.azure.hostname == "cwd"
    (tmp_path / "settings.toml").unlink()
    defaults = s.load(None, env={}, cwd=tmp_path)
    assert defaults.path is None and defaults.settings.azure.hostname == "archlinux"


def test_environment_overrides_and_origins(tmp_path: Path) -> None:
    env = {
        "ARCHKERNEL_AZURE__DISK_SIZE": "8GiB",
        "ARCHKERNEL_SCALEWAY__MODULES": '["virtio_net", "nbd"]',
        "ARCHKERNEL_SCALEWAY__TFTP_PORT": "6969",
        "ARCHKERNEL_AZURE__EXTENSIONS": "true",
    }
    loaded = load_text(tmp_path, '[azure]\nhostname = "fromfile"\n', env)
    az, sw = loaded.settings.azure, loaded.settings.scaleway
    assert az.disk_size == 8 * 1024**3
    assert sw.modules == ["virtio_net", "nbd"]
    assert sw.tftp_port == 6969 and az.extensions is True
    rows = {k: (v, o) for k, v, o in s.effective(loaded)}
    assert rows["azure.disk_size"] == ("8GiB", "env ARCHKERNEL_AZURE__DISK_SIZE")
    assert rows["azure.hostname"][1].startswith("file ")
    assert rows["azure.locale"][1] == "default"


def test_the_mark_of_the_run_that_started_us_is_not_a_setting(tmp_path: Path) -> None:
    # archkernel started by a command of another archkernel run inherits the run's mark.
    from archkernel.host.run import RUN_VARIABLE

    loaded = load_text(tmp_path, "", {RUN_VARIABLE: "1234:5678"})
    assert loaded.origins == {}


def test_environment_typo_is_an_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", {"ARCHKERNEL_AZURE__DISKSIZE": "8GiB"})
    assert "azure.disksize: unknown key" in message


def test_relative_paths_are_relative_to_the_settings_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "settings.toml").write_text('workdir = "out"\n[azure]\npacman_conf = "pacman.conf"\n')
    loaded = s.load(sub / "settings.toml", env={}, cwd=tmp_path)
    assert loaded.settings.workdir == sub / "out"
    assert loaded.settings.azure.pacman_conf == sub / "pacman.conf"


def test_sizes_accept_mib_and_gib() -> None:
    assert s.validate(s.AzureSettings, {"disk_size": "30720MiB"}).disk_size == 30 * 1024**3
    assert s.format_size(3 * 1024**3) == "3GiB" and s.format_size(1536 * 1024**2) == "1536MiB"


def test_subset_has_exactly_the_keys_asked_and_digests_secrets() -> None:
    user = s.validate(s.AzureUser, {"name": "arch", "password_hash": "$6$abc$def"})
    settings = s.Settings(azure=s.AzureSettings(user=user))
    got = s.subset(settings, ["azure.hostname", "azure.user"])
    assert set(got) == {"azure.hostname", "azure.user"}
    assert got["azure.user"]["password_hash"].startswith("sha256:")
    assert "$6$abc$def" not in repr(got)


def _example_keys(text: str) -> dict[str, str]:
    """key path -> line, for `key = value` lines, commented out or not."""
    keys: dict[str, str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.lstrip("# ").strip()
        if m := re.fullmatch(r"\[([a-z_.]+)\]", line):
            section = m.group(1) + "."
        elif m := re.match(r"([a-z0-9_]+) = ", line):
            keys[section + m.group(1)] = raw
    return keys


def test_example_file_shows_every_key_and_loads_to_the_defaults(tmp_path: Path) -> None:
    example = REPO / "settings.toml.example"
    text = example.read_text()
    keys = _example_keys(text)
    assert set(keys) == set(s.field_docs()), set(keys) ^ set(s.field_docs())
    for key, line in keys.items():
        assert "  # " in line, f"{key} has no comment"
    loaded = s.load(example, env={}, cwd=tmp_path)
    defaults = s.Settings(workdir=REPO / "build")
    assert loaded.settings == defaults
    tomllib.loads(text)


# --- the validated-settings cache (the boot path's settings) ----------------------------------

CACHED = """\
workdir = "work"
[scaleway]
root = "c1"
tftp_port = 6969
modules = ["nbd"]
tftp_timeout = 2
[azure]
disk_size = "2GiB"
"""


def cached_load(tmp_path: Path, env: dict[str, str] | None = None) -> s.Loaded:
    return s.load(tmp_path / "settings.toml", env=env or {}, cwd=tmp_path, cache=True)


def test_a_run_keeps_its_settings_and_the_next_run_takes_them_as_validated(
    tmp_path: Path,
) -> None:
    (tmp_path / "settings.toml").write_text(CACHED)
    cache = tmp_path / "work" / s.CACHE_FILE
    first = cached_load(tmp_path)
    s.remember(first)
    assert not first.from_cache and not cache.exists(), "the workdir does not exist yet"
    (tmp_path / "work").mkdir()
    s.remember(first)
    assert cache.is_file() and cache.stat().st_mode & 0o077 == 0
    again = cached_load(tmp_path)
    assert again.from_cache
    assert again.settings == first.settings
    assert again.settings.scaleway.root == tmp_path / "c1"
    assert isinstance(again.settings.scaleway.tftp_timeout, float)
    assert again.settings.azure.disk_size == 2 * 1024**3
    assert (again.origins, again.path, again.path_origin) == (
        first.origins,
        first.path,
        first.path_origin,
    )
    # Without `cache` (steps, settings show, dodo.py) the file is validated every time.
    assert not s.load(tmp_path / "settings.toml", env={}, cwd=tmp_path).from_cache


@pytest.mark.parametrize(
    "change",
    ["file", "env", "version", "python", "pydantic", "directory"],
)
def test_any_changed_input_is_validated_again(
    tmp_path: Path, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "settings.toml").write_text(CACHED)
    (tmp_path / "work").mkdir()
    s.remember(cached_load(tmp_path))
    env: dict[str, str] = {}
    if change == "file":
        (tmp_path / "settings.toml").write_text(CACHED.replace("6969", "0"))
    elif change == "env":
        env = {"ARCHKERNEL_SCALEWAY__TFTP_PORT": "0"}
    elif change in ("version", "python", "pydantic"):
        if change == "version":
            monkeypatch.setattr(cache, "__version__", "0.0.0-other")
        elif change == "python":
            monkeypatch.setattr(sys, "version", "3.99.0 (another build)")
        else:  # an upgraded pydantic: its files are new
            upgraded = tmp_path / "site" / "pydantic_core" / "__init__.py"
            upgraded.parent.mkdir(parents=True)
            upgraded.write_text("")
            spec = importlib.util.spec_from_file_location("pydantic_core", upgraded)
            real = importlib.util.find_spec
            monkeypatch.setattr(
                importlib.util,
                "find_spec",
                lambda name: spec if name == "pydantic_core" else real(name),
            )
        assert not cached_load(tmp_path).from_cache
        return
    else:  # the same file seen from another directory: relative paths differ
        other = tmp_path / "other"
        other.mkdir()
        (other / "settings.toml").write_text(CACHED.replace('"work"', '"../work"'))
        assert not cached_load(other).from_cache
        return
    with pytest.raises(UserError) as info:
        cached_load(tmp_path, env)
    assert "scaleway.tftp_port:" in info.value.message
    assert "greater than or equal to 1" in info.value.message


@pytest.mark.root
def test_a_damaged_or_untrusted_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text(CACHED)
    (tmp_path / "work").mkdir()
    first = cached_load(tmp_path)
    s.remember(first)
    cache = tmp_path / "work" / s.CACHE_FILE
    good = cache.read_text()
    for damaged in ["", "{not json", '{"key": 1}', good.replace('"6969"', '"x"')[:-9]]:
        cache.write_text(damaged)
        cache.chmod(0o600)
        again = cached_load(tmp_path)
        assert not again.from_cache and again.settings == first.settings
    # Anyone else could have written these values: the cache is not trusted.
    cache.write_text(good)
    cache.chmod(0o666)
    assert not cached_load(tmp_path).from_cache
    cache.chmod(0o600)
    os.chown(cache, os.geteuid() + 1, -1)
    assert not cached_load(tmp_path).from_cache
    os.chown(cache, os.geteuid(), -1)
    assert cached_load(tmp_path).from_cache


def test_settings_holding_a_secret_are_never_cached(tmp_path: Path) -> None:
    secret = "$6$salt$notwrittenanywhere"
    text = CACHED + f'[azure.user]\nname = "arch"\npassword_hash = "{secret}"\n'
    (tmp_path / "settings.toml").write_text(text)
    (tmp_path / "work").mkdir()
    loaded = cached_load(tmp_path)
    assert loaded.settings.azure.user is not None
    assert loaded.settings.azure.user.password_hash == s.Secret(secret)
    s.remember(loaded)
    assert list((tmp_path / "work").iterdir()) == []
    assert not cached_load(tmp_path).from_cache


def test_without_knowing_its_own_rules_nothing_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "settings.toml").write_text(CACHED)
    (tmp_path / "work").mkdir()
    monkeypatch.setattr(cache, "__file__", str(tmp_path / "gone" / "cache.py"))
    loaded = cached_load(tmp_path)
    s.remember(loaded)
    assert not loaded.from_cache and list((tmp_path / "work").iterdir()) == []
    assert loaded.settings.scaleway.tftp_port == 6969


def test_the_cache_is_keyed_by_every_module_of_the_settings_package() -> None:
    # The checks, the sections and the loading are split over modules: any of them can
    # change what a settings file validates to.
    named = {stamp[0] for stamp in cache._rules() if isinstance(stamp, list)}
    modules = {str(p) for p in Path(s.__file__).parent.glob("*.py")}
    assert {"types.py", "schema.py", "loading.py"} <= {Path(m).name for m in modules}
    assert modules <= named


def test_importing_the_settings_does_not_import_pydantic() -> None:
    code = (
        "import sys, archkernel.settings, archkernel.settings.display; "
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('pydantic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- errors that say what was meant, and who said it ------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[azure]\nhostnme = "x"', "azure.hostnme: unknown key (typo?); did you mean hostname?"),
        ('hostname = "x"', "hostname: unknown key (typo?); hostname belongs in [azure]"),
        ('[scaleway]\nhostname = "x"', "scaleway.hostname: unknown key (typo?); hostname belongs"),
        ('hostnme = "x"', "hostnme: unknown key (typo?); did you mean hostname in [azure]?"),
        ('[azuer]\nhostname = "x"', "azuer: unknown key (typo?); did you mean [azure]?"),
        (
            '[azure]\nworkdir = "x"',
            "azure.workdir: unknown key (typo?); workdir belongs in the top",
        ),
        ("[azure]\nxyzzy = 1", "azure.xyzzy: unknown key (typo?); see settings.toml.example"),
    ],
)
def test_an_unknown_key_names_the_key_or_section_meant(
    tmp_path: Path, toml: str, expected: str
) -> None:
    lines = error_of(tmp_path, toml).splitlines()
    assert len(lines) == 2, lines
    assert lines[1].strip().startswith(expected), lines


def test_an_error_from_the_environment_is_credited_to_its_variable(tmp_path: Path) -> None:
    env = {"ARCHKERNEL_AZURE__HOSTNAME": "a b"}
    message = error_of(tmp_path, '[azure]\nlocale = "C"\n', env)
    header, line = message.splitlines()
    assert header == "invalid settings (the environment):"
    assert line.startswith("  azure.hostname: 'a b' is not a valid host name")
    assert line.endswith(" (set by ARCHKERNEL_AZURE__HOSTNAME)")
    both = error_of(tmp_path, '[azure]\nlocale = "x y"\n', env)
    assert (
        both.splitlines()[0]
        == f"invalid settings ({tmp_path / 'settings.toml'} and the environment):"
    )
    assert "  azure.locale: 'x y' is not a locale\n" in both + "\n"  # the file's: no credit


@pytest.mark.parametrize(
    ("variable", "suggested"),
    [
        ("ARCHKERNEL_AZURE__HOSTNME", "ARCHKERNEL_AZURE__HOSTNAME"),
        ("ARCHKERNEL_HOSTNAME", "ARCHKERNEL_AZURE__HOSTNAME"),
        ("ARCHKERNEL_AZUER__HOSTNAME", "ARCHKERNEL_AZURE__HOSTNAME"),
        ("ARCHKERNEL_AZURE__USER__NAEM", "ARCHKERNEL_AZURE__USER__NAME"),
    ],
)
def test_a_misnamed_variable_gets_the_name_meant(
    tmp_path: Path, variable: str, suggested: str
) -> None:
    message = error_of(tmp_path, "", {variable: "x"})
    assert f"unknown key (typo?); did you mean {suggested}? (set by {variable})" in message


def test_a_list_from_the_environment_says_it_takes_toml_syntax(tmp_path: Path) -> None:
    for raw in ("mvneta,nbd", "[mvneta, nbd]"):
        message = error_of(tmp_path, "", {"ARCHKERNEL_SCALEWAY__MODULES": raw})
        assert (
            "a list from the environment takes TOML/JSON syntax: "
            """ARCHKERNEL_SCALEWAY__MODULES='["mvneta", "nbd"]'"""
        ) in message


@pytest.mark.parametrize("size", ["30", "0", "1048575"])
def test_a_size_without_a_unit_is_not_taken_as_bytes(tmp_path: Path, size: str) -> None:
    message = error_of(tmp_path, f"[azure]\ndisk_size = {size}\n")
    assert f"azure.disk_size: {size} has no unit: write {size}GiB or {size}MiB" in message


def test_a_size_of_whole_mib_in_bytes_is_still_taken(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "[azure]\ndisk_size = 1073741824\n")
    assert loaded.settings.azure.disk_size == 1024**3


def test_the_example_file_says_how_sizes_are_written() -> None:
    line = _example_keys((REPO / "settings.toml.example").read_text())["azure.disk_size"]
    assert "a bare number counts bytes, so 30 is refused" in line


PASSWORD = "$6$salt$cGFzdGVkYmFjaw"


def test_shown_settings_paste_back_into_a_settings_file(tmp_path: Path) -> None:
    text = (
        '[azure]\nhostname = "fromfile"\n'
        '[azure.user]\nname = "arch"\nssh_authorized_keys = ["ssh-ed25519 AAAA me@host"]\n'
        f'password_hash = "{PASSWORD}"\n'
    )
    env = {"ARCHKERNEL_AZURE__DISK_SIZE": "8GiB", "ARCHKERNEL_SCALEWAY__TFTP_TIMEOUT": "2.5"}
    loaded = load_text(tmp_path, text, env)
    shown = "\n".join(s.toml_lines(loaded))
    assert PASSWORD not in shown
    assert "# azure.user.password_hash = ********** (a secret: not shown)" in shown
    assert "# scaleway.tftp_server = (not set)" in shown
    data = tomllib.loads(shown)
    assert data["azure"]["disk_size"] == "8GiB"
    assert data["azure"]["hostname"] == "fromfile"
    assert data["azure"]["user"]["ssh_authorized_keys"] == ["ssh-ed25519 AAAA me@host"]
    assert data["scaleway"]["tftp_timeout"] == 2.5
    assert data["workdir"] == str(tmp_path / "build")
    pasted = tmp_path / "pasted.toml"
    pasted.write_text(shown + f'\nazure.user.password_hash = "{PASSWORD}"\n')
    assert s.load(pasted, env={}, cwd=tmp_path).settings == loaded.settings


# --- build.source_date_epoch and SOURCE_DATE_EPOCH ---------------------------------------------


def test_source_date_epoch_is_the_default_of_the_build_epoch(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, "", {"SOURCE_DATE_EPOCH": "1700000000"})
    assert loaded.settings.build.source_date_epoch == 1_700_000_000
    assert loaded.origins["build.source_date_epoch"] == "env SOURCE_DATE_EPOCH"
    assert load_text(tmp_path, "").settings.build.source_date_epoch is None
    # Set but empty is not set.
    empty = load_text(tmp_path, "", {"SOURCE_DATE_EPOCH": ""})
    assert empty.settings.build.source_date_epoch is None


def test_the_file_and_archkernels_own_variable_win_over_source_date_epoch(tmp_path: Path) -> None:
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    in_file = load_text(tmp_path, "[build]\nsource_date_epoch = 1600000000\n", env)
    assert in_file.settings.build.source_date_epoch == 1_600_000_000
    env["ARCHKERNEL_BUILD__SOURCE_DATE_EPOCH"] = "1500000000"
    overridden = load_text(tmp_path, "", env)
    assert overridden.settings.build.source_date_epoch == 1_500_000_000
    assert (
        overridden.origins["build.source_date_epoch"] == "env ARCHKERNEL_BUILD__SOURCE_DATE_EPOCH"
    )


def test_a_bad_source_date_epoch_names_the_variable(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", {"SOURCE_DATE_EPOCH": "yesterday"})
    assert message.startswith("invalid settings (the environment):\n  build.source_date_epoch: ")
    assert message.endswith("(set by SOURCE_DATE_EPOCH)")
    # FAT cannot date anything before 1980.
    early = error_of(tmp_path, "[build]\nsource_date_epoch = 1\n")
    assert (
        "build.source_date_epoch: 1 is not valid: input should be greater than or equal to "
        "315532800" in early
    )


def test_a_changed_source_date_epoch_is_validated_again(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text(CACHED)
    (tmp_path / "work").mkdir()
    s.remember(cached_load(tmp_path, {"SOURCE_DATE_EPOCH": "1700000000"}))
    assert cached_load(tmp_path, {"SOURCE_DATE_EPOCH": "1700000000"}).from_cache
    again = cached_load(tmp_path, {"SOURCE_DATE_EPOCH": "1700000002"})
    assert not again.from_cache
    assert again.settings.build.source_date_epoch == 1_700_000_002
