"""`PromptVersion`: what the registry knows of one stored version, and its ``softprompt.json`` metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from softprompt.prompts.errors import CorruptPromptError

METADATA_FORMAT = 1


@dataclass(frozen=True)
class PromptVersion:
    """One stored, immutable version of a task's prompt, plus the aliases that point at it now."""

    name: str
    version: int
    num_virtual_tokens: int
    hidden_size: int
    sha256: str
    base_model_fingerprint: str
    base_model_id: str
    created_at: str
    description: str
    tags: dict[str, str] = field(hash=False)
    source_type: str
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict, hash=False)

    @property
    def ref(self) -> str:
        """The exact reference of this version, "name@version"."""
        return f"{self.name}@{self.version}"

    def to_metadata(self) -> dict[str, Any]:
        """The ``softprompt.json`` content for this version (aliases are mutable, so not included)."""
        return {
            "format": METADATA_FORMAT,
            "name": self.name,
            "version": self.version,
            "num_virtual_tokens": self.num_virtual_tokens,
            "hidden_size": self.hidden_size,
            "sha256": self.sha256,
            "base_model_fingerprint": self.base_model_fingerprint,
            "base_model_id": self.base_model_id,
            "created_at": self.created_at,
            "description": self.description,
            "tags": dict(self.tags),
            "source_type": self.source_type,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, where: str, aliases: tuple[str, ...] = ()) -> PromptVersion:
        """Builds a version from ``softprompt.json``; `CorruptPromptError` if fields are missing or mistyped."""
        try:
            tags = metadata["tags"]
            if not isinstance(tags, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
            ):
                raise TypeError("tags")
            metrics = metadata.get("metrics", {})
            if not isinstance(metrics, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) for k, v in metrics.items()
            ):
                raise TypeError("metrics")
            version = cls(
                name=_typed(metadata, "name", str),
                version=_typed(metadata, "version", int),
                num_virtual_tokens=_typed(metadata, "num_virtual_tokens", int),
                hidden_size=_typed(metadata, "hidden_size", int),
                sha256=_typed(metadata, "sha256", str),
                base_model_fingerprint=_typed(metadata, "base_model_fingerprint", str),
                base_model_id=_typed(metadata, "base_model_id", str),
                created_at=_typed(metadata, "created_at", str),
                description=_typed(metadata, "description", str),
                tags=dict(tags),
                source_type=_typed(metadata, "source_type", str),
                aliases=aliases,
                metrics={k: float(v) for k, v in metrics.items()},
            )
        except (KeyError, TypeError) as e:
            raise CorruptPromptError(
                f"the metadata of {where} is incomplete or damaged (field {e}): delete this version and "
                f"register the prompt again"
            ) from None
        return version


def _typed(metadata: Mapping[str, Any], key: str, kind: type) -> Any:
    value = metadata[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(key)
    return value
