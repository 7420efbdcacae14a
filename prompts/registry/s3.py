"""`S3Store`: the registry's store on S3 or any S3-compatible object storage (MinIO, Ceph), through boto3.

Layout, under ``s3://<bucket>/<prefix>/``::

    <name>/claims/<N>              empty marker: number N is taken (created once, never deleted)
    <name>/manifests/<N>.json      a version's manifest: each file's sha256 and size; the version exists iff it does
    <name>/<N>/<file>              the version's files
    <name>/aliases.json            {"prod": 3, ...}, replaced by compare-and-swap on its ETag
    .pending/<name>/<N>            a version being written or deleted (what `clean_stale_temp` looks at)

How it gives the guarantees of `store.PromptStore` without a lock server:

- **Numbers.** A writer claims the number above every claim and manifest it lists by creating
  ``claims/<N>`` with ``If-None-Match: *``: S3 creates it for exactly one writer and answers the others
  412, which then try N+1. Claims are never deleted, so a number is never handed out twice, even after
  its version is deleted. A store without conditional writes cannot give this guarantee: refuse to
  start on it (or serialize writers through a lock server such as DynamoDB or etcd); never fall back
  to listing-then-writing, which hands two racing writers the same number.
  Two concurrent writers may see their versions become visible out of order (N+1 while N is still
  uploading); each writer's own versions appear in increasing order, and none ever disappears.
- **Atomic versions.** Files are uploaded first, the manifest last; readers list and read only
  through manifests, and every read re-reads the manifest, so a deleted version cannot be read.
- **Checksums.** Every file read is checked against the manifest's sha256 and size
  (`CorruptPromptError` naming the object). Files once read are kept in `cache_dir` by content hash
  (checked again on each read), so a version is never downloaded twice.
- **Aliases.** ``aliases.json`` is written with ``If-Match: <ETag it was read with>`` (``If-None-Match: *``
  when there was none): a writer that read a stale table loses. A deleter removes the manifest first,
  then reads the aliases again and puts the manifest back if an alias now points at the version; an
  alias writer checks its new targets again after writing and undoes its write if one vanished. What
  remains: between those steps a reader can briefly see an alias whose version looks missing, and an
  undo that loses its own compare-and-swap (a third writer changed the table in that instant) leaves
  the alias pointing at a deleted version until the next alias write.
- **Leftovers.** ``.pending/<name>/<N>`` is written before a version's first file (or before its
  manifest is deleted) and removed after its manifest is written (or its files deleted). A writer that
  died leaves it behind; `clean_stale_temp` then removes the files of a version without a manifest once
  the marker is older than its age limit (never a live writer's younger ones).
- **Faults.** Transient errors are retried with backoff (botocore's "standard" retry mode); what still
  fails, and refused credentials or a missing bucket, raise `StoreUnavailableError` naming the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from softprompt.prompts.errors import CorruptPromptError, RegistryConflictError, StoreUnavailableError
from softprompt.prompts.refs import NAME_RE, validate_name, validate_version
from softprompt.prompts.registry.store import (
    STALE_TEMP_SECONDS,
    MissingVersionError,
    PromptStore,
    decode_aliases,
    encode_aliases,
    validate_file_name,
)

DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 60.0
MANIFEST_FORMAT = "softprompt.manifest/1"
_PENDING = ".pending"
_ALIASES = "aliases.json"
# Error codes that no retry fixes: the store refuses these credentials, or the bucket is not there.
_REFUSED = {
    "AccessDenied": "access denied: the credentials lack permission on this bucket",
    "InvalidAccessKeyId": "the access key id is not known to the store: check the AWS credentials",
    "SignatureDoesNotMatch": "the secret access key is wrong: check the AWS credentials",
    "ExpiredToken": "the credentials have expired: renew them",
    "InvalidToken": "the session token is invalid: renew the credentials",
    "NoSuchBucket": "the bucket does not exist: create it or fix the URL",
    "403": "access refused (HTTP 403): check the AWS credentials and the bucket's permissions",  # HEAD: no code
}
_CONFLICTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _is_missing(error: ClientError) -> bool:
    return _code(error) in ("NoSuchKey", "404") and _status(error) == 404


def _is_conflict(error: ClientError) -> bool:
    return _code(error) in _CONFLICTS or _status(error) in (409, 412)


class S3Store(PromptStore):
    """A store in ``s3://bucket/prefix``; see the module docstring for the layout and guarantees.

    Credentials and region come from the standard AWS configuration (environment, profile, instance
    role); `endpoint_url` selects a non-AWS endpoint (MinIO: ``http://host:9000``). Transient errors
    are retried with backoff, `max_attempts` times in all (default: the AWS configuration's). Opening checks
    the bucket can be listed, so a wrong bucket, endpoint or credentials fail at once with
    `StoreUnavailableError`.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        cache_dir: str | Path | None = None,
        max_attempts: int | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        # Without max_attempts, the AWS configuration's applies (AWS_MAX_ATTEMPTS; 3 in standard mode).
        retries: dict[str, Any] = {"mode": "standard"}
        if max_attempts is not None:
            retries["max_attempts"] = max_attempts
        config = Config(
            retries=retries,
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
        )
        try:
            self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        except BotoCoreError as e:  # e.g. an endpoint URL botocore cannot parse
            raise StoreUnavailableError(f"cannot open the prompt store {self.url}: {e}") from e
        self._check_access()

    # -- keys and messages

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _version_key(self, name: str, version: int, *rest: str) -> str:
        return self._key(validate_name(name), str(validate_version(version)), *rest)

    def _manifest_key(self, name: str, version: int) -> str:
        return self._key(validate_name(name), "manifests", f"{validate_version(version)}.json")

    def _url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def location(self, name: str, version: int | None = None, filename: str | None = None) -> str:
        if version is None:
            return self._url_of(self._key(validate_name(name)))
        if filename is None:
            return self._url_of(self._version_key(name, version))
        return self._url_of(self._version_key(name, version, validate_file_name(filename)))

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Turns failures no retry fixes into `StoreUnavailableError` naming the store and `what` failed."""
        endpoint = f" at {self.endpoint_url}" if self.endpoint_url else ""
        try:
            yield
        except ClientError as e:
            code = _code(e)
            if code in _REFUSED or _status(e) >= 500:
                reason = _REFUSED.get(code) or f"the store answered {code or _status(e)} after retries"
                raise StoreUnavailableError(
                    f"the prompt store {self.url}{endpoint} is unavailable: {what} failed: {reason} ({e})"
                ) from e
            raise
        except NoCredentialsError as e:
            raise StoreUnavailableError(
                f"the prompt store {self.url}{endpoint} is unavailable: {what} failed: no AWS credentials found "
                f"(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
            ) from e
        except EndpointConnectionError as e:
            raise StoreUnavailableError(
                f"the prompt store {self.url} is unavailable: {what} failed: cannot reach the endpoint "
                f"{self.endpoint_url or 'of AWS S3'} after retries ({e})"
            ) from e
        except BotoCoreError as e:
            raise StoreUnavailableError(
                f"the prompt store {self.url}{endpoint} is unavailable: {what} failed: {e}"
            ) from e

    def _check_access(self) -> None:
        with self._calling(f"listing bucket {self.bucket!r}"):
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)

    # -- object primitives

    def _get(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag; None if there is no such object."""
        try:
            with self._calling(f"reading {self._url_of(key)}"):
                response = self.client.get_object(Bucket=self.bucket, Key=key)
                return response["Body"].read(), response["ETag"]
        except ClientError as e:
            if _is_missing(e):
                return None
            raise

    def _put(self, key: str, data: bytes, **condition: str) -> str | None:
        """Writes an object and returns its ETag; with a condition (IfNoneMatch / IfMatch), None if it fails."""
        try:
            with self._calling(f"writing {self._url_of(key)}"):
                return self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as e:
            # A conditional write to a key deleted meanwhile answers 404 (If-Match) rather than 412.
            if condition and (_is_conflict(e) or _is_missing(e)):
                return None
            raise

    def _exists(self, key: str) -> bool:
        try:
            with self._calling(f"looking up {self._url_of(key)}"):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _status(e) == 404:
                return False
            raise
        return True

    def _list(self, prefix: str, *, delimiter: str = "") -> Iterator[dict[str, Any]]:
        """Objects (and with `delimiter`, common prefixes as {"Prefix": ...}) under `prefix`, all pages."""
        paginator = self.client.get_paginator("list_objects_v2")
        extra = {"Delimiter": delimiter} if delimiter else {}
        with self._calling(f"listing {self._url_of(prefix)}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **extra):
                yield from page.get("CommonPrefixes", [])
                yield from page.get("Contents", [])

    def _has_objects(self, prefix: str) -> bool:
        with self._calling(f"listing {self._url_of(prefix)}"):
            return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"))

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            with self._calling(f"deleting objects under {self.url}"):
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                failed = response["Errors"][0]
                raise StoreUnavailableError(
                    f"the prompt store {self.url} is unavailable: deleting {self._url_of(failed['Key'])} failed: "
                    f"{failed.get('Code')} {failed.get('Message')}"
                )

    def _numbers(self, prefix: str, suffix: str = "") -> list[int]:
        numbers = []
        for item in self._list(prefix):
            tail = item.get("Key", "")[len(prefix):].removesuffix(suffix)
            if tail.isdigit() and not tail.startswith("0"):
                numbers.append(int(tail))
        return sorted(numbers)

    # -- manifests

    def _read_manifest(self, name: str, version: int) -> dict[str, dict[str, Any]]:
        """The version's files as {name: {"sha256", "size"}}; `MissingVersionError` if it does not exist."""
        key = self._manifest_key(name, version)
        found = self._get(key)
        if found is None:
            raise MissingVersionError(f"{name}@{version} does not exist")
        try:
            manifest = json.loads(found[0].decode("utf-8"))
            files = manifest["files"]
            if manifest.get("format") != MANIFEST_FORMAT or (manifest["name"], manifest["version"]) != (name, version):
                raise ValueError(f"it describes {manifest['name']}@{manifest['version']} in {manifest.get('format')}")
            if not isinstance(files, dict) or not all(
                isinstance(f.get("sha256"), str) and isinstance(f.get("size"), int) for f in files.values()
            ):
                raise ValueError("its file list is malformed")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptPromptError(
                f"the manifest {self._url_of(key)} is damaged ({e}): delete this version and register the prompt again"
            ) from None
        return files

    # -- reads

    def task_names(self) -> list[str]:
        root = self._key("")
        names = (item["Prefix"][len(root):].rstrip("/") for item in self._list(root, delimiter="/") if "Prefix" in item)
        return sorted(n for n in names if NAME_RE.fullmatch(n))

    def versions(self, name: str) -> list[int]:
        return self._numbers(self._key(validate_name(name), "manifests", ""), ".json")

    def file_names(self, name: str, version: int) -> list[str]:
        return sorted(self._read_manifest(name, version))

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        entry = self._read_manifest(name, version).get(validate_file_name(filename))
        if entry is None:
            raise FileNotFoundError(f"{self.location(name, version, filename)} is not a file of {name}@{version}")
        cached = self._cached(entry["sha256"])
        if cached is not None:
            return cached
        key = self._version_key(name, version, filename)
        found = self._get(key)
        if found is None:
            # Its manifest was read a moment ago: either the version was deleted meanwhile, or it lost a file.
            self._read_manifest(name, version)
            raise CorruptPromptError(
                f"{self._url_of(key)} is missing though its manifest lists it: delete this version and register "
                f"the prompt again"
            )
        data = found[0]
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"] or len(data) != entry["size"]:
            raise CorruptPromptError(
                f"{self._url_of(key)} has sha256 {digest} ({len(data)} bytes) but its manifest records "
                f"{entry['sha256']} ({entry['size']} bytes): the object was changed in the store; delete this "
                f"version and register the prompt again"
            )
        self._keep(digest, data)
        return data

    def read_aliases(self, name: str) -> dict[str, int]:
        return self._read_aliases(name)[0]

    def _read_aliases(self, name: str) -> tuple[dict[str, int], str | None]:
        key = self._key(validate_name(name), _ALIASES)
        found = self._get(key)
        if found is None:
            return {}, None
        return decode_aliases(found[0], where=self._url_of(key)), found[1]

    # -- the local cache of immutable files, by content hash

    def _cached(self, sha256: str) -> bytes | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / sha256
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        path.unlink(missing_ok=True)  # a damaged cache entry: download again
        return None

    def _keep(self, sha256: str, data: bytes) -> None:
        if self.cache_dir is None:
            return
        # Written aside and renamed, so a reader (or another process) never sees a partial entry.
        fd, tmp = tempfile.mkstemp(prefix=f".{sha256}-", dir=self.cache_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.cache_dir / sha256)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- writes

    def publish(
        self, name: str, files: Mapping[str, bytes], numbered: Callable[[int], Mapping[str, bytes]]
    ) -> int:
        for filename in files:
            validate_file_name(filename)
        version = self._claim_number(name)
        pending = self._key(_PENDING, name, str(version))
        self._put(pending, b"")
        uploaded: list[str] = []
        try:
            entries = {}
            for filename, data in {**files, **numbered(version)}.items():
                key = self._version_key(name, version, validate_file_name(filename))
                self._put(key, data)
                uploaded.append(key)
                entries[filename] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            manifest = {"format": MANIFEST_FORMAT, "name": name, "version": version,
                        "files": dict(sorted(entries.items()))}
            manifest_bytes = json.dumps(manifest, indent=2).encode()
            if self._put(self._manifest_key(name, version), manifest_bytes, IfNoneMatch="*") is None:
                raise RegistryConflictError(
                    f"{self.location(name, version)} already has a manifest; its claim marker was deleted by hand"
                )
        except BaseException:
            # Best effort: what is left behind is invisible, and clean_stale_temp removes it later.
            with contextlib.suppress(Exception):
                self._delete_keys([*uploaded, pending])
            raise
        with contextlib.suppress(StoreUnavailableError):
            self._delete_keys([pending])
        return version

    def _claim_number(self, name: str) -> int:
        task = validate_name(name)
        claims = self._key(task, "claims", "")
        # Manifests count too, so a number stays taken even if its claim marker was lost.
        version = max([0, *self._numbers(claims), *self.versions(name)]) + 1
        while self._put(claims + str(version), b"", IfNoneMatch="*") is None:
            version += 1  # another writer took it (412), or raced us for it (409): try the next one
        return version

    def swap_aliases(self, name: str, expected: Mapping[str, int], new: Mapping[str, int]) -> bool:
        if not self._has_objects(self._key(validate_name(name), "")):
            return False  # a task without storage has no versions to point at
        current, etag = self._read_aliases(name)
        if current != dict(expected):
            return False
        targets = {v for a, v in new.items() if expected.get(a) != v}
        if not targets <= set(self.versions(name)):
            return False
        key = self._key(name, _ALIASES)
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        written = self._put(key, encode_aliases(new), **condition)
        if written is None:
            return False
        # A delete may have removed a target between the check and the write: it re-reads the aliases
        # after removing the manifest, and we re-check the targets after writing; one of us backs off.
        if all(self._exists(self._manifest_key(name, v)) for v in targets):
            return True
        self._put(key, encode_aliases(expected), IfMatch=written)  # undone only if still ours
        return False

    def delete_version(self, name: str, version: int) -> bool:
        manifest_key = self._manifest_key(name, version)
        found = self._get(manifest_key)
        if found is None:
            raise MissingVersionError(f"{name}@{version} does not exist")
        if version in self.read_aliases(name).values():
            return False
        pending = self._key(_PENDING, name, str(version))
        self._put(pending, b"")  # a crash from here on leaves files the stale sweep removes
        with self._calling(f"deleting {self._url_of(manifest_key)}"):
            self.client.delete_object(Bucket=self.bucket, Key=manifest_key)
        if version in self.read_aliases(name).values():
            # An alias moved onto it meanwhile: put the version back (same bytes), as if never deleted.
            self._put(manifest_key, found[0], IfNoneMatch="*")
            self._delete_keys([pending])
            return False
        self._delete_keys([*(item["Key"] for item in self._list(self._version_key(name, version, ""))), pending])
        return True

    # -- maintenance

    def clean_stale_temp(self, max_age_s: float = STALE_TEMP_SECONDS) -> list[str]:
        removed: list[str] = []
        cutoff = time.time() - max_age_s
        root = self._key(_PENDING, "")
        for item in list(self._list(root)):
            if item["LastModified"].timestamp() >= cutoff:
                continue
            name, _, number = item["Key"][len(root):].partition("/")
            if not NAME_RE.fullmatch(name) or not number.isdigit() or number.startswith("0"):
                continue
            version = int(number)
            if self._exists(self._manifest_key(name, version)):
                removed.append(self._url_of(item["Key"]))  # its writer finished but died before unmarking
            else:
                keys = [entry["Key"] for entry in self._list(self._version_key(name, version, ""))]
                self._delete_keys(keys)
                removed.append(self.location(name, version))
            self._delete_keys([item["Key"]])
        return removed
