"""gRPC servicers: protobuf in, one service call, protobuf out.

Servicers stay thin: `convert` turns messages into the service layer's dataclasses and back, the
services (the Protocols of `softprompt.server.service.api`, built by `server/app`) do the work, and
status codes come from the one table in `status.py`. What is gRPC's own stays here: the deadline and
cancellation of an RPC, the message-size check, status details, and the per-RPC log lines.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.core.errors import UploadTooLargeError
from softprompt.server.core.types import GenerationResult, StreamChunk, Usage
from softprompt.server.grpc_api import convert
from softprompt.server.access.callers import CURRENT_CALLER
from softprompt.server.grpc_api.status import status_for
from softprompt.server.service.statuses import retry_after
from softprompt.server.observability.logs import RequestIdFilter
from softprompt.server.service.api import Inference, Prompts, Training

log = logging.getLogger(__name__)
# On the logger, not a handler: every record about a request carries its id, whatever handlers are set up.
log.addFilter(RequestIdFilter())

_MAX_DETAILS_BYTES = 1024
RETRY_AFTER_KEY = "retry-after"  # trailing metadata of RESOURCE_EXHAUSTED answers: whole seconds to wait

F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = status_for(exc)
    wait = retry_after(exc)
    if wait is not None:  # as HTTP's Retry-After: how long a client told to back off should wait, in seconds
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(wait)),))
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


def _check_size(request: Any, limit: int, fix: str) -> None:
    """Refuses a message past the upload limit (gRPC itself only refuses past twice that)."""
    size = request.ByteSize()
    if size > limit:
        raise UploadTooLargeError(
            f"the upload is {size} bytes; this server accepts at most {limit} (serve with a larger --max-upload-mb, "
            f"or {fix})"
        )


def _log_done(rpc: str, version: str, usage: Usage, finish: str, started: float) -> None:
    log.info("rpc=%s task=%s input_tokens=%d virtual_tokens=%d generated_tokens=%d finish=%s ms=%.0f", rpc,
             version or "-", usage.input_tokens, usage.virtual_tokens, usage.generated_tokens, finish,
             (time.monotonic() - started) * 1000)


class InferenceServicer(pb_grpc.InferenceServicer):
    """Generate, GenerateStream, Classify, Tokenize and ModelInfo."""

    def __init__(self, service: Inference) -> None:
        self.service = service

    def _chunks(self, rpc: str, request: pb.GenerateRequest, context: grpc.ServicerContext,
                started: float) -> Iterator[StreamChunk]:
        """Admits and queues a generation, cancelled when the RPC ends; its chunks, with metrics."""
        handle = self.service.generate(convert.generation_request(request, _deadline(context), CURRENT_CALLER.get()))
        # Runs on every end of the RPC; after a normal finish cancelling is a no-op.
        context.add_callback(handle.cancel)
        return self.service.stream(handle, rpc, started)

    @unary
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        started = time.monotonic()
        result = GenerationResult.from_chunks(self._chunks("Generate", request, context, started))
        _log_done("Generate", result.prompt_version, result.usage, result.finish_reason, started)
        return convert.generate_response(result)

    @streaming
    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        started = time.monotonic()
        for chunk in self._chunks("GenerateStream", request, context, started):
            yield convert.stream_message(chunk)
            if chunk.usage is not None and chunk.finish_reason is not None:
                _log_done("GenerateStream", chunk.prompt_version, chunk.usage, chunk.finish_reason, started)

    @unary
    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        return convert.tokenize_response(self.service.tokenize(request.text, chat=request.apply_chat_template))

    @unary
    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        started = time.monotonic()
        pending = self.service.classify(convert.classify_request(request, _deadline(context), CURRENT_CALLER.get()))
        context.add_callback(pending.cancel)
        result = pending.result()
        log.info("rpc=Classify task=%s labels=%d input_tokens=%d virtual_tokens=%d label=%r ms=%.0f",
                 result.prompt_version or "-", len(result.scores), result.input_tokens, result.virtual_tokens,
                 result.label, (time.monotonic() - started) * 1000)
        return convert.classify_response(result)

    @unary
    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfoResponse:
        return convert.model_info_response(self.service.model_info())


class RegistryServicer(pb_grpc.RegistryServicer):
    """Register, inspect, list, delete and alias prompt versions."""

    def __init__(self, service: Prompts, max_upload_bytes: int) -> None:
        self.service = service
        self.max_upload_bytes = max_upload_bytes

    @unary
    def RegisterPrompt(self, request: pb.RegisterPromptRequest, context: grpc.ServicerContext) -> pb.PromptInfo:
        _check_size(request, self.max_upload_bytes, "register a shorter prompt")
        return convert.prompt_info(self.service.register(convert.prompt_upload(request)))

    @unary
    def GetPrompt(self, request: pb.GetPromptRequest, context: grpc.ServicerContext) -> pb.PromptInfo:
        return convert.prompt_info(self.service.get(request.ref))

    @unary
    def ListPrompts(self, request: pb.ListPromptsRequest, context: grpc.ServicerContext) -> pb.ListPromptsResponse:
        versions, token = self.service.list_page(request.name, request.page_size, request.page_token)
        return pb.ListPromptsResponse(prompts=[convert.prompt_info(v) for v in versions], next_page_token=token)

    @unary
    def DeletePrompt(self, request: pb.DeletePromptRequest, context: grpc.ServicerContext) -> pb.DeletePromptResponse:
        deleted = self.service.delete(request.ref, all_versions=request.all_versions, force=request.force)
        return pb.DeletePromptResponse(deleted=deleted)

    @unary
    def SetAlias(self, request: pb.SetAliasRequest, context: grpc.ServicerContext) -> pb.PromptInfo:
        return convert.prompt_info(self.service.set_alias(request.name, request.alias, request.version))

    @unary
    def ExportPrompt(self, request: pb.ExportPromptRequest, context: grpc.ServicerContext) -> pb.ExportPromptResponse:
        exported = self.service.export(request.ref)
        return pb.ExportPromptResponse(prompt=convert.prompt_info(exported.version),
                                       files=[pb.PromptFile(name=n, data=d) for n, d in sorted(exported.files.items())])


class TrainingServicer(pb_grpc.TrainingServicer):
    """Server-side training jobs on the serving model."""

    def __init__(self, service: Training, max_upload_bytes: int) -> None:
        self.service = service
        self.max_upload_bytes = max_upload_bytes

    @unary
    def TrainPrompt(self, request: pb.TrainPromptRequest, context: grpc.ServicerContext) -> pb.TrainingJob:
        _check_size(request, self.max_upload_bytes, "send fewer examples")
        return convert.training_job(self.service.submit(convert.train_job_request(request)))

    @unary
    def GetTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> pb.TrainingJob:
        return convert.training_job(self.service.get(request.job_id))

    @streaming
    def WatchTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> Iterator[pb.TrainingJob]:
        for snapshot in self.service.watch(request.job_id, context.is_active):
            yield convert.training_job(snapshot)

    @unary
    def CancelTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> pb.TrainingJob:
        return convert.training_job(self.service.cancel(request.job_id))

    @unary
    def ListTrainingJobs(self, request: pb.ListTrainingJobsRequest,
                         context: grpc.ServicerContext) -> pb.ListTrainingJobsResponse:
        return pb.ListTrainingJobsResponse(jobs=[convert.training_job(j) for j in self.service.list()])
