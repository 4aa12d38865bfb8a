"""Relay one connection between stdin/stdout and 127.0.0.1:PORT: `python3 relay.py PORT`.

QEMU's user networking runs a `guestfwd=...-cmd:` command once per guest connection,
with the connection on the command's stdin and stdout. This script is that command for
the fabric: it hands the guest's bytes to the local stand-in server and the answers back,
until either side closes. Standard library only and run by file name, so it works with
any Python 3 and needs nothing installed (QEMU starts it with a minimal environment).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

CHUNK = 65536


def _pump_in(sock: socket.socket) -> None:
    """stdin -> socket, then half-close the socket's sending side."""
    try:
        while chunk := os.read(0, CHUNK):
            sock.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def relay(port: int) -> int:
    """Relay stdin/stdout <-> 127.0.0.1:`port` until the server closes; exit status."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as exc:
        print(f"relay: cannot connect to 127.0.0.1:{port}: {exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    threading.Thread(target=_pump_in, args=(sock,), daemon=True).start()
    try:
        while chunk := sock.recv(CHUNK):
            os.write(1, chunk)
    except OSError:
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(relay(int(sys.argv[1])))
