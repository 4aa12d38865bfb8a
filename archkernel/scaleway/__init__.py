"""Scaleway C1: boot the Arch kernel by patching the provider's initrd and kexec'ing.

Deciding, pure and tested with plain asserts: `bootscript` (which initrd the U-Boot
script boots), `kernel` (which kernel and module directory: pacman's database, pkgbase,
the image's version; `pacman` reads the database), `modules` (the modules and their
dependencies, what the added archive holds), `kconfig` (drivers modules.dep does not
name, from the kernel config), `modparams` (module parameters for each insmod),
`scripts` (the new /init, what the shutdown script does for kexec), `cmdline` (the kexec
command line and argv), `metadata` (the kill switch's tags).
Acting: `steps`, one function per numbered step, each returning its plan; `workspace`
holds the paths and the record step 1 leaves for the others.
"""
