"""`PromptVersion`: what the registry knows of one stored version, and its ``softprompt.json`` metadata."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from softprompt.prompts.errors import CorruptPromptError

METADATA_FORMAT = 1


@dataclass(frozen=True)
class PromptVersion:
    """One stored, immutable version of a task's prompt, plus the aliases that point at it now.

    `method` says how it is served: "prompt" (a `[num_virtual_tokens, hidden_size]` matrix in front of the
    input's embeddings) or "prefix" (keys and values of `num_layers` layers x `kv_heads` x `head_dim` per
    virtual token, PEFT's `[num_virtual_tokens, num_layers * 2 * kv_heads * head_dim]` matrix); `hidden_size` is
    the base model's either way. `peft_task_id` is the task of the MULTITASK_PROMPT_TUNING adapter it was
    materialized from (None otherwise). Versions stored before methods existed read as "prompt".
    `candidate`: registered by a training run whose quality gate kept the alias on another version; a bare
    task name never resolves to a candidate (its number or an alias still does).
    """

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
    method: str = "prompt"
    num_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    peft_task_id: int | None = None
    candidate: bool = False

    @property
    def ref(self) -> str:
        """The exact reference of this version, "name@version"."""
        return f"{self.name}@{self.version}"

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, kv_heads, head_dim) of a "prefix" version's keys and values; zeros for "prompt"."""
        return self.num_layers, self.kv_heads, self.head_dim

    @property
    def tensor_shape(self) -> tuple[int, int]:
        """The shape of the stored ``prompt_embeddings`` matrix."""
        if self.method == "prefix":
            return self.num_virtual_tokens, self.num_layers * 2 * self.kv_heads * self.head_dim
        return self.num_virtual_tokens, self.hidden_size

    @property
    def size_bytes(self) -> int:
        """Bytes of the stored float32 matrix (a "prefix" version's keys and values for all its layers)."""
        rows, width = self.tensor_shape
        return rows * width * 4

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
            "method": self.method,
            **({"num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}
               if self.method == "prefix" else {}),
            **({} if self.peft_task_id is None else {"peft_task_id": self.peft_task_id}),
            **({"candidate": True} if self.candidate else {}),
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
                method=_optional(metadata, "method", str, "prompt"),
                num_layers=_optional(metadata, "num_layers", int, 0),
                kv_heads=_optional(metadata, "kv_heads", int, 0),
                head_dim=_optional(metadata, "head_dim", int, 0),
                peft_task_id=_optional(metadata, "peft_task_id", int, None),
                candidate=_optional(metadata, "candidate", bool, False),
            )
            if version.method not in ("prompt", "prefix") or (
                    version.method == "prefix" and min(version.kv_shape) < 1):
                raise TypeError("method")
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


def _optional(metadata: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """A field later formats added: `default` when absent (or null), else typed as `_typed` checks."""
    if metadata.get(key) is None:
        return default
    return _typed(metadata, key, kind)
