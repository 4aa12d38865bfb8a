"""The instance metadata service stand-in (169.254.169.254).

Answers as Azure's IMDS does: only requests with the `Metadata: true` header and an
`api-version`, otherwise 400. `/metadata/instance` is the whole document (compute: name,
osProfile, publicKeys, vmId, ...; network: the one NIC with its MAC and address);
`/metadata/instance/compute/osProfile/...` walks into it (`format=text` gives a leaf as
text). `/metadata/reprovisiondata` exists only for pre-provisioned VMs: 404, as for every
other path (all recorded).
"""

from __future__ import annotations

import json
import socket
from typing import Any

from archkernel.azure.fabric.ovf import Provisioning
from archkernel.azure.fabric.server import FabricServer, Recorded, Reply

ADDRESS = "169.254.169.254"
JSON = "application/json; charset=utf-8"


def instance_document(
    spec: Provisioning, *, mac: str, address: str, subnet: tuple[str, int]
) -> dict[str, Any]:
    """IMDS's `metadata/instance` for the VM `spec` describes, with one NIC (`mac` as
    `52:54:00:12:34:56`, its DHCP `address` in `subnet` = (network, prefix length))."""
    return {
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "location": "local",
            "name": spec.hostname,
            "offer": "",
            "osProfile": {
                "adminUsername": spec.username or "",
                "computerName": spec.hostname,
                "disablePasswordAuthentication": str(spec.disable_password_auth).lower(),
            },
            "osType": "Linux",
            "provider": "Microsoft.Compute",
            "publicKeys": [{"keyData": k.value, "path": k.path} for k in spec.public_keys],
            "resourceGroupName": "archkernel",
            "tags": "",
            "userData": "",
            "vmId": spec.vm_id,
            "vmSize": "Standard_D2s_v5",
            "zone": "",
        },
        "network": {
            "interface": [
                {
                    "ipv4": {
                        "ipAddress": [{"privateIpAddress": address, "publicIpAddress": ""}],
                        "subnet": [{"address": subnet[0], "prefix": str(subnet[1])}],
                    },
                    "ipv6": {"ipAddress": []},
                    # IMDS writes the MAC as 12 upper-case hex digits.
                    "macAddress": mac.replace(":", "").upper(),
                }
            ]
        },
    }


def _walk(document: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(document, dict) and part in document:
            document = document[part]
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            raise KeyError(part)
    return document


class Imds(FabricServer):
    """IMDS serving `document` (see `instance_document`)."""

    name = "imds"

    def __init__(self, document: dict[str, Any], sock: socket.socket | None = None) -> None:
        super().__init__(sock)
        self.document = document

    def respond(self, request: Recorded) -> Reply:
        if request.headers.get("metadata", "").lower() != "true":
            return Reply(
                400, b'{"error": "Bad request. Required metadata header not specified"}', JSON
            )
        if "api-version" not in request.query:
            return Reply(400, b'{"error": "Bad request. api-version was not specified"}', JSON)
        parts = [p for p in request.path.split("/") if p]
        if request.method != "GET" or parts[:2] != ["metadata", "instance"]:
            return Reply(404, b'{"error": "Not found"}', JSON)
        try:
            value = _walk(self.document, parts[2:])
        except KeyError:
            return Reply(404, b'{"error": "Not found"}', JSON)
        if request.query.get("format") == "text" and not isinstance(value, (dict, list)):
            return Reply(200, str(value).encode())
        return Reply(200, json.dumps(value).encode(), JSON)

    def asked(self, prefix: str = "/metadata/instance") -> bool:
        """Whether the VM got an answer (200) under `prefix`."""
        return any(r.path.startswith(prefix) and r.status == 200 for r in self.requests)
