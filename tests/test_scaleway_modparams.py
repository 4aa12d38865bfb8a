"""Module parameters: from the kexec command line and `module_options` to each insmod.

busybox `insmod` does not read `module.param=value` from the kernel command line, so the
new /init passes them; here the parsing, the checks, the merge, the /init lines, and the
lines run in a real shell with a stand-in insmod that records its arguments.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.scaleway import modparams, scripts
from archkernel.scaleway.modparams import Param
from archkernel.settings import load

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
C1_LINE = (
    "console=ttyS0,115200 root=/dev/nbd0 nbd.max_parts=8 nbd.nbds_max=3 boot=local "
    'virtio-net.napi_tx=1 "mvneta.rxq_def=1" mvneta.txq_number="8" dummy.numdummies '
    "quiet x.=1 .y=2 archkernel"
)


def test_from_cmdline_finds_every_module_parameter() -> None:
    assert modparams.from_cmdline(C1_LINE) == {
        "nbd": [Param("max_parts", "8"), Param("nbds_max", "3")],
        "virtio_net": [Param("napi_tx", "1")],
        "mvneta": [Param("rxq_def", "1"), Param("txq_number", "8")],
        "dummy": [Param("numdummies", None)],
    }


def test_from_cmdline_keeps_a_quoted_value_with_spaces() -> None:
    assert modparams.from_cmdline('dyndbg="file nbd.c +p" nbd.label="root disk"') == {
        "nbd": [Param("label", "root disk")]
    }


@pytest.mark.parametrize(
    "line",
    ["nbd.nbds-max\x01=3", "nbd.$(reboot)=1", "nbd.x=\x1b[2J"],
)
def test_from_cmdline_refuses_what_insmod_must_not_get(line: str) -> None:
    with pytest.raises(UserError, match="the kernel command line's"):
        modparams.from_cmdline(line)
    with pytest.raises(UserError, match="the kernel command line's"):
        modparams.for_modules(["nbd"], line, [])
    # A module that is not loaded: its words are nobody's business.
    assert modparams.for_modules(["dummy"], line, []) == {}


def test_for_modules_merges_the_setting_and_the_command_line() -> None:
    got = modparams.for_modules(
        ["virtio_net", "nbd", "failover"],
        "nbd.nbds_max=3 virtio_net.napi_tx=1",
        ["nbd nbds_max=16 max_part=8", "failover x=1"],
    )
    assert got == {
        "virtio_net": [Param("napi_tx", "1")],
        # the setting's max_part stays; nbds_max from the command line wins, in its place
        "nbd": [Param("nbds_max", "3"), Param("max_part", "8")],
        "failover": [Param("x", "1")],
    }
    assert modparams.for_modules(["virtio_ring"], "nbd.nbds_max=3", []) == {}


def test_names_compare_as_the_kernel_compares_them() -> None:
    got = modparams.for_modules(["virtio_net"], "virtio-net.napi-tx=0", ["virtio_net napi_tx=1"])
    assert got == {"virtio_net": [Param("napi-tx", "0")]}


def test_insmod_args_quote_a_value_with_spaces_as_the_kernel_reads_it() -> None:
    args = modparams.insmod_args([Param("nbds_max", "3"), Param("label", "a b"), Param("f", None)])
    assert args == ["nbds_max=3", 'label="a b"', "f"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("nbd", "names no parameter"),
        ("nbd; reboot x=1", "does not start with a kernel module name"),
        ('nbd label="a"b"', "unbalanced"),
        ("nbd x=\x07", "control characters"),
        ("nbd $(id)=1", "is not letters, digits"),
    ],
)
def test_options_lines_are_checked(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        modparams.parse_options_line(line)


def test_module_options_is_a_checked_setting(tmp_path: Path) -> None:
    (tmp_path / "ok.toml").write_text('[scaleway]\nmodule_options = ["nbd nbds_max=3"]\n')
    assert load(tmp_path / "ok.toml", env={}).settings.scaleway.module_options == ["nbd nbds_max=3"]
    (tmp_path / "bad.toml").write_text('[scaleway]\nmodule_options = ["nbd"]\n')
    with pytest.raises(UserError) as info:
        load(tmp_path / "bad.toml", env={})
    assert "scaleway.module_options" in str(info.value) + str(info.value.hint)


def test_declared_parameters_come_from_modinfo() -> None:
    modinfo = b"\x00license=GPL\x00parm=nbds_max:number of devices\x00parmtype=nbds_max:int"
    modinfo += b"\x00parmtype=max_part:int\x00description=Network Block Device\x00"
    assert modparams.declared(modinfo) == {"nbds_max", "max_part"}
    assert modparams.unknown(["nbds_max=3", "max_parts=8", "max-part=2"], modinfo) == [
        "max_parts=8"
    ]


@pytest.mark.integration
def test_declared_parameters_of_a_real_module() -> None:
    from archkernel.host.decompress import decompress_module
    from tests.support.kernel import debian_kernel_tree, module_dir

    moddir = module_dir(debian_kernel_tree())
    (nbd,) = moddir.glob("kernel/drivers/block/nbd.ko*")
    data = decompress_module(nbd.read_bytes(), nbd.name)
    assert {"nbds_max", "max_part"} <= modparams.declared(data)


# --- the /init lines ---------------------------------------------------------------------------


def test_init_script_passes_the_parameters_to_insmod() -> None:
    script = scripts.init_script(
        ["kernel/drivers/block/nbd.ko.zst", "kernel/drivers/net/dummy.ko"],
        "6.2.10-1-ARCH",
        {"nbd": ["nbds_max=3", 'label="a b"']},
    )
    assert script.splitlines()[5:9] == [
        "echo 'archkernel: loading nbd with nbds_max=3 label=\"a b\"'",
        "insmod /archkernel/modules/nbd.ko nbds_max=3 'label=\"a b\"' || "
        "{ echo 'archkernel: loading nbd with nbds_max=3 label=\"a b\" failed; again without'; "
        "insmod /archkernel/modules/nbd.ko || echo 'archkernel: loading nbd failed'; }",
        "echo 'archkernel: loading dummy'",
        "insmod /archkernel/modules/dummy.ko || echo 'archkernel: loading dummy failed'",
    ]


def test_init_script_refuses_a_parameter_with_control_characters() -> None:
    with pytest.raises(UserError, match="has control characters") as caught:
        scripts.init_script(["kernel/nbd.ko"], "6.9", {"nbd": ["x=1\nreboot"]})
    assert caught.value.hint and "module_options" in caught.value.hint


@pytest.mark.integration
@pytest.mark.parametrize("refuse", [False, True], ids=["accepted", "refused, loaded again"])
def test_init_lines_give_insmod_its_parameters_in_a_real_shell(
    refuse: bool, tmp_path: Path
) -> None:
    if not Path(BUSYBOX).is_file():
        pytest.skip("busybox not installed")
    script = scripts.init_script(
        ["kernel/drivers/block/nbd.ko"], "6.9", {"nbd": ["nbds_max=3", 'label="a b"']}
    )
    (tmp_path / "init.scw").write_text("echo provider\n")
    # The stand-in insmod prints each argument on its own line, then fails when told to
    # for a call with parameters (as a kernel refusing one would).
    fail = '[ "$#" -gt 1 ] && return 1; ' if refuse else ""
    stand_ins = f'insmod() {{ for a in "$@"; do echo "arg:$a"; done; {fail}return 0; }}\n'
    stand_ins += "busybox() { :; }\n"
    body = script.replace("/bin/busybox ", "busybox ").replace(". /init.scw", ". ./init.scw")
    out = subprocess.run(
        [BUSYBOX, "sh", "-c", stand_ins + body],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.splitlines()
    first = ["arg:/archkernel/modules/nbd.ko", "arg:nbds_max=3", 'arg:label="a b"']
    if not refuse:
        assert out == [
            'archkernel: loading nbd with nbds_max=3 label="a b"',
            *first,
            "archkernel: starting the provider init",
            "provider",
        ]
    else:
        assert out[1:4] == first
        assert out[4:6] == [
            'archkernel: loading nbd with nbds_max=3 label="a b" failed; again without',
            "arg:/archkernel/modules/nbd.ko",
        ]
        assert out[-1] == "provider"
