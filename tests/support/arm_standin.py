"""A stand-in for the Azure Resource Manager calls azure_publish makes, for the tests.

HTTPS on 127.0.0.1 with a throw-away certificate (clients trust it through
REQUESTS_CA_BUNDLE), answering as Microsoft.Compute documents it: managed disks (PUT with
`createOption: Upload`, GET, DELETE, `beginGetAccess`, `endGetAccess`), galleries, image
definitions and image versions (PUT, GET), every change a long-running operation
(201, or 202 for disks, + `Azure-AsyncOperation` for PUT, 202 + `Location` for POST and DELETE; the first
poll says it is still running). A disk's data lives in Azurite: creating a disk creates
its page blob there, `beginGetAccess` hands out an Azurite SAS to it. Each request is
recorded (method, path, api-version, JSON body; never the Authorization header's token).

The disk states follow Microsoft's direct-upload page: ReadyToUpload -> ActiveUpload
(grantAccess Write). "If your SAS expires during upload, and you haven't called
revoke-access yet, you can get a new SAS to continue the upload using grant-access,
again" (the page's 2019 text; its later versions no longer say it, and nothing says
otherwise): a disk in ActiveUpload is granted again. Revoking ends the upload: with the
footer written (the last 512 bytes, cookie `conectix`) the disk becomes Unattached, the
state an image version can be made from, and is never granted write access again (the
disks FAQ: upload only into a new disk); without it Azure refuses (InvalidVhd, as
Storage Explorer users quote it) and the disk stays in ActiveUpload, where it can still
be deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.azurite import Azurite

DISK_CONTAINER = "disks"


@dataclass
class Recorded:
    method: str
    path: str
    api_version: str | None
    body: Any
    authorized: bool


@dataclass
class StandIn:
    """What the stand-in holds and saw; `url` is its base URL."""

    azurite: Azurite
    url: str = ""
    ca_file: Path = Path()
    requests: list[Recorded] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    sas_seconds: list[float] = field(default_factory=list)  # lifetimes of the next grants
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, method: str | None = None, ending: str = "") -> list[Recorded]:
        """The recorded requests (not the polls) with `method` whose path ends in `ending`."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and r.path.endswith(ending)
            and not r.path.startswith("/operations/")
        ]

    def disk_state(self, disk_id: str) -> str:
        return str(self.resources[disk_id.lower()]["properties"]["diskState"])


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "standin.pem", directory / "standin.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": {"code": code, "message": message}})

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        s = self.server.standin
        with s.lock:
            s.requests.append(
                Recorded(
                    method,
                    parts.path,
                    query.get("api-version", [""])[0] or None,
                    body,
                    self.headers.get("Authorization", "").startswith("Bearer "),
                )
            )
        try:
            self.server.route(self, method, parts.path, body)
        except Exception as exc:  # a bug in the stand-in: say so to the client
            self._error(500, "StandInError", repr(exc))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, standin: StandIn) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.standin = standin

    # --- long-running operations ---------------------------------------------------------

    def _operation(self, done: dict[str, Any]) -> str:
        op = str(uuid.uuid4())
        self.standin.operations[op] = {"polls": 0, **done}
        return f"{self.standin.url}/operations/{op}"

    def _poll(self, h: _Handler, op_id: str) -> None:
        op = self.standin.operations.get(op_id)
        if op is None:
            return h._error(404, "NotFound", "no such operation")
        op["polls"] += 1
        if op["polls"] == 1:  # the first poll: still running
            if op["kind"] == "async":
                return h._send(200, {"status": "InProgress"}, {"retry-after-ms": "10"})
            return h._send(202, None, {"Location": h.path and f"{self.standin.url}{h.path}",
                                       "retry-after-ms": "10"})  # fmt: skip
        if op["kind"] == "async":
            return h._send(200, {"status": "Succeeded"})
        if op.get("result") is None:
            return h._send(204)
        return h._send(200, op["result"])

    # --- resources -----------------------------------------------------------------------

    def route(self, h: _Handler, method: str, path: str, body: Any) -> None:
        if path.startswith("/operations/"):
            return self._poll(h, path.rsplit("/", 1)[1])
        lower = path.lower()
        for action in ("/begingetaccess", "/endgetaccess"):
            if lower.endswith(action) and method == "POST":
                return self._access(h, lower[: -len(action)], action == "/begingetaccess", body)
        kind = _kind(lower)
        if kind is None:
            return h._error(404, "InvalidResourceType", f"no such resource type: {path}")
        resources = self.standin.resources
        if method == "GET":
            found = resources.get(lower)
            if found is None:
                return h._error(404, "ResourceNotFound", f"{path} was not found")
            return h._send(200, found)
        if method == "PUT":
            return self._put(h, kind, path, body)
        if method == "DELETE":
            # A disk in ActiveUpload may be deleted too: Microsoft's answer to an upload
            # that cannot be finished is to delete the disk and make it again.
            resources.pop(lower, None)
            loc = self._operation({"kind": "location", "result": None})
            return h._send(202, None, {"Location": loc, "retry-after-ms": "10"})
        return h._error(405, "MethodNotAllowed", method)

    def _put(self, h: _Handler, kind: str, path: str, body: dict[str, Any]) -> None:
        resources, lower = self.standin.resources, path.lower()
        props = dict(body.get("properties") or {})
        name = path.rsplit("/", 1)[1]
        if kind == "disks":
            creation = props.get("creationData", {})
            if creation.get("createOption") != "Upload" or not creation.get("uploadSizeBytes"):
                return h._error(400, "InvalidParameter", "this stand-in makes upload disks only")
            size = int(creation["uploadSizeBytes"])
            if size % 512 or (size - 512) % (1024 * 1024):
                return h._error(400, "InvalidParameter", "uploadSizeBytes: whole MiB + 512")
            self.standin.azurite.container(DISK_CONTAINER)
            self.standin.azurite.blob(DISK_CONTAINER, name).create_page_blob(size)
            props["diskState"] = "ReadyToUpload"
        if kind == "versions":
            source = props.get("storageProfile", {}).get("osDiskImage", {}).get("source", {})
            disk = resources.get(str(source.get("id", "")).lower())
            if disk is None or disk["properties"]["diskState"] != "Unattached":
                return h._error(409, "InvalidParameter", "the source disk is not Unattached")
        props["provisioningState"] = "Succeeded"
        resource = {
            "id": path,
            "name": name,
            "type": _TYPES[kind],
            "location": body.get("location"),
            "properties": props,
        }
        for key in ("sku", "tags"):
            if key in body:
                resource[key] = body[key]
        resources[lower] = resource
        op = self._operation({"kind": "async"})
        creating = {**resource, "properties": {**props, "provisioningState": "Creating"}}
        # Disks answer 202 (their API lists 200 and 202), gallery resources 201.
        status = 202 if kind == "disks" else 201
        return h._send(status, creating, {"Azure-AsyncOperation": op, "retry-after-ms": "10"})

    def _access(self, h: _Handler, disk: str, grant: bool, body: Any) -> None:
        found = self.standin.resources.get(disk)
        if found is None:
            return h._error(404, "ResourceNotFound", f"{disk} was not found")
        props, name = found["properties"], found["name"]
        if grant:
            if props["diskState"] not in ("ReadyToUpload", "ActiveUpload"):
                return h._error(409, "OperationNotAllowed", f"disk state {props['diskState']}")
            if body.get("access") != "Write" or body.get("fileFormat") != "VHD":
                return h._error(400, "InvalidParameter", "this stand-in grants VHD writes")
            seconds = (
                self.standin.sas_seconds.pop(0)
                if self.standin.sas_seconds
                else float(body["durationInSeconds"])
            )
            props["diskState"] = "ActiveUpload"
            sas = self.standin.azurite.sas_url(DISK_CONTAINER, name, seconds=seconds)
            loc = self._operation({"kind": "location", "result": {"accessSAS": sas}})
        else:
            if props["diskState"] == "ActiveUpload":
                if not self._footer_written(name):
                    return h._error(
                        400,
                        "InvalidVhd",
                        f"The specified cookie value in VHD footer indicates that disk '{name}' "
                        "is not a supported VHD. Disk is expected to have cookie value "
                        "'conectix'.",
                    )
                props["diskState"] = "Unattached"
            loc = self._operation({"kind": "location", "result": None})
        return h._send(202, None, {"Location": loc, "retry-after-ms": "10"})

    def _footer_written(self, name: str) -> bool:
        client = self.standin.azurite.blob(DISK_CONTAINER, name)
        size = client.get_blob_properties().size
        footer: bytes = client.download_blob(offset=size - 512, length=512).readall()
        return footer[:8] == b"conectix"


_TYPES = {
    "disks": "Microsoft.Compute/disks",
    "galleries": "Microsoft.Compute/galleries",
    "images": "Microsoft.Compute/galleries/images",
    "versions": "Microsoft.Compute/galleries/images/versions",
}


def _kind(path: str) -> str | None:
    """disks, galleries, images or versions, by the path's shape."""
    parts = path.strip("/").split("/")
    if len(parts) < 8 or parts[0] != "subscriptions" or parts[5] != "microsoft.compute":
        return None
    tail = parts[6:]
    shapes = {2: "disks" if tail[0] == "disks" else "galleries", 4: "images", 6: "versions"}
    if tail[0] not in ("disks", "galleries"):
        return None
    return shapes.get(len(tail))


@contextlib.contextmanager
def running(azurite: Azurite, directory: Path) -> Iterator[StandIn]:
    """The stand-in on 127.0.0.1 (a free port), its certificate in `directory`."""
    cert, key = make_certificate(directory)
    standin = StandIn(azurite, ca_file=cert)
    server = _Server(standin)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    standin.url = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class StaticToken:
    """A TokenCredential that hands out a fixed token (the stand-in checks none)."""

    def __init__(self, token: str = "standin-token") -> None:
        self.token = token
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.extend(scopes)
        expires = int(datetime.datetime.now(datetime.UTC).timestamp()) + 3600
        return AccessToken(self.token, expires)
