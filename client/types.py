"""Plain result types returned by the client.

These are frozen dataclasses built from the protobuf responses (see `softprompt.client.convert`),
so callers never handle generated protobuf classes and can use `dataclasses.asdict` for JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from softprompt.prompts.outcomes import FinishReason, TrainingState

__all__ = [
    "Usage",
    "GenerateResult",
    "StreamChunk",
    "PromptInfo",
    "ExportedPrompt",
    "Limits",
    "KvCache",
    "CacheTier",
    "TaskLoad",
    "ModelInfo",
    "TokenizeResult",
    "LabelScore",
    "ClassifyResult",
    "EvalMetrics",
    "TrainingProgress",
    "TrainingJob",
]

@dataclass(frozen=True)
class Usage:
    """Token counts of one generation.

    Attributes:
        input_tokens: real tokens of the input, after the chat template (if applied).
        virtual_tokens: soft-prompt tokens prepended to the input (0 for the bare model).
        generated_tokens: tokens the model produced.
    """

    input_tokens: int
    virtual_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class GenerateResult:
    """The completion of one `generate` call.

    Attributes:
        text: the generated text (a matched stop sequence is not included).
        token_ids: the generated token ids.
        finish_reason: FinishReason.LENGTH, STOP or EOS (equal to "length", "stop", "eos"); "" if the
            server did not say.
        usage: token counts.
        prompt_version: the prompt version actually used, e.g. "sentiment@3"; "" for the bare model.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | Literal[""]
    usage: Usage
    prompt_version: str


@dataclass(frozen=True)
class StreamChunk:
    """One message of a streamed generation.

    Attributes:
        text: the text produced since the previous chunk.
        token_ids: the tokens produced since the previous chunk.
        finish_reason: FinishReason.LENGTH, STOP or EOS on the last chunk; None before it.
        usage: token counts, on the last chunk only.
        prompt_version: the prompt version used, e.g. "sentiment@3"; "" for the bare model.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    usage: Usage | None
    prompt_version: str


@dataclass(frozen=True)
class PromptInfo:
    """One registered, immutable prompt version.

    Attributes:
        name: the task name.
        version: the version number (1, 2, ...).
        ref: "name@version".
        num_virtual_tokens: rows of the soft-prompt matrix.
        hidden_size: columns of the soft-prompt matrix (the base model's hidden size).
        sha256: checksum of the stored adapter_model.safetensors.
        base_model_fingerprint: fingerprint of the base model the prompt was made for ("" if unknown).
        created_at: RFC 3339 timestamp, UTC.
        description: free text given at registration.
        tags: free key/value labels given at registration.
        aliases: aliases pointing at this version (e.g. ("prod",)).
        peft_type: what it was uploaded or trained as: "PROMPT_TUNING", "P_TUNING", "RAW",
            "MULTITASK_PROMPT_TUNING", "CPT", "PREFIX_TUNING" or "CARTRIDGE".
        metrics: held-out metrics recorded by softprompt training ("eval_loss", "exact_match",
            "accuracy"); empty for uploaded prompts.
        candidate: registered by a training run whose quality gate kept its alias on another version;
            served when named ("name@N") or through an alias pointed at it, never by the bare name.
        method: how it is served: "prompt" (virtual-token embeddings in front of the input) or
            "prefix" (keys and values in every layer's KV cache: PREFIX_TUNING, CARTRIDGE).
        num_layers, kv_heads, head_dim: a "prefix" version's keys and values per virtual token (0 for "prompt").
        size_bytes: bytes of the stored float32 matrix.
        peft_task_id: the MULTITASK_PROMPT_TUNING task it was materialized from (None otherwise).
    """

    name: str
    version: int
    ref: str
    num_virtual_tokens: int
    hidden_size: int
    sha256: str
    base_model_fingerprint: str
    created_at: str
    description: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    peft_type: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    candidate: bool = False
    method: str = ""
    num_layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    size_bytes: int = 0
    peft_task_id: int | None = None


@dataclass(frozen=True)
class ExportedPrompt:
    """A version whose files `export_prompt` wrote into a folder.

    Attributes:
        prompt: the version the reference resolved to.
        directory: the folder the files are in; `peft.PeftModel.from_pretrained(base_model, directory)` loads it.
        files: the names written: adapter_config.json, adapter_model.safetensors, softprompt.json and, for a
            trained version, training.json (its report) and loss.png (its loss curve).
    """

    prompt: PromptInfo
    directory: Path
    files: tuple[str, ...]


@dataclass(frozen=True)
class Limits:
    """The server's request limits (0 means unlimited or not reported).

    Attributes:
        max_new_tokens: the largest max_new_tokens a request may ask for.
        default_max_new_tokens: what max_new_tokens=0 means.
        max_input_tokens: the longest input, in real tokens.
        max_virtual_tokens: the longest soft prompt the server accepts.
        max_batch_size: requests decoded together in one batch.
        max_queued_requests: requests waiting before new ones are refused (RESOURCE_EXHAUSTED).
        max_upload_bytes: the largest prompt upload accepted by `register`.
        max_stop_sequences: the most stop sequences a request may give.
        max_labels: the most candidate labels a Classify request may give.
    """

    max_new_tokens: int
    default_max_new_tokens: int
    max_input_tokens: int
    max_virtual_tokens: int
    max_batch_size: int
    max_queued_requests: int
    max_upload_bytes: int
    max_stop_sequences: int = 0  # 0: a server older than these fields
    max_labels: int = 0


@dataclass(frozen=True)
class KvCache:
    """The server's KV cache: a pool of fixed-size blocks reserved at startup, and how full it is now.

    A request whose input plus max_new_tokens could never fit is refused (InvalidArgumentError);
    requests beyond what is free wait, or running ones are preempted and recomputed later.

    Attributes:
        block_size: token slots per block.
        total_blocks: blocks requests may hold.
        used_blocks: blocks requests hold now.
        rows: requests holding blocks now.
        bytes_per_token: keys and values of one token over all layers.
        total_tokens: tokens the pool holds when full.
        free_tokens: token slots in free blocks.
    """

    block_size: int
    total_blocks: int
    used_blocks: int
    rows: int
    bytes_per_token: int
    total_tokens: int
    free_tokens: int

    @property
    def total_bytes(self) -> int:
        """The pool's size in bytes."""
        return self.total_tokens * self.bytes_per_token


@dataclass(frozen=True)
class CacheTier:
    """One tier of the server's prompt memory (`ModelInfo.caches`), to size its budget.

    Attributes:
        name: "host" (every version's prompt matrix in host memory), "prompt" (matrices on the serving
            device) or "prefix" (keys and values of prompts' virtual tokens).
        entries: versions (or prefixes) held now.
        bytes: bytes held now.
        capacity_bytes: the budget (--host-cache-mb, --prompt-cache-mb, --prefix-cache-mb); beyond it the
            least recently used are evicted.
        hits: lookups that found their entry since the server started.
        misses: lookups that did not (the next tier, or the store, filled it).
        loads: entries put in (after a miss, at registration, by the host tier's background load or by prefix warming).
        evictions: entries dropped to stay within the budget.
        pending: "host": versions its background load has still to read; "prefix": versions idle-time warming
            has still to look at (0 once done).
    """

    name: str
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int
    loads: int
    evictions: int
    pending: int

    @property
    def hit_rate(self) -> float:
        """Hits per lookup since the server started (0 before the first)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass(frozen=True)
class TaskLoad:
    """One task's use of the server, as its fair share sees it (`ModelInfo.tasks`, `softprompt top`).

    Attributes:
        task: the task's name; "-" for the bare model.
        running: rows it holds in the batch now.
        queued: requests it has waiting.
        share: fraction of the running rows it holds.
        fair_share: fraction its weight entitles it to among the tasks busy now.
        weight: its weight (the server's --task-policy; 1 without).
        priority: its requests' default priority (lower is served first).
        tokens_per_second: input and output tokens computed for it lately.
        input_tokens: positions prefilled or scored for it since the server started.
        output_tokens: tokens generated for it since the server started.
        refused: requests refused by its limits since the server started.
    """

    task: str
    running: int
    queued: int
    share: float
    fair_share: float
    weight: float
    priority: int
    tokens_per_second: float
    input_tokens: int
    output_tokens: int
    refused: int


@dataclass(frozen=True)
class ModelInfo:
    """The base model served and the server's limits.

    Attributes:
        model_id: the model's name or path.
        hidden_size: embedding width; soft prompts must have this many columns.
        dtype: the weights' dtype, e.g. "bfloat16".
        device: where the model runs, e.g. "cuda:0".
        max_sequence_length: the model's context length.
        vocab_size: the tokenizer's vocabulary size.
        fingerprint: identifies the base weights; compare with PromptInfo.base_model_fingerprint.
        limits: the server's request limits.
        has_chat_template: whether `chat=True` is supported.
        kv_cache: the KV cache's size and use when asked (None from servers that do not report it).
        tasks: every task busy now or lately (those the caller's token may use), as fair share sees it.
        caches: the tiers of prompt memory (host, prompt, prefix): bytes against budgets, hit counts.
    """

    model_id: str
    hidden_size: int
    dtype: str
    device: str
    max_sequence_length: int
    vocab_size: int
    fingerprint: str
    limits: Limits
    has_chat_template: bool
    kv_cache: KvCache | None = None
    tasks: tuple[TaskLoad, ...] = ()
    caches: tuple[CacheTier, ...] = ()


@dataclass(frozen=True)
class TokenizeResult:
    """The tokenization of a text.

    Attributes:
        token_ids: the token ids.
        tokens: the token strings, one per id.
    """

    token_ids: list[int]
    tokens: list[str]


@dataclass(frozen=True)
class LabelScore:
    """How likely one candidate label is as the complete output.

    Attributes:
        label: the candidate label.
        logprob: sum of the log-probabilities of the label's tokens and the token ending the output
            (end-of-sequence, or the chat template's end of turn).
        probability: softmax of logprob over the candidate labels.
        num_tokens: tokens scored, the ending token included.
    """

    label: str
    logprob: float
    probability: float
    num_tokens: int


@dataclass(frozen=True)
class ClassifyResult:
    """The scores of one `classify` call.

    Attributes:
        scores: one score per candidate label, in the order the labels were given.
        label: the most likely label.
        prompt_version: the prompt version used, e.g. "sentiment@3"; "" for the bare model.
        input_tokens: real tokens of the input, after the chat template (if applied).
        virtual_tokens: soft-prompt tokens prepended to the input (0 for the bare model).
    """

    scores: list[LabelScore]
    label: str
    prompt_version: str
    input_tokens: int
    virtual_tokens: int


@dataclass(frozen=True)
class EvalMetrics:
    """Held-out metrics of one prompt, measured by a training job.

    Attributes:
        examples: held-out examples evaluated.
        loss: mean cross-entropy per target token.
        exact_match: share of greedy generations equal to the target.
        accuracy: classification data only: share of examples whose target scores highest among
            the distinct targets; None for other data.
    """

    examples: int
    loss: float
    exact_match: float
    accuracy: float | None = None


@dataclass(frozen=True)
class TrainingProgress:
    """Where a training job stands.

    Attributes:
        step: optimizer steps done.
        total_steps: optimizer steps planned (early stopping may end sooner).
        epoch: passes over the training data done, fractional.
        train_loss: running mean of the training loss over the last steps.
        eval_loss: the latest held-out loss; None before the first evaluation.
        best_eval_loss: the lowest held-out loss so far.
        steps_per_second: recent training speed.
        elapsed_seconds: time since the job started running.
    """

    step: int
    total_steps: int
    epoch: float
    train_loss: float
    eval_loss: float | None
    best_eval_loss: float
    steps_per_second: float
    elapsed_seconds: float


@dataclass(frozen=True)
class TrainingJob:
    """A server-side training job, as `train`, `get_training_job` and `watch_training_job` return it.

    Attributes:
        job_id: identifies the job on the server (jobs live until the server restarts).
        task: the task the trained prompt is registered under.
        state: a TrainingState (equal to "queued", "running", "succeeded", "failed" or "cancelled");
            "" if the server did not say.
        phase: what the job is doing now, e.g. "training", "evaluating", "registering".
        progress: steps, losses and speed so far.
        before: held-out metrics of the initial prompt; None until measured.
        after: held-out metrics of the trained prompt; None until measured.
        version: the registered version; None unless the job succeeded.
        promoted: whether TASK@promote_alias was moved to the new version.
        promotion: why the alias moved or did not ("" if no alias was asked for).
        error: what went wrong, when the job failed.
        created_at: RFC 3339 timestamp, UTC.
        finished_at: RFC 3339 timestamp, UTC; "" while the job is not done.
        train_examples: training examples used.
        eval_examples: held-out examples used.
    """

    job_id: str
    task: str
    state: TrainingState | Literal[""]
    phase: str
    progress: TrainingProgress
    before: EvalMetrics | None
    after: EvalMetrics | None
    version: PromptInfo | None
    promoted: bool
    promotion: str
    error: str
    created_at: str
    finished_at: str
    train_examples: int
    eval_examples: int

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled); it will not change again."""
        return isinstance(self.state, TrainingState) and self.state.finished
