"""`archkernel demo`: the workflows on an embedded default, without a cloud or an Arch mirror.

- `offline` builds a small, real pacman repository (`linux` from Debian's kernel, Debian's
  busybox, stand-ins for the rest: `linux`, `standins`, `package`, files in `files/`) and
  the settings of an azure_vhd build from it; `debian` fetches Debian's packages into a
  download cache.
- `c1` stands up a fake Scaleway C1 on loopback: `provider` makes what its boot server
  hands out, `tftpd` runs Debian's in.tftpd over it, recording stand-ins for `kexec` and
  `systemctl` take the real ones' place.
- `azure` and `scaleway` say what a demo run made, for `archkernel demo`.

The tests build their repository and their fake C1 from the same code.
"""
