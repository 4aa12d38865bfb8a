"""Module dependency resolution, checked by hand and against kmod's modprobe and depmod."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.formats import kmod
from archkernel.formats.kmod import ModulesDep, module_name, normalize
from archkernel.host.decompress import decompress_module
from archkernel.host.run import run
from tests.support.kernel import copy_modules, debian_kernel_tree, module_dir

# A small made-up kernel. Load orders below are worked out by hand from kmod's rules.
DEP = """\
kernel/drivers/net/ethernet/marvell/mvneta.ko.zst: kernel/drivers/net/phy/phylink.ko.zst \
kernel/drivers/net/mdio/fwnode_mdio.ko.zst kernel/drivers/net/phy/libphy.ko.zst
kernel/drivers/net/phy/phylink.ko.zst: kernel/drivers/net/phy/libphy.ko.zst
kernel/drivers/net/phy/libphy.ko.zst:
kernel/drivers/net/mdio/fwnode_mdio.ko.zst: kernel/drivers/net/phy/libphy.ko.zst
kernel/drivers/block/nbd.ko.zst:
kernel/fs/ext4/ext4.ko.zst: kernel/fs/mbcache.ko.zst kernel/fs/jbd2/jbd2.ko.zst
kernel/fs/jbd2/jbd2.ko.zst:
kernel/fs/mbcache.ko.zst:
kernel/arch/arm/crypto/crc32-arm-ce.ko.zst:
kernel/crypto/crc32c_generic.ko.zst:
kernel/crypto/crc32c-arm.ko.zst:
kernel/lib/libcrc32c.ko.zst: kernel/crypto/crc32c_generic.ko.zst
kernel/drivers/char/ipmi/ipmi_msghandler.ko.zst:
kernel/drivers/char/ipmi/ipmi_devintf.ko.zst: kernel/drivers/char/ipmi/ipmi_msghandler.ko.zst
kernel/fs/smb/client/cifs.ko.zst: kernel/fs/netfs/netfs.ko.zst
kernel/fs/netfs/netfs.ko.zst:
kernel/drivers/scsi/hv_storvsc.ko.zst: kernel/drivers/scsi/scsi_transport_fc.ko.zst \
kernel/drivers/scsi/scsi_mod.ko.zst kernel/drivers/scsi/scsi_common.ko.zst \
kernel/drivers/hv/hv_vmbus.ko.zst
kernel/drivers/scsi/scsi_transport_fc.ko.zst: kernel/drivers/scsi/scsi_mod.ko.zst \
kernel/drivers/scsi/scsi_common.ko.zst
kernel/drivers/scsi/scsi_mod.ko.zst: kernel/drivers/scsi/scsi_common.ko.zst
kernel/drivers/scsi/scsi_common.ko.zst:
kernel/drivers/hv/hv_vmbus.ko.zst:
kernel/drivers/dma/idma64.ko.zst:
kernel/drivers/mfd/intel-lpss.ko.zst:
""".replace("\\\n", "")

SOFTDEP = """\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crypto-crc32c
softdep jbd2 pre: crypto-crc32c
softdep cifs gcm
softdep cifs pre: netfs_extra
softdep ipmi_msghandler post: ipmi_devintf
softdep intel_lpss pre: platform:idma64
softdep nbd pre: crc32 post: no_such_module
"""

ALIAS = """\
alias crypto-crc32c crc32c_arm
alias crc32c crc32c_arm
alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
alias platform:idma64 idma64
alias of:N*T*Cmarvell,armada-370-neta mvneta
"""

BUILTIN = """\
kernel/lib/crc32.ko
kernel/drivers/net/ethernet/marvell/mvneta_bm.ko
"""

VERSION = "6.9.1-arch1-1"


@pytest.fixture
def deps() -> ModulesDep:
    return ModulesDep.parse(DEP, SOFTDEP, BUILTIN, alias_text=ALIAS, version=VERSION)


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("kernel/fs/ext4/ext4.ko", "ext4"),
        ("kernel/fs/ext4/ext4.ko.gz", "ext4"),
        ("kernel/drivers/mfd/intel-lpss.ko.xz", "intel_lpss"),
        ("kernel/drivers/block/nbd.ko.zst", "nbd"),
        ("/abs/updates/hv-vmbus.ko", "hv_vmbus"),
        ("crc32", "crc32"),
    ],
)
def test_module_name(path: str, name: str) -> None:
    assert module_name(path) == name


def test_normalize_treats_dash_and_underscore_alike() -> None:
    assert normalize("intel-lpss") == normalize("intel_lpss") == "intel_lpss"


def test_names_and_paths(deps: ModulesDep) -> None:
    assert len(deps.names()) == 23  # lines in DEP
    assert deps.names()[:3] == ["cifs", "crc32_arm_ce", "crc32c_arm"]
    assert deps.path("intel-lpss") == "kernel/drivers/mfd/intel-lpss.ko.zst"
    assert deps.path("mvneta") == "kernel/drivers/net/ethernet/marvell/mvneta.ko.zst"


def test_builtin(deps: ModulesDep) -> None:
    assert deps.is_builtin("mvneta-bm")
    assert not deps.is_builtin("mvneta")


# --- order -------------------------------------------------------------------------------------


def test_hard_dependencies_load_deepest_first(deps: ModulesDep) -> None:
    assert deps.closure(["hv_storvsc"]) == [
        "kernel/drivers/hv/hv_vmbus.ko.zst",
        "kernel/drivers/scsi/scsi_common.ko.zst",
        "kernel/drivers/scsi/scsi_mod.ko.zst",
        "kernel/drivers/scsi/scsi_transport_fc.ko.zst",
        "kernel/drivers/scsi/hv_storvsc.ko.zst",
    ]


def test_scaleway_network_modules(deps: ModulesDep) -> None:
    assert deps.closure(["phylink", "mvneta", "nbd"]) == [
        "kernel/drivers/net/phy/libphy.ko.zst",
        "kernel/drivers/net/phy/phylink.ko.zst",
        "kernel/drivers/net/mdio/fwnode_mdio.ko.zst",
        "kernel/drivers/net/ethernet/marvell/mvneta.ko.zst",
        # nbd's pre: crc32 is built in, its post: names nothing: both produce nothing
        "kernel/drivers/block/nbd.ko.zst",
    ]


def test_softdep_alias_loads_every_provider_in_alias_file_order(deps: ModulesDep) -> None:
    # jbd2 (a dependency) brings its pre-softdep crypto-crc32c, which two modules
    # provide; ext4's own identical softdep is then already done.
    assert deps.closure(["ext4"]) == [
        "kernel/crypto/crc32c-arm.ko.zst",
        "kernel/crypto/crc32c_generic.ko.zst",
        "kernel/fs/jbd2/jbd2.ko.zst",
        "kernel/fs/mbcache.ko.zst",
        "kernel/fs/ext4/ext4.ko.zst",
    ]


def test_pre_softdep_comes_after_hard_dependencies(deps: ModulesDep) -> None:
    text = "softdep phylink pre: nbd\n"
    assert ModulesDep.parse(DEP, text).closure(["phylink"]) == [
        "kernel/drivers/net/phy/libphy.ko.zst",
        "kernel/drivers/block/nbd.ko.zst",
        "kernel/drivers/net/phy/phylink.ko.zst",
    ]


def test_softdep_is_loaded_with_its_own_dependencies() -> None:
    text = "softdep nbd pre: mvneta\n"
    assert ModulesDep.parse(DEP, text).closure(["nbd"]) == [
        "kernel/drivers/net/phy/libphy.ko.zst",
        "kernel/drivers/net/mdio/fwnode_mdio.ko.zst",
        "kernel/drivers/net/phy/phylink.ko.zst",
        "kernel/drivers/net/ethernet/marvell/mvneta.ko.zst",
        "kernel/drivers/block/nbd.ko.zst",
    ]


def test_only_first_softdep_line_counts(deps: ModulesDep) -> None:
    # "softdep cifs gcm" has no pre:/post: and hides the line after it, as in kmod 30.
    assert deps.closure(["cifs"]) == [
        "kernel/fs/netfs/netfs.ko.zst",
        "kernel/fs/smb/client/cifs.ko.zst",
    ]


def test_post_softdep_follows_and_cycles_end(deps: ModulesDep) -> None:
    assert deps.closure(["ipmi_msghandler"]) == [
        "kernel/drivers/char/ipmi/ipmi_msghandler.ko.zst",
        "kernel/drivers/char/ipmi/ipmi_devintf.ko.zst",
    ]


def test_softdep_through_platform_alias_and_dash_name(deps: ModulesDep) -> None:
    assert deps.closure(["intel-lpss"]) == [
        "kernel/drivers/dma/idma64.ko.zst",
        "kernel/drivers/mfd/intel-lpss.ko.zst",
    ]


def test_duplicates_keep_first_occurrence(deps: ModulesDep) -> None:
    assert deps.closure(["libcrc32c", "ext4", "crc32c_generic"]) == [
        "kernel/crypto/crc32c_generic.ko.zst",
        "kernel/lib/libcrc32c.ko.zst",
        "kernel/crypto/crc32c-arm.ko.zst",
        "kernel/fs/jbd2/jbd2.ko.zst",
        "kernel/fs/mbcache.ko.zst",
        "kernel/fs/ext4/ext4.ko.zst",
    ]


def test_builtin_and_alias_names_as_requests(deps: ModulesDep) -> None:
    assert deps.closure(["mvneta_bm", "crc32"]) == []
    assert deps.closure(["crc32c"]) == [
        "kernel/crypto/crc32c-arm.ko.zst",
        "kernel/crypto/crc32c_generic.ko.zst",
    ]
    assert deps.closure(["of:N/ethernet@70000T<NULL>Cmarvell,armada-370-neta"])[-1] == (
        "kernel/drivers/net/ethernet/marvell/mvneta.ko.zst"
    )


def test_softdep_pattern_is_a_glob() -> None:
    text = "softdep scsi_* pre: hv_vmbus\n"
    assert ModulesDep.parse(DEP, text).closure(["scsi_common"]) == [
        "kernel/drivers/hv/hv_vmbus.ko.zst",
        "kernel/drivers/scsi/scsi_common.ko.zst",
    ]


# --- missing names and bad input ----------------------------------------------------------


def test_missing_module_names_version_and_closest(deps: ModulesDep) -> None:
    with pytest.raises(UserError) as info:
        deps.closure(["nbd", "mvnetaa"])
    assert info.value.message.startswith(
        "module 'mvnetaa' is not in 6.9.1-arch1-1's modules.dep; closest: mvneta"
    )
    assert "\n" not in info.value.message
    assert info.value.hint


def test_several_missing_modules_in_one_error(deps: ModulesDep) -> None:
    with pytest.raises(UserError, match=r"modules 'phylnk' \(closest: phylink.*\), 'zzzz' are"):
        deps.closure(["phylnk", "zzzz"])


def test_path_of_missing_module(deps: ModulesDep) -> None:
    with pytest.raises(UserError, match="module 'ext5' is not in"):
        deps.path("ext5")


def test_suggest(deps: ModulesDep) -> None:
    assert deps.suggest("mvnet")[0] == "mvneta"
    assert deps.suggest("hv-storvsc")[0] == "hv_storvsc"
    assert deps.suggest("qqqqqqqq") == []


def test_resolve_reports_missing_optional(deps: ModulesDep) -> None:
    paths, missing = deps.resolve(["mvneta"], ["mvneta_bm", "no_such_thing", "nbd"])
    assert missing == ["no_such_thing"]
    assert paths[-2:] == [
        "kernel/drivers/net/ethernet/marvell/mvneta.ko.zst",
        "kernel/drivers/block/nbd.ko.zst",
    ]
    with pytest.raises(UserError, match="'no_such_thing' is not in"):
        deps.resolve(["no_such_thing"], ["nbd"])


def test_malformed_modules_dep_line() -> None:
    with pytest.raises(UserError, match=r"modules\.dep line 2 is not 'module: dependencies'"):
        ModulesDep.parse("kernel/a.ko:\nkernel/b.ko kernel/a.ko\n")


@pytest.mark.parametrize(
    ("dep", "message"),
    [
        (
            "kernel/a.ko: ../../../etc/shadow.ko\n",
            "modules.dep line 1 names the module file '../../../etc/shadow.ko', which has a "
            "'..' component",
        ),
        (
            "kernel/a.ko:\nkernel/../../b.ko.zst:\n",
            "modules.dep line 2 names the module file 'kernel/../../b.ko.zst', which has a "
            "'..' component",
        ),
        (
            "/usr/lib/modules/x/kernel/a.ko:\n",
            "modules.dep line 1 names the module file '/usr/lib/modules/x/kernel/a.ko', which "
            "is an absolute path",
        ),
        # The case: the line splits into 'kernel/$(reboot' and '-f).ko'.
        (
            "kernel/a.ko: kernel/$(reboot -f).ko\n",
            "modules.dep line 1 names the module file 'kernel/$(reboot', which does not end "
            "in .ko, .ko.gz, .ko.xz, .ko.zst",
        ),
        (
            "kernel/$(reboot).ko:\n",
            "modules.dep line 1 names the module file 'kernel/$(reboot).ko', which is not a "
            "module name (letters, digits, '_' and '-' only)",
        ),
        (
            "kernel/a.ko:\nkernel/x;reboot.ko.xz:\n",
            "modules.dep line 2 names the module file 'kernel/x;reboot.ko.xz', which is not a "
            "module name (letters, digits, '_' and '-' only)",
        ),
        (
            "kernel/a.ko: kernel/'q'.ko\n",
            "modules.dep line 1 names the module file \"kernel/'q'.ko\", which is not a module "
            "name (letters, digits, '_' and '-' only)",
        ),
    ],
)
def test_modules_dep_paths_outside_the_tree_or_not_module_names_are_refused(
    dep: str, message: str
) -> None:
    with pytest.raises(UserError) as info:
        ModulesDep.parse(dep, version="")
    assert info.value.message == message
    assert info.value.hint == (
        "modules.dep lists paths below the module directory such as kernel/fs/ext4/ext4.ko.zst; "
        "regenerate it with `depmod -b ROOT VERSION`"
    )


def test_real_module_names_pass_the_check() -> None:
    dep = "kernel/drivers/mfd/intel-lpss.ko.xz: kernel/sound/snd-hda-codec.ko.gz\n"
    dep += "kernel/drivers/tty/serial/8250/8250_dw.ko.zst:\nkernel/sound/snd-hda-codec.ko.gz:\n"
    deps = ModulesDep.parse(dep)
    assert deps.names() == ["8250_dw", "intel_lpss", "snd_hda_codec"]
    assert deps.closure(["intel-lpss"]) == [
        "kernel/sound/snd-hda-codec.ko.gz",
        "kernel/drivers/mfd/intel-lpss.ko.xz",
    ]


# --- long and tangled soft dependencies -----------------------------------------------------


def chain(count: int, pattern: str) -> tuple[str, str]:
    """modules.dep of mod_0000 ... and a softdep line per module naming the next one `pre:`;
    `pattern` makes each line's module pattern from the module's name."""
    dep = "".join(f"kernel/mod_{i:04d}.ko:\n" for i in range(count))
    softdep = "".join(
        f"softdep {pattern.format(f'mod_{i:04d}')} pre: mod_{i + 1:04d}\n" for i in range(count - 1)
    )
    return dep, softdep


def test_a_long_chain_of_pre_softdeps_loads_the_far_end_first() -> None:
    # kmod recurses once per link; 491 links were a RecursionError here.
    deps = ModulesDep.parse(*chain(2000, "{}"))
    order = deps.closure(["mod_0000"])
    assert len(order) == 2000
    assert order[:3] == ["kernel/mod_1999.ko", "kernel/mod_1998.ko", "kernel/mod_1997.ko"]
    assert order[-2:] == ["kernel/mod_0001.ko", "kernel/mod_0000.ko"]


def test_a_long_chain_of_wildcard_softdeps_resolves() -> None:
    deps = ModulesDep.parse(*chain(1000, "{}*"))
    order = deps.closure(["mod_0000"])
    assert (len(order), order[0], order[-1]) == (1000, "kernel/mod_0999.ko", "kernel/mod_0000.ko")


def test_resolution_work_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every module's name is tried against every '*NNNN' pattern: quadratic, so bounded.
    deps = ModulesDep.parse(*chain(300, "*{}"), version=VERSION)
    monkeypatch.setattr(kmod, "MAX_PATTERN_TESTS", 5000)
    with pytest.raises(UserError) as info:
        deps.closure(["mod_0000"])
    assert info.value.message.startswith("resolving module 'mod_00")
    assert info.value.message.endswith(
        f"takes too much work: {VERSION}'s modules.softdep or modules.dep is tangled beyond "
        "any real kernel's"
    )
    monkeypatch.setattr(kmod, "MAX_PATTERN_TESTS", 10**9)
    # Three steps a module: probe it, place it between its soft dependencies, emit it.
    monkeypatch.setattr(kmod, "MAX_PROBE_STEPS", 899)
    with pytest.raises(UserError, match="takes too much work"):
        ModulesDep.parse(*chain(300, "{}")).closure(["mod_0000"])
    monkeypatch.setattr(kmod, "MAX_PROBE_STEPS", 900)
    assert len(ModulesDep.parse(*chain(300, "{}")).closure(["mod_0000"])) == 300


def test_load_reads_files(tmp_path: Path) -> None:
    moddir = tmp_path / "usr" / "lib" / "modules" / VERSION
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(DEP)
    (moddir / "modules.softdep").write_text(SOFTDEP)
    (moddir / "modules.alias").write_text(ALIAS)
    deps = ModulesDep.load(moddir)
    assert deps.version == VERSION
    assert deps.closure(["ext4"])[0] == "kernel/crypto/crc32c-arm.ko.zst"
    assert not deps.is_builtin("crc32")  # no modules.builtin in this directory


def test_load_without_modules_dep_hints_at_depmod(tmp_path: Path) -> None:
    moddir = tmp_path / "usr" / "lib" / "modules" / VERSION
    moddir.mkdir(parents=True)
    with pytest.raises(UserError, match=r"modules\.dep does not exist") as info:
        ModulesDep.load(moddir)
    assert info.value.hint == f"generate it with `depmod -b {tmp_path} {VERSION}`"


# --- decompression -----------------------------------------------------------------------

ELF = b"\x7fELF tiny module"
# `printf '\x7fELF tiny module' | zstd -c` and `printf 'not an elf' | zstd -c`
ZSTD_ELF = bytes.fromhex("28b52ffd04588100007f454c462074696e79206d6f64756c65db2aa9a1")
ZSTD_TEXT = bytes.fromhex("28b52ffd04585100006e6f7420616e20656c66b6ffdd5a")


@pytest.mark.parametrize(
    ("data", "relpath"),
    [
        (ELF, "kernel/x.ko"),
        (gzip.compress(ELF), "kernel/x.ko.gz"),
        (lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), "kernel/x.ko.xz"),
        (ZSTD_ELF, "kernel/x.ko.zst"),
    ],
)
def test_decompress_module(data: bytes, relpath: str) -> None:
    assert decompress_module(data, relpath) == ELF


@pytest.mark.integration
def test_decompress_zstd_without_libarchive_support(monkeypatch: pytest.MonkeyPatch) -> None:
    import libarchive

    def no_zstd(*args: object, **kwargs: object) -> None:
        raise ValueError("the read filter 'zstd' is not available")

    monkeypatch.setattr(libarchive, "memory_reader", no_zstd)
    if shutil.which("zstd") is None:
        pytest.skip("needs the zstd command")
    assert decompress_module(ZSTD_ELF, "kernel/x.ko.zst") == ELF
    with pytest.raises(UserError, match=r"cannot decompress kernel/x\.ko\.zst \(zstd\)"):
        decompress_module(ZSTD_ELF[:-6], "kernel/x.ko.zst")


@pytest.mark.parametrize(
    ("data", "relpath", "problem"),
    [
        (gzip.compress(ELF), "kernel/x.ko.xz", r"kernel/x\.ko\.xz is not xz-compressed"),
        (ZSTD_ELF, "kernel/x.ko.gz", r"kernel/x\.ko\.gz is not gzip-compressed"),
        (ELF, "kernel/x.ko.zst", r"kernel/x\.ko\.zst is not zstd-compressed"),
        (gzip.compress(ELF)[:-5], "kernel/x.ko.gz", r"cannot decompress kernel/x\.ko\.gz \(gzip\)"),
        (lzma.compress(ELF)[:-5], "kernel/x.ko.xz", r"cannot decompress kernel/x\.ko\.xz \(xz\)"),
        (ZSTD_ELF[:-6], "kernel/x.ko.zst", r"cannot decompress kernel/x\.ko\.zst \(zstd\)"),
        (ZSTD_TEXT, "kernel/x.ko.zst", r"kernel/x\.ko\.zst is not an ELF kernel module"),
        (b"MZ\x90\x00", "kernel/x.ko", r"kernel/x\.ko is not an ELF kernel module"),
        (ELF, "kernel/x.o", r"kernel/x\.o is not a kernel module file name"),
    ],
)
def test_decompress_module_errors(data: bytes, relpath: str, problem: str) -> None:
    with pytest.raises(UserError, match=problem) as info:
        decompress_module(data, relpath)
    assert info.value.hint


# --- cross-checks with a real Debian kernel, modprobe and depmod ----------------------------


@pytest.fixture(scope="module")
def debian_root() -> Path:
    return debian_kernel_tree()


def _modprobe_order(root: Path, version: str, config: Path, names: list[str]) -> list[str]:
    """The insmod lines of `modprobe --show-depends` for each name, relative, first kept."""
    moddir = module_dir(root)
    order: list[str] = []
    for name in names:
        out = run(
            ["modprobe", "-C", config, "-d", root, "-S", version, "--show-depends", name],
            capture=True,
        ).stdout
        for line in out.splitlines():
            words = line.split()
            if words and words[0] == "insmod":
                relpath = str(Path(words[1]).relative_to(moddir))
                if relpath not in order:
                    order.append(relpath)
    return order


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    # Keeps the host's /etc/modprobe.d and /lib/modprobe.d out of modprobe's answer.
    config = tmp_path / "modprobe.d"
    config.mkdir()
    return config


@pytest.mark.integration
@pytest.mark.parametrize(
    "names",
    [
        ["virtio_net", "nbd", "ext4"],
        ["hv_storvsc"],
        ["ext4"],
        ["btrfs"],
        ["crc_t10dif"],
        ["ipmi_msghandler"],
        ["intel-lpss"],
        ["cifs"],
        ["ksmbd"],
        ["cxl_mem"],
        ["libcrc32c", "ext4", "btrfs", "crc32c"],
    ],
    ids=lambda names: "+".join(names),
)
def test_closure_matches_modprobe(debian_root: Path, empty_config: Path, names: list[str]) -> None:
    moddir = module_dir(debian_root)
    expected = _modprobe_order(debian_root, moddir.name, empty_config, names)
    assert expected  # modprobe found them: the comparison means something
    assert ModulesDep.load(moddir).closure(names) == expected


@pytest.mark.integration
def test_hv_storvsc_order_from_formats_reference(debian_root: Path) -> None:
    names = [
        module_name(p) for p in ModulesDep.load(module_dir(debian_root)).closure(["hv_storvsc"])
    ]
    assert names == ["hv_vmbus", "scsi_common", "scsi_mod", "scsi_transport_fc", "hv_storvsc"]


@pytest.mark.integration
def test_closure_matches_modprobe_for_every_module_touched_by_softdeps(
    debian_root: Path, empty_config: Path
) -> None:
    """Every module that has a softdep or depends on one that has: where order is subtle."""
    moddir = module_dir(debian_root)
    softdep_names = {
        normalize(line.split()[1])
        for line in (moddir / "modules.softdep").read_text().splitlines()
        if line.startswith("softdep ")
    }
    candidates = []
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        chain = [path, *rest.split()]
        if any(module_name(p) in softdep_names for p in chain):
            candidates.append(module_name(path))
    assert len(candidates) > 50
    deps = ModulesDep.load(moddir)

    def compare(name: str) -> tuple[str, bool]:
        expected = _modprobe_order(debian_root, moddir.name, empty_config, [name])
        return name, deps.closure([name]) == expected

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(pool.map(compare, candidates))
    assert [name for name, same in results.items() if not same] == []


@pytest.mark.integration
def test_missing_module_in_real_kernel(debian_root: Path) -> None:
    deps = ModulesDep.load(module_dir(debian_root))
    with pytest.raises(
        UserError,
        match=r"module 'virtio_nett' is not in 6\.\S+'s modules\.dep; closest: virtio_net",
    ):
        deps.closure(["virtio_nett"])


@pytest.mark.integration
def test_compressed_modules_with_depmod_and_modprobe(
    debian_root: Path, empty_config: Path, tmp_path: Path
) -> None:
    """A tree of .ko.xz/.ko.zst/.ko modules: depmod's index, modprobe's order, our bytes."""
    src = module_dir(debian_root)
    version = src.name
    full = ModulesDep.load(src)
    wanted = ["virtio_net", "nbd", "ext4", "hv_storvsc"]
    plain = full.closure(wanted)

    root = tmp_path / "root"
    dest = root / "lib" / "modules" / version
    copy_modules(src, dest, plain)
    compressed: dict[str, str] = {}  # new relpath -> original relpath
    for i, rel in enumerate(plain):
        tool = (
            ["xz", "--check=crc32"] if i % 3 == 0 else ["zstd", "-q", "--rm"] if i % 3 == 1 else []
        )
        if tool:
            run([*tool, dest / rel])
            compressed[rel + (".xz" if tool[0] == "xz" else ".zst")] = rel
        else:
            compressed[rel] = rel
    run(["depmod", "-b", root, version])

    deps = ModulesDep.load(dest)
    order = deps.closure(wanted)
    assert order == _modprobe_order(root, version, empty_config, wanted)
    assert sorted(order) == sorted(compressed)
    assert {p.rsplit(".", 1)[-1] for p in order} == {"ko", "xz", "zst"}
    for rel in order:
        original = (src / compressed[rel]).read_bytes()
        assert decompress_module((dest / rel).read_bytes(), rel) == original


@pytest.mark.integration
def test_softdep_rules_match_modprobe(
    debian_root: Path, empty_config: Path, tmp_path: Path
) -> None:
    """Hand-written softdeps on real modules: shadowing, globs, post:, pre: after deps."""
    src = module_dir(debian_root)
    version = src.name
    names = ["nbd", "virtio_net", "ext4", "crc16", "crc-itu-t"]
    root = tmp_path / "root"
    dest = root / "lib" / "modules" / version
    copy_modules(src, dest, ModulesDep.load(src).closure(names))
    run(["depmod", "-b", root, version])
    (dest / "modules.softdep").write_text(
        "softdep nbd gcm\n"  # no pre:/post:, yet it hides the next line
        "softdep nbd pre: crc16\n"
        "softdep virtio_n* pre: nbd post: mbcache\n"
        "softdep ext4 pre: crc-itu-t\n"
    )
    deps = ModulesDep.load(dest)
    for name in ["nbd", "virtio_net", "ext4"]:
        assert deps.closure([name]) == _modprobe_order(root, version, empty_config, [name])
    assert [module_name(p) for p in deps.closure(["virtio_net", "nbd", "ext4"])] == [
        "virtio_ring",
        "virtio",
        "failover",
        "net_failover",
        "nbd",
        "virtio_net",
        "mbcache",
        "jbd2",
        "crc16",
        "crc_itu_t",
        "ext4",
    ]


@pytest.mark.integration
def test_gzip_module_from_gzip_command(debian_root: Path, tmp_path: Path) -> None:
    src = module_dir(debian_root)
    rel = ModulesDep.load(src).path("nbd")
    copy = tmp_path / "nbd.ko"
    shutil.copy2(src / rel, copy)
    run(["gzip", "-9", copy])
    data = (tmp_path / "nbd.ko.gz").read_bytes()
    assert decompress_module(data, "kernel/drivers/block/nbd.ko.gz") == (src / rel).read_bytes()


def test_public_names() -> None:
    assert set(kmod.__all__) >= {"ModulesDep", "module_name", "normalize"}
    # Decompressing may run the zstd command: a host helper, not a format module.
    assert "decompress_module" not in kmod.__all__
    assert callable(decompress_module)
