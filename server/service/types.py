"""What a transport sends the services and gets back, torch-free: the uploads, the model's description, and
the domain's and the jobs' own records, re-exported so a transport imports them from here.

The records are the real types, not copies: `PromptVersion` (the registry's), `JobSnapshot` and
`TrainJobRequest` (the jobs'), `EvalResult` and `Progress` (the trainer's). Each lives in a torch-free module
beside the torch-side code that makes it, so a field added there is the field a transport reads. Generation
and Classify requests and results are the core's (`core.types`), torch-free too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from softprompt.prompts.registry.version import PromptVersion
from softprompt.prompts.results import EvalResult, Progress
from softprompt.server.core.types import CacheStats, KvUsage, TaskLoad
from softprompt.server.jobs.types import JobSnapshot, TrainJobRequest

__all__ = [
    "CacheStats",
    "EvalResult",
    "JobSnapshot",
    "Limits",
    "ModelInfo",
    "PeftUpload",
    "Progress",
    "PromptFiles",
    "PromptUpload",
    "PromptVersion",
    "TaskLoad",
    "TensorUpload",
    "TrainJobRequest",
]

# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PeftUpload:
    """A PEFT prompt-learning adapter: the text of adapter_config.json and the bytes of adapter_model.safetensors;
    `task_id` picks the task of a MULTITASK_PROMPT_TUNING adapter (None: not given)."""

    config_json: str
    safetensors: bytes
    task_id: int | None = None


@dataclass(frozen=True)
class TensorUpload:
    """A raw ``[num_virtual_tokens, hidden_size]`` matrix, row-major, little-endian."""

    shape: tuple[int, ...]
    dtype: str  # "float32", "float16" or "bfloat16"
    data: bytes


@dataclass(frozen=True)
class PromptUpload:
    """A prompt to register as the next version of task `name`.

    `base_model_fingerprint` is the model the prompt claims to be made for ("" = unknown); `force`
    registers it even when that, or the adapter's layer count, says another base model.
    """

    name: str
    source: PeftUpload | TensorUpload
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    base_model_fingerprint: str = ""
    force: bool = False


@dataclass(frozen=True)
class PromptFiles:
    """One version and every file of it by name (adapter, softprompt.json, training report, loss plot)."""

    version: PromptVersion
    files: Mapping[str, bytes]


# ---------------------------------------------------------------- inference


@dataclass(frozen=True)
class Limits:
    """The server's request limits, as a client needs them to size its requests."""

    max_new_tokens: int
    default_max_new_tokens: int
    max_input_tokens: int
    max_virtual_tokens: int
    max_batch_size: int
    max_queued_requests: int
    max_upload_bytes: int
    max_stop_sequences: int
    max_labels: int


@dataclass(frozen=True)
class ModelInfo:
    """The served base model, the server's limits and its KV cache now."""

    model_id: str
    hidden_size: int
    dtype: str  # "bfloat16", "float32", ...
    device: str  # "cuda:0", "cpu", ...
    max_sequence_length: int
    vocab_size: int
    fingerprint: str  # identifies the weights; prompts record the fingerprint they were made for
    has_chat_template: bool
    limits: Limits
    kv_cache: KvUsage  # the pool's size (--kv-cache-memory) and occupancy when asked
    tasks: tuple[TaskLoad, ...] = ()  # each task busy now or lately: rows, queue, share, rate (fair share)
    caches: dict[str, CacheStats] = field(default_factory=dict, hash=False)  # tiers of prompt memory by name
