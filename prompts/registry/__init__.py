"""The prompt registry: immutable numbered versions per task, aliases, on a pluggable store.

- `registry.Registry`: names, versions, aliases, checksums, resolving and listing, on any store;
- `store.PromptStore`: the storage interface (names and bytes) and the guarantees each backend gives;
- `local.LocalStore`: the store on a local folder (flock, fsync, atomic renames);
- `s3.S3Store`: the store on S3-compatible object storage (conditional writes, manifests);
- `open.open_store`: a store URL (a folder path or s3://bucket/prefix) to a store;
- `version.PromptVersion`: one stored version and its metadata (torch-free).

The names below load their module on first use (PEP 562), so importing `version` alone, as the torch-free
transports do, does not import `registry` and torch with it. Torch-free code imports the modules by name,
never this package: its lazy names hide from import-linter what they import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from softprompt.prompts.registry.local import LocalStore
    from softprompt.prompts.registry.open import open_store
    from softprompt.prompts.registry.registry import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, Registry
    from softprompt.prompts.registry.store import STALE_TEMP_SECONDS, MissingVersionError, PromptStore
    from softprompt.prompts.registry.version import PromptVersion

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "STALE_TEMP_SECONDS",
    "LocalStore",
    "MissingVersionError",
    "PromptStore",
    "PromptVersion",
    "Registry",
    "open_store",
]

# Each public name -> the module (in this package) that defines it.
_HOMES = {
    "DEFAULT_PAGE_SIZE": "registry",
    "MAX_PAGE_SIZE": "registry",
    "Registry": "registry",
    "STALE_TEMP_SECONDS": "store",
    "MissingVersionError": "store",
    "PromptStore": "store",
    "LocalStore": "local",
    "open_store": "open",
    "PromptVersion": "version",
}


def __getattr__(name: str) -> Any:
    """Imports the module that defines `name` and caches the value here, so the next lookup is plain."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
