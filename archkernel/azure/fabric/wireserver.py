"""The wireserver stand-in (168.63.129.16): goal state, its documents, health reports.

What cloud-init's Azure datasource and waagent ask while provisioning, over Azure's wire
protocol (version 2012-11-30):
- `GET /?comp=versions`: the protocol versions (waagent checks its own is supported);
- `GET /machine/?comp=goalstate`: the goal state (incarnation, container id, role instance
  id, and the URLs of its documents); there are no certificates: the user's key comes on
  the DVD and from IMDS, so the goal state names no `Certificates` document and neither
  agent asks for one;
- the documents it names: hosting environment, shared configuration, full configuration;
- `POST /machine?comp=health`: the health report, `Ready` once provisioning is done, or
  `NotReady` with the agent's sub-status (`ProvisioningFailed`) and why;
- `POST /machine?comp=roleProperties` and `?comp=telemetrydata`: accepted and recorded.
Anything else is answered 404 and recorded too, so a test sees what an agent wanted.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from xml.etree import ElementTree

from archkernel.azure.fabric.server import FabricServer, Recorded, Reply
from archkernel.formats.text import clean_text

PROTOCOL_VERSION = "2012-11-30"
ADDRESS = "168.63.129.16"
XML = "text/xml; charset=utf-8"


@dataclass(frozen=True)
class GoalState:
    """The identifiers of the one goal state the stand-in serves."""

    container_id: str
    instance_id: str
    incarnation: int = 1
    role_name: str = "archkernel-boottest"
    deployment_name: str = "archkernel-boottest"
    address: str = "10.0.0.4"  # the VM's, as the shared configuration names it


def _xml(root: ElementTree.Element) -> bytes:
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=True))


def _el(
    parent: ElementTree.Element, tag: str, text: str | None = None, **attrib: str
) -> ElementTree.Element:
    element = ElementTree.SubElement(parent, tag, attrib)
    if text is not None:
        element.text = text
    return element


def versions_xml() -> bytes:
    """The answer to `?comp=versions`."""
    root = ElementTree.Element("Versions")
    _el(_el(root, "Preferred"), "Version", PROTOCOL_VERSION)
    _el(_el(root, "Supported"), "Version", PROTOCOL_VERSION)
    return _xml(root)


def goal_state_xml(state: GoalState, base: str = f"http://{ADDRESS}:80") -> bytes:
    """The goal state document, its documents' URLs under `base`."""
    root = ElementTree.Element("GoalState")
    _el(root, "Version", PROTOCOL_VERSION)
    _el(root, "Incarnation", str(state.incarnation))
    machine = _el(root, "Machine")
    _el(machine, "ExpectedState", "Started")
    _el(machine, "StopRolesDeadlineHint", "300000")
    container = _el(root, "Container")
    _el(container, "ContainerId", state.container_id)
    instance = _el(_el(container, "RoleInstanceList"), "RoleInstance")
    _el(instance, "InstanceId", state.instance_id)
    _el(instance, "State", "Started")
    config = _el(instance, "Configuration")
    query = f"incarnation={state.incarnation}"
    _el(
        config,
        "HostingEnvironmentConfig",
        f"{base}/machine/{state.container_id}/hostingenv?{query}",
    )
    _el(config, "SharedConfig", f"{base}/machine/{state.container_id}/sharedconfig?{query}")
    _el(config, "FullConfig", f"{base}/machine/{state.container_id}/fullconfig?{query}")
    _el(config, "ConfigName", f"{state.instance_id}.1.xml")
    return _xml(root)


def hosting_env_xml(state: GoalState) -> bytes:
    """The hosting environment document: what waagent reads of it (VM, role, deployment)."""
    root = ElementTree.Element(
        "HostingEnvironmentConfig", version="1.0.0.0", goalStateIncarnation=str(state.incarnation)
    )
    _el(root, "StoredCertificates")
    deployment = _el(root, "Deployment", name=state.deployment_name, guid=state.container_id)
    _el(deployment, "Incarnation", number=str(state.incarnation), instance=state.instance_id)
    _el(root, "Role", name=state.role_name, guid=state.instance_id)
    return _xml(root)


def shared_config_xml(state: GoalState) -> bytes:
    root = ElementTree.Element(
        "SharedConfig", version="1.0.0.0", goalStateIncarnation=str(state.incarnation)
    )
    _el(root, "Deployment", name=state.deployment_name, guid=state.container_id)
    _el(_el(root, "Instances"), "Instance", id=state.instance_id, address=state.address)
    return _xml(root)


@dataclass(frozen=True)
class HealthReport:
    """What a health report says: `Ready` or `NotReady`, and for `NotReady` the agent's
    sub-status (`Provisioning`, `ProvisioningFailed`) and its description of it, made
    safe to show (`clean_text`: one line, bounded)."""

    state: str
    substatus: str = ""
    description: str = ""

    @property
    def failure(self) -> str | None:
        """The agent's own account of a failed provisioning, or None."""
        if self.state == "Ready" or not self.substatus.endswith("Failed"):
            return None
        return f"{self.substatus}: {self.description}" if self.description else self.substatus


def _text(element: ElementTree.Element, *path: str) -> str:
    """The text of the element `path` names below `element` (local names, any
    namespace), or ""."""
    for name in path:
        child = next((c for c in element if c.tag.rsplit("}", 1)[-1] == name), None)
        if child is None:
            return ""
        element = child
    return element.text or ""


def health_report(body: bytes) -> HealthReport | None:
    """The report a health POST's body holds: the first `Health` element with a `State`
    (`.../Role/Health`), its `Details/SubStatus` and `Details/Description`; None when
    there is no `State`."""
    try:
        # The report comes from the VM under test, over loopback; expat expands no
        # external entities.
        root = ElementTree.fromstring(body)  # noqa: S314
    except ElementTree.ParseError:
        return None
    for health in root.iter():
        state = _text(health, "State").strip()
        if state:
            return HealthReport(
                clean_text(state, 40),
                clean_text(_text(health, "Details", "SubStatus"), 80),
                clean_text(_text(health, "Details", "Description"), 300),
            )
    return None


class Wireserver(FabricServer):
    """The wireserver stand-in serving `state`."""

    name = "wireserver"

    def __init__(
        self,
        state: GoalState,
        base: str = f"http://{ADDRESS}:80",
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__(sock)
        self.state = state
        # Where the goal state says its documents are: the address the VM sees.
        self.base = base
        # The health reports accepted, read once as they come (the boot test polls them).
        self._reports: list[HealthReport] = []
        self._reports_lock = threading.Lock()

    def respond(self, request: Recorded) -> Reply:
        comp, path = request.query.get("comp"), request.path.rstrip("/")
        cid = self.state.container_id
        if request.method == "GET":
            if comp == "versions" and path == "":
                return Reply(200, versions_xml(), XML)
            if comp == "goalstate" and path == "/machine":
                return Reply(200, goal_state_xml(self.state, self.base), XML)
            documents = {
                f"/machine/{cid}/hostingenv": hosting_env_xml,
                f"/machine/{cid}/sharedconfig": shared_config_xml,
                f"/machine/{cid}/fullconfig": shared_config_xml,
            }
            if path in documents:
                return Reply(200, documents[path](self.state), XML)
        if request.method == "POST" and path == "/machine":
            if comp == "health":
                report = health_report(request.body)
                if report is None:
                    return Reply(400, b"no health State in the report")
                with self._reports_lock:
                    self._reports.append(report)
                return Reply(200)
            if comp in ("roleProperties", "telemetrydata"):
                return Reply(200)
        return Reply(404, b"not served by the fabric stand-in")

    def reports(self) -> list[HealthReport]:
        """Every health report accepted, in order."""
        with self._reports_lock:
            return list(self._reports)

    def health_reports(self) -> list[str]:
        """The `State` of every health report received, in order."""
        return [report.state for report in self.reports()]

    def failures_reported(self, most: int = 3) -> list[str]:
        """The agent's accounts of its failed provisioning (`ProvisioningFailed: ...`),
        each once (waagent retries and reports the same again), the last `most`."""
        found = [f for report in self.reports() if (f := report.failure) is not None]
        return list(dict.fromkeys(found))[-most:]

    def asked_by(self, product: str) -> bool:
        """Whether an agent whose User-Agent names `product` (`WALinuxAgent/2.7...`) got
        the goal state."""
        return any(
            r.headers.get("user-agent", "").startswith(f"{product}/")
            and r.query.get("comp") == "goalstate"
            and r.status == 200
            for r in self.requests
        )

    @property
    def ready_reported(self) -> bool:
        """Whether the VM reported `Ready`."""
        return "Ready" in self.health_reports()
