"""Scaleway C1: boot the Arch kernel by patching the provider's initrd and kexec'ing.

Deciding, pure and tested with plain asserts: `bootscript` (which initrd the U-Boot
script boots), `modules` (the kernel version, the modules and their dependencies, what
the added archive holds), `scripts` (the new /init, the shutdown script's `kexec -e`),
`cmdline` (the kexec command line and argv), `metadata` (the kill switch's tags).
Acting: `steps`, one function per numbered step, each returning its plan; `workspace`
holds the paths and the record step 1 leaves for the others.
"""
