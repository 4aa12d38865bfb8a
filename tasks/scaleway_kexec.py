"""scaleway_kexec: boot the Arch kernel on a Scaleway C1 by patching the provider's initrd.

Steps 1, 2, 7 and 8 always run (they read the live system, the boot server and /run);
steps 3-6 run only when what they read changed, so an unchanged bootscript and kernel
give the cached boot path: fetch the bootscript, kexec.
"""

from __future__ import annotations

from archkernel.scaleway import steps as sw
from archkernel.settings import Loaded
from tasks.steps import Step, Workflow

TFTP = [
    "scaleway.tftp_port",
    "scaleway.tftp_timeout",
    "scaleway.tftp_retries",
    "scaleway.tftp_blksize",
]


def build(loaded: Loaded) -> list[Step]:
    """The numbered steps for these settings."""
    s = loaded.settings
    cfg, p = s.scaleway, sw.paths(s)
    output = p.system(cfg.output_initrd)
    return [
        Step(
            1,
            "check",
            "check root, kexec, the kill switch; find the kernel, its version and the server",
            lambda: sw.step_check(s),
            targets=[p.check],
            settings=[
                "scaleway.root",
                "scaleway.kernel",
                "scaleway.kernel_version",
                "scaleway.tftp_server",
                "scaleway.fallback_tftp_server",
                "scaleway.disable_tag",
            ],
            always=True,
        ),
        Step(
            2,
            "fetch_bootscript",
            "fetch the U-Boot bootscript over TFTP",
            lambda: sw.step_fetch_bootscript(s),
            targets=[p.bootscript],
            file_dep=[p.check],
            settings=["scaleway.bootscript", *TFTP],
            always=True,
        ),
        Step(
            3,
            "fetch_initrd",
            "find the initrd in the bootscript and fetch it over TFTP",
            lambda: sw.step_fetch_initrd(s),
            targets=[p.uinitrd, p.initrd_info],
            file_dep=[p.bootscript],
            settings=TFTP,
        ),
        Step(
            4,
            "unpack",
            "check the initrd's U-Boot header and every cpio entry",
            lambda: sw.step_unpack(s),
            targets=[p.payload, p.listing],
            file_dep=[p.uinitrd, p.initrd_info],
        ),
        Step(
            5,
            "modules",
            "resolve the modules' dependencies, decompress them, write the new /init",
            lambda: sw.step_modules(s),
            targets=[p.modules_manifest],
            file_dep=[p.check],
            settings=["scaleway.modules", "scaleway.optional_modules"],
        ),
        Step(
            6,
            "pack",
            "append the modules and the new /init to the initrd, written atomically",
            lambda: sw.step_pack(s),
            targets=[p.packed, output],
            file_dep=[p.payload, p.listing, p.modules_manifest],
            settings=["scaleway.output_initrd", "scaleway.compression"],
        ),
        Step(
            7,
            "shutdown",
            "make the shutdown initrd end with kexec -e",
            lambda: sw.step_shutdown(s),
            file_dep=[p.check],
            always=True,
        ),
        Step(
            8,
            "kexec",
            "kexec -l the Arch kernel with the patched initrd, then systemctl kexec",
            lambda: sw.step_kexec(s),
            file_dep=[p.check, output],
            settings=["scaleway.extra_cmdline", "scaleway.dtb"],
            always=True,
            commands=lambda: sw.kexec_plan(s) if p.check.exists() else [],
        ),
    ]


WORKFLOWS = [
    Workflow(
        "scaleway_kexec",
        "boot the Arch kernel on a Scaleway C1: patch the provider's initrd, kexec",
        build,
        halted=lambda loaded: sw.halted(loaded.settings),
    )
]
