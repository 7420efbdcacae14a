"""Limits on the free-form metadata (description and tags) that uploads and training jobs store with a version."""

from __future__ import annotations

from collections.abc import Mapping

from softprompt.server.core.errors import InvalidRequestError

MAX_DESCRIPTION = 4096
MAX_TAGS = 64
MAX_TAG_CHARS = 256


def check_description(description: str, tags: Mapping[str, str]) -> None:
    """Raises `InvalidRequestError` for a description or tags past the limits."""
    if len(description) > MAX_DESCRIPTION:
        raise InvalidRequestError(f"description has {len(description)} characters; keep it under {MAX_DESCRIPTION}")
    if len(tags) > MAX_TAGS:
        raise InvalidRequestError(f"{len(tags)} tags given; at most {MAX_TAGS} are allowed")
    for k, v in tags.items():
        if not k or len(k) > MAX_TAG_CHARS or len(v) > MAX_TAG_CHARS:
            raise InvalidRequestError(f"tag keys must be 1..{MAX_TAG_CHARS} characters and values at most {MAX_TAG_CHARS}: {k!r:.40}")
