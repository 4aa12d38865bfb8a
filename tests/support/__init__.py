"""Support code shared by the tests and the benchmarks (bench/), in one place.

- `cache`: the test cache ($ARCHKERNEL_TEST_CACHE) and the lock that fills it one process
  at a time.
- `apt`: Debian packages fetched with `apt-get download` into that cache.
- `kernel`: a real Debian kernel (image and modules), unpacked and indexed once.
- `buildenv`: a Debian build environment tarball and throw-away signing keys.
- `tftp`: Debian's in.tftpd and a tftpy server that injects faults.
- `c1`: a fake Scaleway C1 (real tools, fake machine).
- `azure`: running azure_vhd builds as a user would, and reading what they left.
- `grub`: a small BIOS disk with GRUB installed, for the GRUB, ESP, UEFI and QEMU tests.
- `demo_workflow`: a three-step workflow that proves the step machinery with real doit.

The pytest fixtures built on these live in tests/conftest.py.
"""
