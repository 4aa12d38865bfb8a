"""Azure's provisioning document, `ovf-env.xml`: what the fabric writes on the DVD.

The schema is the one Azure attaches to every Linux VM: an OVF `Environment` with a
`ProvisioningSection` (a `LinuxProvisioningConfigurationSet`: host name, user, optional
password, `DisableSshPasswordAuthentication`, SSH public keys with the path each goes to)
and a `PlatformSettingsSection`. cloud-init's Azure datasource and waagent both find
elements by namespace and name, so the document is built with ElementTree: every value is
escaped, nothing is pasted into markup.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree

OVF_NS = "http://schemas.dmtf.org/ovf/environment/1"
WA_NS = "http://schemas.microsoft.com/windowsazure"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"


@dataclass(frozen=True)
class PublicKey:
    """An SSH public key (`ssh-ed25519 AAAA... comment`) and the file it goes to."""

    value: str
    path: str


@dataclass(frozen=True)
class Provisioning:
    """What the fabric hands the VM: its name, its user and how that user logs in.

    `password` is what Azure puts on the media: the user's password in clear (the agent
    hashes it); None for a key-only user, the usual case. `username` None leaves the user
    out of the document (IMDS's osProfile then names "" as adminUsername): Azure always
    sends one, the fabric can also show what an image does when none comes.
    """

    hostname: str
    username: str | None
    public_keys: tuple[PublicKey, ...] = ()
    password: str | None = None
    disable_password_auth: bool = True
    vm_id: str = "00000000-0000-4000-8000-000000000000"

    @classmethod
    def with_key(cls, hostname: str, username: str, public_key: str) -> Provisioning:
        """A key-only user whose one key goes to `~/.ssh/authorized_keys`, as
        `az vm create --ssh-key-values` makes it."""
        key = PublicKey(public_key.strip(), f"/home/{username}/.ssh/authorized_keys")
        return cls(hostname, username, (key,))


def _sub(parent: ElementTree.Element, tag: str, text: str | None = None) -> ElementTree.Element:
    element = ElementTree.SubElement(parent, f"{{{WA_NS}}}{tag}")
    if text is not None:
        element.text = text
    return element


def ovf_env(spec: Provisioning) -> bytes:
    """`ovf-env.xml` for `spec`, UTF-8 with an XML declaration."""
    ElementTree.register_namespace("oe", OVF_NS)
    ElementTree.register_namespace("wa", WA_NS)
    ElementTree.register_namespace("i", XSI_NS)
    root = ElementTree.Element(f"{{{OVF_NS}}}Environment")
    section = _sub(root, "ProvisioningSection")
    _sub(section, "Version", "1.0")
    config = _sub(section, "LinuxProvisioningConfigurationSet")
    _sub(config, "ConfigurationSetType", "LinuxProvisioningConfiguration")
    _sub(config, "HostName", spec.hostname)
    if spec.username is not None:
        _sub(config, "UserName", spec.username)
    if spec.password is not None:
        _sub(config, "UserPassword", spec.password)
    _sub(config, "DisableSshPasswordAuthentication", str(spec.disable_password_auth).lower())
    if spec.public_keys:
        keys = _sub(_sub(config, "SSH"), "PublicKeys")
        for key in spec.public_keys:
            entry = _sub(keys, "PublicKey")
            _sub(entry, "Fingerprint", "")
            _sub(entry, "Path", key.path)
            _sub(entry, "Value", key.value)
    platform = _sub(root, "PlatformSettingsSection")
    _sub(platform, "Version", "1.0")
    settings = _sub(platform, "PlatformSettings")
    _sub(settings, "KmsServerHostname", "kms.core.windows.net")
    _sub(settings, "ProvisionGuestAgent", "true")
    nil = _sub(settings, "GuestAgentPackageName")
    nil.set(f"{{{XSI_NS}}}nil", "true")
    _sub(settings, "PreprovisionedVm", "false")
    return bytes(ElementTree.tostring(root, encoding="utf-8", xml_declaration=True))
