"""gRPC servicers: protobuf in, dataclasses to the scheduler and registry, protobuf out.

Servicers stay thin: they convert messages, call one domain method, and leave status codes to the
one table in `errors.py`. No tensors are touched here.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from softprompt.prompts import format as prompt_format
from softprompt.prompts.errors import InvalidNameError
from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.registry import PromptRef, PromptVersion, Registry
from softprompt.prompts.train import EvalResult, Progress
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.admission import Admission
from softprompt.server.config import ServerConfig
from softprompt.server.errors import InvalidRequestError, UploadTooLargeError, status_for
from softprompt.server.logs import RequestIdFilter
from softprompt.server.metrics import Metrics, NoMetrics
from softprompt.server.prompt_cache import PromptCache
from softprompt.server.scheduler import Handle, Scheduler
from softprompt.server.training import JobSnapshot, TrainingJobs, TrainJobRequest
from softprompt.server.types import (
    ClassifyRequest,
    DecodingOptions,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)
# On the logger, not a handler: every record about a request carries its id, whatever handlers are set up.
log.addFilter(RequestIdFilter())

_FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}
_MAX_DESCRIPTION = 4096
_MAX_TAGS = 64
_MAX_TAG_CHARS = 256
_MAX_DETAILS_BYTES = 1024
# RegisterPrompt waits this long for the worker to prepare the new version; a busier worker does it later.
_WARM_TIMEOUT_S = 5.0

F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        incident = uuid.uuid4().hex[:12]
        log.exception("internal error %s", incident, exc_info=exc)
        context.abort(code, f"internal error {incident}: the server log has the details; please report it")
    context.abort(code, _bounded(str(exc)))


def _bounded(details: str) -> str:
    """Status details short enough for gRPC's trailing metadata.

    Messages quote what the client sent; a 100 kB task name quoted back would push the trailers past
    gRPC's 16 KiB hard limit and the client would get a bare RESOURCE_EXHAUSTED instead of the status.
    Details travel percent-encoded (up to 3 bytes per UTF-8 byte), so the cut is made in UTF-8 bytes.
    """
    raw = details.encode("utf-8")
    if len(raw) <= _MAX_DETAILS_BYTES:
        return details
    return raw[:_MAX_DETAILS_BYTES].decode("utf-8", errors="ignore") + " [...]"


def unary(fn: F) -> F:
    """Maps any exception of a unary RPC to its status code."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status
            _abort(context, exc)
    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    """Maps any exception of a server-streaming RPC to its status code."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)
    return wrapper  # type: ignore[return-value]


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _request(msg: pb.GenerateRequest, context: grpc.ServicerContext) -> GenerationRequest:
    p = msg.params
    return GenerationRequest(
        task=msg.task,
        input=msg.input,
        options=DecodingOptions(
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
            chat=p.apply_chat_template,
        ),
        deadline=_deadline(context),
    )


def _usage(u: Usage) -> pb.Usage:
    return pb.Usage(input_tokens=u.input_tokens, virtual_tokens=u.virtual_tokens, generated_tokens=u.generated_tokens)


def _stream_message(chunk: StreamChunk) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids, prompt_version=chunk.prompt_version)
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        msg.usage.CopyFrom(_usage(chunk.usage))
    return msg


def _log_done(rpc: str, version: str, usage: Usage, finish: str, started: float) -> None:
    log.info("rpc=%s task=%s input_tokens=%d virtual_tokens=%d generated_tokens=%d finish=%s ms=%.0f", rpc,
             version or "-", usage.input_tokens, usage.virtual_tokens, usage.generated_tokens, finish,
             (time.monotonic() - started) * 1000)


class InferenceService(pb_grpc.InferenceServicer):
    """Generate, GenerateStream, Tokenize and ModelInfo."""

    def __init__(self, admission: Admission, scheduler: Scheduler, config: ServerConfig,
                 metrics: Metrics | None = None) -> None:
        self.admission = admission
        self.scheduler = scheduler
        self.config = config
        self.metrics = metrics or NoMetrics()

    def _start(self, msg: pb.GenerateRequest, context: grpc.ServicerContext) -> Handle:
        handle = self.scheduler.submit(self.admission.admit(_request(msg, context)))
        # Runs on every end of the RPC; after a normal finish cancelling is a no-op.
        context.add_callback(handle.cancel)
        self.metrics.task_request(handle.admitted.prompt_version)
        return handle

    def _chunks(self, rpc: str, handle: Handle, started: float) -> Iterator[StreamChunk]:
        """The handle's chunks, recording time to first token and the tokens produced, also for a request that
        fails or is abandoned midway."""
        generated = 0
        try:
            for chunk in handle.chunks():
                if not generated:
                    self.metrics.first_token(rpc, time.monotonic() - started)
                generated += len(chunk.token_ids)
                yield chunk
        finally:
            self.metrics.tokens_generated(handle.admitted.prompt_version, generated)

    @unary
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        started = time.monotonic()
        result = GenerationResult.from_chunks(self._chunks("Generate", self._start(request, context), started))
        _log_done("Generate", result.prompt_version, result.usage, result.finish_reason, started)
        return pb.GenerateResponse(
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=_FINISH[result.finish_reason],
            usage=_usage(result.usage),
            prompt_version=result.prompt_version,
        )

    @streaming
    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        started = time.monotonic()
        for chunk in self._chunks("GenerateStream", self._start(request, context), started):
            yield _stream_message(chunk)
            if chunk.usage is not None and chunk.finish_reason is not None:
                _log_done("GenerateStream", chunk.prompt_version, chunk.usage, chunk.finish_reason, started)

    @unary
    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        t = self.admission.tokenize(request.text, chat=request.apply_chat_template)
        return pb.TokenizeResponse(token_ids=t.token_ids, tokens=t.tokens)

    @unary
    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        started = time.monotonic()
        admitted = self.admission.admit_classify(ClassifyRequest(
            task=request.task, input=request.input, labels=tuple(request.labels), chat=request.apply_chat_template,
            deadline=_deadline(context),
        ))
        future = self.scheduler.submit_scoring(admitted)
        context.add_callback(future.cancel)
        self.metrics.task_request(admitted.prompt_version)
        result = admitted.result(future.result())
        log.info("rpc=Classify task=%s labels=%d input_tokens=%d virtual_tokens=%d label=%r ms=%.0f",
                 result.prompt_version or "-", len(result.scores), result.input_tokens, result.virtual_tokens,
                 result.label, (time.monotonic() - started) * 1000)
        return pb.ClassifyResponse(
            scores=[pb.LabelScore(label=x.label, logprob=x.logprob, probability=x.probability,
                                  num_tokens=x.num_tokens) for x in result.scores],
            label=result.label,
            prompt_version=result.prompt_version,
            input_tokens=result.input_tokens,
            virtual_tokens=result.virtual_tokens,
        )

    @unary
    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        base = self.admission.engine.base
        cfg = self.config
        return pb.ModelInfoResponse(
            model_id=base.spec.model_id,
            hidden_size=base.spec.hidden_size,
            dtype=str(base.dtype).removeprefix("torch."),
            device=str(base.device),
            max_sequence_length=base.max_sequence_length,
            vocab_size=base.spec.vocab_size,
            fingerprint=base.spec.fingerprint,
            has_chat_template=bool(getattr(base.tokenizer, "chat_template", None)),
            limits=pb.Limits(
                max_new_tokens=cfg.max_new_tokens,
                default_max_new_tokens=cfg.default_max_new_tokens,
                max_input_tokens=cfg.max_input_tokens,
                max_virtual_tokens=cfg.max_virtual_tokens,
                max_batch_size=cfg.max_batch_size,
                max_queued_requests=cfg.max_queued_requests,
                max_upload_bytes=cfg.max_upload_bytes,
            ),
        )


def prompt_info(v: PromptVersion) -> pb.PromptInfo:
    """The wire form of a stored version."""
    return pb.PromptInfo(
        name=v.name,
        version=v.version,
        ref=v.ref,
        num_virtual_tokens=v.num_virtual_tokens,
        hidden_size=v.hidden_size,
        sha256=v.sha256,
        base_model_fingerprint=v.base_model_fingerprint,
        created_at=v.created_at,
        description=v.description,
        tags=dict(v.tags),
        aliases=list(v.aliases),
        peft_type=v.source_type,
        metrics=dict(v.metrics),
    )


class RegistryService(pb_grpc.RegistryServicer):
    """Register, inspect, list, delete and alias prompt versions."""

    def __init__(self, registry: Registry, admission: Admission, prompts: PromptCache, scheduler: Scheduler,
                 config: ServerConfig) -> None:
        self.registry = registry
        self.admission = admission
        self.scheduler = scheduler
        self.base = admission.engine.base.spec
        self.prompts = prompts
        self.prefixes = admission.engine.prefixes
        self.config = config

    @unary
    def RegisterPrompt(self, request: pb.RegisterPromptRequest, context: grpc.ServicerContext) -> pb.PromptInfo:
        _check_size(request, self.config.max_upload_bytes, "register a shorter prompt")
        ref = PromptRef.parse(request.name)
        if ref.version is not None or ref.alias is not None:
            raise InvalidNameError(f"register under a bare task name, not {request.name!r}; versions are numbered by the server")
        _check_description(request.description, request.tags)
        limit = self.config.max_virtual_tokens
        source = request.WhichOneof("source")
        if source == "peft":
            prompt = prompt_format.parse_peft_adapter(
                request.peft.adapter_config_json, request.peft.adapter_model_safetensors, self.base,
                max_virtual_tokens=limit, force=request.force,
            )
        elif source == "tensor":
            t = request.tensor
            prompt = prompt_format.parse_raw_tensor(list(t.shape), t.dtype, t.data, self.base, max_virtual_tokens=limit)
        else:
            raise InvalidRequestError("RegisterPromptRequest needs a source: set `peft` (a PEFT adapter) or `tensor`")
        prompt_format.check_base_model(request.base_model_fingerprint, self.base, force=request.force)
        version = self.registry.register(
            ref.name, prompt, self.base, description=request.description, tags=dict(request.tags)
        )
        log.info("registered %s (%d virtual tokens, sha256 %s)", version.ref, version.num_virtual_tokens, version.sha256[:12])
        self._warm(version.ref)
        return prompt_info(version)

    def _warm(self, ref: str) -> None:
        """Loads a new version onto the device and computes its prefix keys and values before RegisterPrompt
        answers, so the next request for it costs what a request for any cached version costs."""
        try:
            prompt, _, key = self.admission.resolve(ref)
            assert prompt is not None and key is not None
            self.scheduler.call(lambda: self.admission.engine.warm(prompt, key), timeout=_WARM_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the version is stored; its first request just does this work itself
            log.warning("could not prepare %s ahead of its first request", ref, exc_info=True)

    @unary
    def GetPrompt(self, request: pb.GetPromptRequest, context: grpc.ServicerContext) -> pb.PromptInfo:
        return prompt_info(self.registry.resolve(request.ref))

    @unary
    def ListPrompts(self, request: pb.ListPromptsRequest, context: grpc.ServicerContext) -> pb.ListPromptsResponse:
        page_size = min(request.page_size or 100, 1000)
        versions, token = self.registry.list_page(request.name or None, page_size, request.page_token)
        return pb.ListPromptsResponse(prompts=[prompt_info(v) for v in versions], next_page_token=token)

    @unary
    def DeletePrompt(self, request: pb.DeletePromptRequest, context: grpc.ServicerContext) -> pb.DeletePromptResponse:
        deleted = self.registry.delete(request.ref, all_versions=request.all_versions, force=request.force)
        for ref in deleted:
            name, _, version = ref.partition("@")
            self.prompts.evict(name, int(version) if version.isdigit() else None)
            self.prefixes.evict(name, int(version) if version.isdigit() else None)
        log.info("deleted %s", ", ".join(deleted))
        return pb.DeletePromptResponse(deleted=deleted)

    @unary
    def SetAlias(self, request: pb.SetAliasRequest, context: grpc.ServicerContext) -> pb.PromptInfo:
        version = self.registry.set_alias(request.name, request.alias, request.version)
        log.info("alias %s@%s -> %s", request.name, request.alias, version.ref)
        return prompt_info(version)


class TrainingService(pb_grpc.TrainingServicer):
    """Server-side training jobs on the serving model."""

    def __init__(self, jobs: TrainingJobs, config: ServerConfig) -> None:
        self.jobs = jobs
        self.config = config

    @unary
    def TrainPrompt(self, request: pb.TrainPromptRequest, context: grpc.ServicerContext) -> pb.TrainingJob:
        _check_size(request, self.config.max_upload_bytes, "send fewer examples")
        _check_description(request.description, request.tags)
        job = self.jobs.submit(TrainJobRequest(
            task=request.task,
            train_jsonl=request.train_jsonl,
            eval_jsonl=request.eval_jsonl,
            options=_training_options(request.options),
            description=request.description,
            tags=dict(request.tags),
            promote_alias=request.promote_alias,
        ))
        return _job_message(job)

    @unary
    def GetTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> pb.TrainingJob:
        return _job_message(self.jobs.get(request.job_id))

    @streaming
    def WatchTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> Iterator[pb.TrainingJob]:
        for snapshot in self.jobs.watch(request.job_id, context.is_active):
            yield _job_message(snapshot)

    @unary
    def CancelTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> pb.TrainingJob:
        job = self.jobs.cancel(request.job_id)
        log.info("training job %s: cancel requested (%s)", job.job_id, job.state)
        return _job_message(job)

    @unary
    def ListTrainingJobs(self, request: pb.ListTrainingJobsRequest,
                         context: grpc.ServicerContext) -> pb.ListTrainingJobsResponse:
        return pb.ListTrainingJobsResponse(jobs=[_job_message(j) for j in self.jobs.list()])


_STATES = {
    "queued": pb.TRAINING_STATE_QUEUED,
    "running": pb.TRAINING_STATE_RUNNING,
    "succeeded": pb.TRAINING_STATE_SUCCEEDED,
    "failed": pb.TRAINING_STATE_FAILED,
    "cancelled": pb.TRAINING_STATE_CANCELLED,
}


def _training_options(m: pb.TrainingOptions) -> TrainingOptions:
    """Wire options to the dataclass; zero or unset fields take the defaults."""
    d = TrainingOptions()
    try:
        return TrainingOptions(
            num_virtual_tokens=m.num_virtual_tokens or d.num_virtual_tokens,
            init=m.init or d.init,
            learning_rate=m.learning_rate or d.learning_rate,
            epochs=m.epochs or d.epochs,
            max_steps=m.max_steps,
            batch_size=m.batch_size or d.batch_size,
            grad_accum=m.grad_accum or d.grad_accum,
            max_length=m.max_length or d.max_length,
            seed=m.seed if m.HasField("seed") else d.seed,
            eval_fraction=m.eval_fraction if m.HasField("eval_fraction") else d.eval_fraction,
            eval_every=m.eval_every,
            patience=m.patience if m.HasField("patience") else d.patience,
            apply_chat_template=m.apply_chat_template,
            warmup_steps=m.warmup_steps,
        )
    except ValueError as e:
        raise InvalidRequestError(f"training options: {e}") from None


def _metrics(r: EvalResult | None) -> pb.EvalMetrics | None:
    if r is None:
        return None
    return pb.EvalMetrics(examples=r.examples, loss=r.loss, exact_match=r.exact_match, accuracy=r.accuracy)


def _progress(p: Progress | None) -> pb.TrainingProgress | None:
    if p is None:
        return None
    return pb.TrainingProgress(
        step=p.step, total_steps=p.total_steps, epoch=p.epoch, train_loss=p.train_loss or 0.0,
        eval_loss=p.eval_loss, best_eval_loss=p.best_eval_loss or 0.0, steps_per_second=p.steps_per_second,
        elapsed_seconds=p.elapsed_seconds,
    )


def _job_message(j: JobSnapshot) -> pb.TrainingJob:
    return pb.TrainingJob(
        job_id=j.job_id,
        task=j.task,
        state=_STATES[j.state],
        phase=j.phase,
        progress=_progress(j.progress),
        before=_metrics(j.before),
        after=_metrics(j.after),
        version=None if j.version is None else prompt_info(j.version),
        promoted=j.promoted,
        promotion=j.promotion,
        error=j.error,
        created_at=j.created_at,
        finished_at=j.finished_at,
        train_examples=j.train_examples,
        eval_examples=j.eval_examples,
    )


def _check_size(request: Any, limit: int, fix: str) -> None:
    size = request.ByteSize()
    if size > limit:
        raise UploadTooLargeError(
            f"the upload is {size} bytes; this server accepts at most {limit} (serve with a larger --max-upload-mb, "
            f"or {fix})"
        )


def _check_description(description: str, tags: Any) -> None:
    if len(description) > _MAX_DESCRIPTION:
        raise InvalidRequestError(f"description has {len(description)} characters; keep it under {_MAX_DESCRIPTION}")
    if len(tags) > _MAX_TAGS:
        raise InvalidRequestError(f"{len(tags)} tags given; at most {_MAX_TAGS} are allowed")
    for k, v in tags.items():
        if not k or len(k) > _MAX_TAG_CHARS or len(v) > _MAX_TAG_CHARS:
            raise InvalidRequestError(f"tag keys must be 1..{_MAX_TAG_CHARS} characters and values at most {_MAX_TAG_CHARS}: {k!r:.40}")
