"""Settings: typed sections, one TOML file, environment overrides, and where each value came from.

Every value that ends up in a file or on a command line is validated here. The package, by
concern:
- `types`: the value types and their checks (host names, sizes, paths, secrets ...);
- `schema`: the sections (`Settings`, `AzureSettings`, `ScalewaySettings`), keys, defaults;
- `loading`: finding the file, environment overrides, validation (`load`, `Loaded`);
- `cache`: the validated settings kept in the workdir between runs (`remember`);
- `display`: what steps and `settings show` see (`subset`, `effective`), secrets masked.

Importing it does not import pydantic: that happens only when something is validated.
"""

from __future__ import annotations

from archkernel.settings.cache import CACHE_FILE, remember
from archkernel.settings.display import (
    digest,
    effective,
    field_docs,
    lookup,
    section_keys,
    subset,
    toml_lines,
)
from archkernel.settings.loading import ENV_PREFIX, ENV_SETTINGS, Loaded, load, validate
from archkernel.settings.schema import (
    SECTIONS,
    AzureSettings,
    AzureUser,
    ScalewaySettings,
    Section,
    Settings,
    default_of,
)
from archkernel.settings.types import Secret, format_size
from archkernel.units import GiB, MiB

__all__ = [
    "CACHE_FILE",
    "ENV_PREFIX",
    "ENV_SETTINGS",
    "SECTIONS",
    "AzureSettings",
    "AzureUser",
    "GiB",
    "Loaded",
    "MiB",
    "ScalewaySettings",
    "Secret",
    "Section",
    "Settings",
    "default_of",
    "digest",
    "effective",
    "field_docs",
    "format_size",
    "load",
    "lookup",
    "remember",
    "section_keys",
    "subset",
    "toml_lines",
    "validate",
]
