"""The prompt registry: immutable numbered versions per task, aliases, on a pluggable store.

- `registry.Registry`: names, versions, aliases, checksums, resolving and listing, on any store;
- `store.PromptStore`: the storage interface (names and bytes) and the guarantees each backend gives;
- `local.LocalStore`: the store on a local folder (flock, fsync, atomic renames);
- `s3.S3Store`: the store on S3-compatible object storage (conditional writes, manifests);
- `open.open_store`: a store URL (a folder path or s3://bucket/prefix) to a store;
- `version.PromptVersion`: one stored version and its metadata.
"""

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
