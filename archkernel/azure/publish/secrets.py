"""Keep shared access signatures, account keys and tokens out of everything we print.

A SAS is the query string of a blob URL (`sv=...&se=...&sig=...`); a connection string
carries `AccountKey=...`. `redact` removes both from any text (an SDK error can quote the
request URL); `public_url` is the URL without its query, for logs and publish.json.
"""

from __future__ import annotations

import importlib
import logging
import re
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

from archkernel.errors import UserError

_QUERY = re.compile(r"(https?://[^\s?'\"]+)\?[^\s'\"]*")
_KEYS = re.compile(
    r"(?i)\b(sig|signature|accountkey|sharedaccesssignature|se|sv|sp|sr|st|skoid|sktid|"
    r"client_secret|access_token|code)=([^&;\s'\"]+)"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9\-._~+/]+=*")

EXTRA_HINT = "install Azure's SDKs: pip install 'archkernel[azure]'"


def redact(text: str) -> str:
    """`text` without URL query strings, `key=value` secrets and bearer tokens."""
    text = _QUERY.sub(r"\1?<redacted>", text)
    text = _KEYS.sub(r"\1=<redacted>", text)
    return _BEARER.sub(r"\1<redacted>", text)


def redacted_first_line(exc: BaseException) -> str:
    """The first line of an SDK error's message, redacted (its later lines repeat the
    request, URL and headers)."""
    return redact(str(exc).splitlines()[0]) if str(exc) else ""


def public_url(url: str) -> str:
    """`url` without its query string (where a SAS lives), fragment and user:password@."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def sdk(module: str) -> ModuleType:
    """Import one of Azure's SDK modules, or say how to install the optional extra.

    Their loggers, and urllib3's under them, are kept at WARNING: at INFO and DEBUG they
    log every request's URL, SAS included."""
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"publishing to Azure needs Azure's Python SDKs ({exc.name or module} is missing)",
            EXTRA_HINT,
        ) from None
    for name in ("azure", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return found
