"""The host agent plugin stand-in (HostGAPlugin, 168.63.129.16 port 32526).

On Azure the wireserver's address also answers on port 32526: the plugin through which
waagent fetches Fast Track goal states (`vmSettings`), extension artifacts, and uploads
status when it cannot write to its status blob. waagent asks it for `vmSettings` on every
goal state; with no answer at all, waagent 2.7's error path fails on Python 3.10 and later
(it formats the error with `traceback.format_exception(etype=...)`) and it never gets its
goal state. So the stand-in answers as a plugin without Fast Track does:
- `GET /health`: 200;
- `GET /versions`: the one API version the agent speaks;
- `GET /vmSettings`: 404, which tells the agent that Fast Track is not supported (it then
  takes the goal state from the wireserver alone, as every agent before Fast Track did);
- anything else: 404, recorded.
"""

from __future__ import annotations

import json
import socket

from archkernel.azure.fabric.server import FabricServer, Recorded, Reply

PORT = 32526
API_VERSION = "2015-09-01"
JSON = "application/json; charset=utf-8"


class HostPlugin(FabricServer):
    """The HostGAPlugin stand-in: healthy, no Fast Track."""

    name = "hostplugin"

    def __init__(self, sock: socket.socket | None = None) -> None:
        super().__init__(sock)

    def respond(self, request: Recorded) -> Reply:
        if request.method == "GET" and request.path == "/health":
            return Reply(200)
        if request.method == "GET" and request.path == "/versions":
            return Reply(200, json.dumps([API_VERSION]).encode(), JSON)
        return Reply(404, b"not served by the fabric stand-in")
