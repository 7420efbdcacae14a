"""One definition of each call the clients make: which RPC, the request it sends, how its response reads.

Every public method of `Client` and `AsyncClient` is one function here, holding the method's signature and
documentation; it prepares the call (a `Unary`, `Streaming`, `Paged` or `Until`) without sending anything.
`softprompt.client.methods` makes each function a method of both clients, which send what it prepared,
blocking or awaited. What a request needs beyond its arguments (decoding options merged with keywords, a
prompt source read, training data as JSONL) comes from `requests`; responses are read by `convert`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf.message import Message

from softprompt.client import convert, requests
from softprompt.client.requests import TrainingData
from softprompt.client.sources import PromptSource
from softprompt.client.types import (
    ClassifyResult,
    ExportedPrompt,
    GenerateResult,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TokenizeResult,
    TrainingJob,
)
from softprompt.prompts.options import DecodingOptions, TrainingOptions
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos.options import decoding_to_pb, options_to_pb

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from softprompt.prompts.options import DecodingKeywords

R = TypeVar("R")


@dataclass(frozen=True)
class Rpc:
    """One RPC: its service ("Inference", "Registry" or "Training") and its method's name there."""

    service: str
    method: str

    @property
    def name(self) -> str:
        """The call as errors name it: "Service/Method"."""
        return f"{self.service}/{self.method}"


@dataclass(frozen=True)
class _Call(Generic[R]):
    """What every call holds; see `Unary`."""

    rpc: Rpc
    request: Message
    response: Callable[[Any], R]
    timeout: float | None
    task: str = ""


@dataclass(frozen=True)
class Unary(_Call[R]):
    """A unary call: `request` to `rpc`, whose response `response` converts.

    `timeout` None means the client's default deadline. A non-empty `task` is the task to route on
    (the client's `route_by_task`).
    """


@dataclass(frozen=True)
class Streaming(_Call[R]):
    """A server-streaming call, each message converted by `response`; the rest as for `Unary`.

    `patient`: the client's default deadline does not apply (a watch may rightly last hours).
    """

    patient: bool = False


@dataclass(frozen=True)
class Paged(Generic[R]):
    """Unary calls chained by page token: `page(token)` prepares one page's call ("" the first page's),
    which reads as the page's items and the next page's token ("" after the last page)."""

    page: Callable[[str], Unary[tuple[list[R], str]]]


@dataclass(frozen=True)
class Until(Generic[R]):
    """The first item of `watch` for which `done` holds; `fallback`'s result if the stream ends first."""

    watch: Streaming[R]
    done: Callable[[R], bool]
    fallback: Unary[R]


# ------------------------------------------------------------------ Inference


def generate(
    task: str,
    input: str,
    *,
    options: DecodingOptions | None = None,
    priority: int | None = None,
    timeout: float | None = None,
    **decoding: Unpack[DecodingKeywords],
) -> Unary[GenerateResult]:
    """Generates a completion of `input` under the prompt `task` ("" for the bare model).

    `task` is "name" (newest version), "name@3" or "name@alias". How tokens are picked and when
    generation stops is a `DecodingOptions`: pass one as `options`, or its fields as keywords
    (`max_new_tokens=40, chat=True`), or both (the keywords replace those fields of `options`). Decoding
    is greedy unless `temperature` > 0; 0 values mean the server's defaults. `stop` sequences end
    generation and are not returned. `chat` wraps the input with the model's chat template.

    `priority` is how soon the request is served, not how it decodes: lower is served first (as vLLM's),
    a more urgent request may preempt less urgent ones, and None means the task's default on the server
    (0 unless its --task-policy says otherwise). The token's role bounds how urgent a request may be
    (`PermissionDeniedError` beyond).

    Raises:
        TypeError: a keyword is not a `DecodingOptions` field.
    """
    request = _generate_request(task, input, requests.decoding_options(options, **decoding), priority)
    return Unary(Rpc("Inference", "Generate"), request, convert.generate_result, timeout, task)


def stream(
    task: str,
    input: str,
    *,
    options: DecodingOptions | None = None,
    priority: int | None = None,
    timeout: float | None = None,
    **decoding: Unpack[DecodingKeywords],
) -> Streaming[StreamChunk]:
    """Like `generate`, yielding text deltas as they are produced (with `AsyncClient`: `async for`).

    The last chunk carries `finish_reason` and `usage`. The call starts on the first `next()`;
    closing the iterator early (break, `close()`; `aclose()` with `AsyncClient`) cancels it on the server.
    """
    request = _generate_request(task, input, requests.decoding_options(options, **decoding), priority)
    return Streaming(Rpc("Inference", "GenerateStream"), request, convert.stream_chunk, timeout, task)


def _generate_request(task: str, input: str, options: DecodingOptions, priority: int | None) -> pb.GenerateRequest:
    # None leaves the optional field unset: the server then uses the task's default priority.
    return pb.GenerateRequest(task=task, input=input, params=decoding_to_pb(options), priority=priority)


def tokenize(text: str, chat: bool = False, *, timeout: float | None = None) -> Unary[TokenizeResult]:
    """Tokenizes `text` with the base model's tokenizer (through its chat template if `chat`)."""
    request = pb.TokenizeRequest(text=text, apply_chat_template=chat)
    return Unary(Rpc("Inference", "Tokenize"), request, convert.tokenize_result, timeout)


def classify(
    task: str, input: str, labels: Iterable[str], *, chat: bool = False, timeout: float | None = None
) -> Unary[ClassifyResult]:
    """Scores each of `labels` as the complete output for `input` under the prompt `task`.

    `task` is a prompt reference as in `generate` ("" for the bare model); `labels` are two or
    more distinct, non-empty strings. Each label's log-probability covers its tokens and the
    token that ends the output (end-of-sequence; with `chat`, the template's end of turn);
    probabilities are normalized over the labels. `chat` wraps the input
    with the model's chat template (do so if the prompt was trained that way).
    """
    request = pb.ClassifyRequest(task=task, input=input, labels=requests.labels(labels), apply_chat_template=chat)
    return Unary(Rpc("Inference", "Classify"), request, convert.classify_result, timeout, task)


def model_info(*, timeout: float | None = None) -> Unary[ModelInfo]:
    """Describes the base model and the server's limits."""
    return Unary(Rpc("Inference", "ModelInfo"), pb.ModelInfoRequest(), convert.model_info, timeout)


# ------------------------------------------------------------------ Registry


def register(
    task: str,
    source: PromptSource,
    *,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    base_model_fingerprint: str = "",
    force: bool = False,
    task_id: int | None = None,
    timeout: float | None = None,
) -> Unary[PromptInfo]:
    """Stores `source` as the next version of `task` and returns it.

    `source` is a PEFT `save_pretrained` directory (any prompt-learning method: PROMPT_TUNING, P_TUNING,
    PREFIX_TUNING, CARTRIDGE, MULTITASK_PROMPT_TUNING, CPT), a .safetensors file holding one
    [num_virtual_tokens, hidden_size] tensor, or such a tensor in memory (torch or numpy); it is read
    before the call (synchronously, with `AsyncClient` too). `task_id` picks the task of a
    MULTITASK_PROMPT_TUNING adapter (needed when it holds several). Registration fails with
    FailedPreconditionError if `base_model_fingerprint` (or the one recorded in the directory's
    softprompt.json) differs from the server's, unless `force`.

    Raises:
        FileNotFoundError, ValueError, TypeError: `source` cannot be read as a prompt.
        SoftpromptError: the server refused it.
    """
    request = pb.RegisterPromptRequest(
        name=task, description=description, tags=dict(tags or {}), base_model_fingerprint=base_model_fingerprint,
        force=force,
    )
    requests.add_source(request, source, task_id=task_id)
    return Unary(Rpc("Registry", "RegisterPrompt"), request, convert.prompt_info, timeout)


def get_prompt(ref: str, *, timeout: float | None = None) -> Unary[PromptInfo]:
    """Describes one version: `ref` is "name" (newest), "name@3" or "name@alias"."""
    return Unary(Rpc("Registry", "GetPrompt"), pb.GetPromptRequest(ref=ref), convert.prompt_info, timeout)


def iter_prompts(task: str | None = None, page_size: int = 0, *, timeout: float | None = None) -> Paged[PromptInfo]:
    """Yields every version (of `task`, or of all tasks), fetching pages as needed (with `AsyncClient`:
    `async for`). `timeout` applies to each page's call."""

    def page(token: str) -> Unary[tuple[list[PromptInfo], str]]:
        request = pb.ListPromptsRequest(name=task or "", page_size=page_size, page_token=token)
        return Unary(Rpc("Registry", "ListPrompts"), request, convert.prompt_page, timeout)

    return Paged(page)


def list_prompts(task: str | None = None, page_size: int = 0, *, timeout: float | None = None) -> Paged[PromptInfo]:
    """Returns every version (of `task`, or of all tasks), following all pages."""
    return iter_prompts(task, page_size, timeout=timeout)


def list_prompts_page(task: str | None = None, page_size: int = 0, page_token: str = "", *,
                      timeout: float | None = None) -> Unary[tuple[list[PromptInfo], str]]:
    """One page of versions (of `task`, or of all tasks: tasks by name, each newest first) and the token of the
    next page ("" after the last); `page_token` "" is the first page, `page_size` 0 the server's default (100;
    at most 1000). Pages stay consistent while versions are added or deleted."""
    request = pb.ListPromptsRequest(name=task or "", page_size=page_size, page_token=page_token)
    return Unary(Rpc("Registry", "ListPrompts"), request, convert.prompt_page, timeout)


def delete_prompt(
    ref: str, *, all_versions: bool = False, force: bool = False, timeout: float | None = None
) -> Unary[list[str]]:
    """Deletes "name@N" (or, with `all_versions`, the whole task "name"); returns the refs deleted.

    A version an alias points at is kept unless `force` (which removes those aliases too).
    """
    request = pb.DeletePromptRequest(ref=ref, all_versions=all_versions, force=force)
    return Unary(Rpc("Registry", "DeletePrompt"), request, convert.deleted_refs, timeout)


def export_prompt(ref: str, directory: str | os.PathLike[str], *, timeout: float | None = None) -> Unary[ExportedPrompt]:
    """Writes every file of the version `ref` names ("name", "name@3", "name@alias") into `directory`.

    The folder (created if missing; files of the same names are replaced) holds the PEFT adapter
    (`peft.PeftModel.from_pretrained(base_model, directory)` loads it), softprompt.json and, for a version a
    training run registered, its report (training.json) and loss plot (loss.png). The files are written when
    the answer arrives (with `AsyncClient` too).

    Raises:
        OSError: the folder cannot be written.
    """
    target = Path(directory).expanduser()
    request = pb.ExportPromptRequest(ref=ref)
    return Unary(Rpc("Registry", "ExportPrompt"), request, lambda msg: convert.exported_prompt(msg, target), timeout)


def set_alias(task: str, alias: str, version: int, *, timeout: float | None = None) -> Unary[PromptInfo]:
    """Points "task@alias" at `version`; returns that version."""
    request = pb.SetAliasRequest(name=task, alias=alias, version=version)
    return Unary(Rpc("Registry", "SetAlias"), request, convert.prompt_info, timeout)


# ------------------------------------------------------------------ Training


def train(
    task: str,
    train_data: TrainingData,
    eval_data: TrainingData | None = None,
    *,
    options: TrainingOptions | None = None,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    promote_alias: str = "",
    timeout: float | None = None,
) -> Unary[TrainingJob]:
    """Starts training a new version of `task` on the server's base model; returns the queued job.

    `train_data` and `eval_data` are each a JSONL file path, its bytes, or an iterable of
    {"input": ..., "target": ...} dicts, read before the call (synchronously, with `AsyncClient` too).
    Without `eval_data` the server holds out `options.eval_fraction` of the training data. With
    `promote_alias`, "task@alias" moves to the new version only if it beats the alias's current version
    on the held-out data. Follow the job with `watch_training_job` or `wait_for_training_job`.

    The data travels inline in one request: the server refuses requests larger than its upload
    limit (`model_info().limits.max_upload_bytes`) with ResourceExhaustedError.

    Raises:
        OSError, TypeError: the data cannot be read.
        InvalidArgumentError: the server refused the data or options.
    """
    request = pb.TrainPromptRequest(
        task=task,
        train_jsonl=requests.training_jsonl(train_data),
        eval_jsonl=b"" if eval_data is None else requests.training_jsonl(eval_data),
        options=options_to_pb(options or TrainingOptions()),  # None: the defaults, every field sent
        description=description,
        tags=dict(tags or {}),
        promote_alias=promote_alias,
    )
    return Unary(Rpc("Training", "TrainPrompt"), request, convert.training_job, timeout)


def get_training_job(job_id: str, *, timeout: float | None = None) -> Unary[TrainingJob]:
    """Returns the job `job_id` as it stands now."""
    request = pb.TrainingJobRequest(job_id=job_id)
    return Unary(Rpc("Training", "GetTrainingJob"), request, convert.training_job, timeout)


def watch_training_job(job_id: str, *, timeout: float | None = None) -> Streaming[TrainingJob]:
    """Yields the job `job_id` each time it changes; the iteration ends when the job does.

    Unlike other calls, the client's default timeout does not apply: jobs may run for hours,
    so the watch has no deadline unless `timeout` (seconds, for the whole watch) is given.
    Closing the iterator early stops watching; the job itself goes on.
    """
    request = pb.TrainingJobRequest(job_id=job_id)
    return Streaming(Rpc("Training", "WatchTrainingJob"), request, convert.training_job, timeout, patient=True)


def wait_for_training_job(job_id: str, *, timeout: float | None = None) -> Until[TrainingJob]:
    """Watches the job `job_id` until it ends and returns it (succeeded, failed or cancelled).

    `timeout` bounds the whole wait (default: none, see `watch_training_job`); when it passes,
    DeadlineExceededError is raised and the job goes on.
    """
    # The watch may end without a final state (e.g. it began just as the job ended): then ask directly.
    return Until(watch_training_job(job_id, timeout=timeout), _job_done, get_training_job(job_id, timeout=timeout))


def _job_done(job: TrainingJob) -> bool:
    return job.done


def cancel_training_job(job_id: str, *, timeout: float | None = None) -> Unary[TrainingJob]:
    """Stops a queued or running job (nothing is registered) and returns it."""
    request = pb.TrainingJobRequest(job_id=job_id)
    return Unary(Rpc("Training", "CancelTrainingJob"), request, convert.training_job, timeout)


def list_training_jobs(*, timeout: float | None = None) -> Unary[list[TrainingJob]]:
    """Returns the server's training jobs, newest first (jobs are kept until it restarts)."""
    return Unary(Rpc("Training", "ListTrainingJobs"), pb.ListTrainingJobsRequest(), convert.training_jobs, timeout)
