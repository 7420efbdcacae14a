"""`open_store`: the one place a store URL (``--store``) becomes a `PromptStore`.

A path (``~`` expanded) is a local folder (`LocalStore`); ``s3://bucket/prefix`` is object storage
(`S3Store`, on AWS or any S3-compatible endpoint). Anything else that looks like a URL is refused,
so ``s3:bucket`` or ``gs://...`` never silently becomes a local folder named ``s3:`` or ``gs:``.
"""

from __future__ import annotations

import re
from pathlib import Path

from softprompt.prompts.registry.local import LocalStore
from softprompt.prompts.registry.store import PromptStore

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)", re.DOTALL)
# S3's rules for bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting and ending alphanumeric.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SUPPORTED = "a local folder path (e.g. ./prompts or ~/prompts) or s3://bucket/prefix"


def open_store(url: str, *, endpoint_url: str | None = None, cache_dir: Path | None = None) -> PromptStore:
    """Opens the store `url` names: a local folder path or ``s3://bucket/prefix``.

    `endpoint_url` (a non-AWS S3 endpoint such as MinIO) and `cache_dir` (where file bytes read from
    object storage are kept by content hash) apply to s3:// stores; a local folder needs neither.
    Raises ValueError for a URL it does not support, and `StoreUnavailableError` for object storage
    that cannot be reached, a missing bucket or refused credentials.
    """
    if not url or not url.strip():
        raise ValueError(f"the store is empty: give {SUPPORTED}")
    match = _SCHEME_RE.fullmatch(url)
    if match is None:
        if endpoint_url:
            raise ValueError(f"an S3 endpoint ({endpoint_url}) was given for the local folder store {url!r}: "
                             f"use an s3://bucket/prefix store with it, or drop the endpoint")
        return LocalStore(Path(url).expanduser())
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme != "s3":
        raise ValueError(f"unsupported store {url!r}: the scheme {scheme}:// is not supported; give {SUPPORTED} "
                         f"(for a local folder whose name contains ':', write ./{url})")
    if not rest.startswith("//"):
        raise ValueError(f"invalid store URL {url!r}: an S3 store is written s3://bucket/prefix (with '//')")
    bucket, _, prefix = rest[2:].partition("/")
    if not bucket:
        raise ValueError(f"invalid store URL {url!r}: the bucket is missing; write s3://bucket/prefix")
    if _BUCKET_RE.fullmatch(bucket) is None or ".." in bucket:
        raise ValueError(f"invalid store URL {url!r}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase "
                         f"letters, digits, '.' and '-', starting and ending with a letter or digit)")
    # Imported here so a local store never needs boto3 (the server extra) installed.
    from softprompt.prompts.registry.s3 import S3Store

    return S3Store(bucket, prefix, endpoint_url=endpoint_url, cache_dir=cache_dir)
