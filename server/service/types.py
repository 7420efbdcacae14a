"""What a transport sends the services and gets back, torch-free: requests as dataclasses, results as
dataclasses or as read-only views.

The views (`PromptInfo`, `TrainingJob` and the two it holds) are Protocols that the registry's and the jobs'
own records satisfy as they are: the services return those records without copying them, and a transport
reads their fields without importing the torch-side modules that define them. Generation and Classify
requests and results are the core's (`core.types`), torch-free too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.outcomes import TrainingState
from softprompt.server.core.types import KvUsage

# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PeftUpload:
    """A PEFT prompt-tuning adapter: the text of adapter_config.json and the bytes of adapter_model.safetensors."""

    config_json: str
    safetensors: bytes


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


class PromptInfo(Protocol):
    """One stored prompt version and the aliases pointing at it (the registry's `PromptVersion`)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def ref(self) -> str: ...  # "name@version"
    @property
    def num_virtual_tokens(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def sha256(self) -> str: ...
    @property
    def base_model_fingerprint(self) -> str: ...
    @property
    def created_at(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def tags(self) -> Mapping[str, str]: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...
    @property
    def source_type(self) -> str: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


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


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainJobRequest:
    """A training job to queue: examples as JSONL bytes (`eval_jsonl` empty: hold out part of `train_jsonl`)."""

    task: str
    train_jsonl: bytes
    eval_jsonl: bytes
    options: TrainingOptions
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    promote_alias: str = ""


class EvalMetrics(Protocol):
    """Held-out metrics of one prompt (the trainer's `EvalResult`)."""

    @property
    def examples(self) -> int: ...
    @property
    def loss(self) -> float: ...
    @property
    def exact_match(self) -> float: ...
    @property
    def accuracy(self) -> float | None: ...


class TrainingProgress(Protocol):
    """Where a running job is (the trainer's `Progress`)."""

    @property
    def step(self) -> int: ...
    @property
    def total_steps(self) -> int: ...
    @property
    def epoch(self) -> float: ...
    @property
    def train_loss(self) -> float | None: ...
    @property
    def eval_loss(self) -> float | None: ...
    @property
    def best_eval_loss(self) -> float | None: ...
    @property
    def steps_per_second(self) -> float: ...
    @property
    def elapsed_seconds(self) -> float: ...


class TrainingJob(Protocol):
    """A training job as it stands (the jobs' `JobSnapshot`)."""

    @property
    def job_id(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def state(self) -> TrainingState: ...
    @property
    def phase(self) -> str: ...
    @property
    def created_at(self) -> str: ...
    @property
    def finished_at(self) -> str: ...
    @property
    def train_examples(self) -> int: ...
    @property
    def eval_examples(self) -> int: ...
    @property
    def progress(self) -> TrainingProgress | None: ...
    @property
    def before(self) -> EvalMetrics | None: ...
    @property
    def after(self) -> EvalMetrics | None: ...
    @property
    def version(self) -> PromptInfo | None: ...
    @property
    def promoted(self) -> bool: ...
    @property
    def promotion(self) -> str: ...
    @property
    def error(self) -> str: ...
