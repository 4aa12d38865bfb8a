"""Support code shared by the tests and the benchmarks (bench/), in one place.

- `kernel`: a real Debian kernel (image and modules), unpacked and indexed once, or a skip.
  The download cache ($ARCHKERNEL_TEST_CACHE) and `apt-get download` behind it are the
  product's, `archkernel.demo.debian`, shared with `archkernel demo`.
- `buildenv`: a Debian build environment tarball and throw-away signing keys.
- `tftp`: Debian's in.tftpd (`archkernel.demo.tftpd`) and a tftpy server that injects faults.
- `c1`: the fake Scaleway C1 of `archkernel.demo.c1` (real tools, fake machine), run as
  the tests run it.
- `azure`: running azure_vhd builds as a user would, and reading what they left.
- `grub`: a small BIOS disk with GRUB installed, for the GRUB, ESP, UEFI and QEMU tests.
- `demo_workflow`: a three-step workflow that proves the step machinery with real doit.

The pytest fixtures built on these live in tests/conftest.py.
"""
