"""Generation, classification, tokenization and the model's description, as a transport calls them.

A request is admitted (checked, resolved, tokenized) in the caller's thread and queued on the
scheduler; the caller reads the answer from what is returned and cancels it when its client goes away.
The per-task request and token metrics are recorded here, so every transport counts alike.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

from softprompt.server.config import ServerConfig
from softprompt.server.core.admission import Admission, AdmittedScoring
from softprompt.server.core.handle import Handle
from softprompt.server.core.model import BaseModel
from softprompt.server.core.prompt_cache import prompt_tiers
from softprompt.server.core.scheduler import Scheduler
from softprompt.server.core.types import ClassifyRequest, ClassifyResult, GenerationRequest, StreamChunk, Tokenization
from softprompt.server.observability.metrics import Metrics, NoMetrics
from softprompt.server.service.types import Limits, ModelInfo


@dataclass(frozen=True)
class PendingClassification:
    """A queued Classify request: wait for its result, or cancel it."""

    admitted: AdmittedScoring
    future: Future[list[float]]

    @property
    def prompt_version(self) -> str:
        """The version scoring uses ("name@3"; "" for the bare model)."""
        return self.admitted.prompt_version

    def cancel(self) -> None:
        """Drops the request if the worker has not scored it yet."""
        self.future.cancel()

    def result(self) -> ClassifyResult:
        """Waits for the scores; raises the request's error."""
        return self.admitted.result(self.future.result())

    async def aresult(self) -> ClassifyResult:
        """Awaits the scores without holding a thread (the worker's future wakes the event loop); raises the
        request's error."""
        return self.admitted.result(await asyncio.wrap_future(self.future))


class InferenceService:
    """Generate (whole or streamed), Classify, Tokenize and ModelInfo."""

    def __init__(self, admission: Admission, scheduler: Scheduler, base: BaseModel, config: ServerConfig,
                 metrics: Metrics | None = None) -> None:
        self.admission = admission
        self.scheduler = scheduler
        self.base = base
        self.config = config
        self.metrics = metrics or NoMetrics()

    @property
    def model_id(self) -> str:
        """The served base model's id."""
        return self.base.spec.model_id

    def generate(self, request: GenerationRequest) -> Handle:
        """Admits and queues a generation; read it with `stream` or `astream`, and cancel the handle if the client
        leaves."""
        handle = self.scheduler.submit(self.admission.admit(request))
        self.metrics.task_request(handle.prompt_version)
        return handle

    def stream(self, handle: Handle, endpoint: str, started: float, transport: str = "grpc") -> Iterator[StreamChunk]:
        """The handle's chunks, blocking, recording time to first token (since `started`, time.monotonic(), under
        `endpoint` of `transport`) and the tokens produced, also for a request that fails or is abandoned midway."""
        meter = _Meter(self.metrics, handle, endpoint, started, transport)
        try:
            for chunk in handle.chunks():
                meter.seen(chunk)
                yield chunk
        finally:
            meter.done()

    async def astream(self, handle: Handle, endpoint: str, started: float,
                      transport: str) -> AsyncIterator[StreamChunk]:
        """`stream` for asyncio: the chunks are awaited (`Handle.stream`), so a reader holds no thread."""
        meter = _Meter(self.metrics, handle, endpoint, started, transport)
        try:
            async for chunk in handle.stream():
                meter.seen(chunk)
                yield chunk
        finally:
            meter.done()

    def classify(self, request: ClassifyRequest) -> PendingClassification:
        """Admits and queues a Classify request; cancel it if the client leaves."""
        admitted = self.admission.admit_classify(request)
        pending = PendingClassification(admitted, self.scheduler.submit_scoring(admitted))
        self.metrics.task_request(admitted.prompt_version)
        return pending

    def tokenize(self, text: str, *, chat: bool = False) -> Tokenization:
        """Tokenizes like generation does: the chat template if asked, else the tokenizer's defaults."""
        return self.admission.tokenize(text, chat=chat)

    def model_info(self) -> ModelInfo:
        """The served model, the limits requests must keep to and the KV cache's size and use now."""
        base, cfg = self.base, self.config
        return ModelInfo(
            model_id=base.spec.model_id,
            hidden_size=base.spec.hidden_size,
            dtype=str(base.dtype).removeprefix("torch."),
            device=str(base.device),
            max_sequence_length=base.max_sequence_length,
            vocab_size=base.spec.vocab_size,
            fingerprint=base.spec.fingerprint,
            has_chat_template=bool(getattr(base.tokenizer, "chat_template", None)),
            limits=Limits(
                max_new_tokens=cfg.max_new_tokens,
                default_max_new_tokens=cfg.default_max_new_tokens,
                max_input_tokens=cfg.max_input_tokens,
                max_virtual_tokens=cfg.max_virtual_tokens,
                max_batch_size=cfg.max_batch_size,
                max_queued_requests=cfg.max_queued_requests,
                max_upload_bytes=cfg.max_upload_bytes,
                max_stop_sequences=cfg.max_stop_sequences,
                max_labels=cfg.max_labels,
            ),
            kv_cache=self.scheduler.engine.kv_usage(),
            tasks=self.scheduler.task_loads(),
            caches={name: tier.stats()
                    for name, tier in prompt_tiers(self.admission.prompts, self.scheduler.engine.prefixes).items()},
        )


@dataclass
class _Meter:
    """One generation's stream metrics: time to its first token, and the tokens it produced when it ends."""

    metrics: Metrics
    handle: Handle
    endpoint: str
    started: float  # when the request arrived, time.monotonic()
    transport: str
    generated: int = 0

    def seen(self, chunk: StreamChunk) -> None:
        """Records a chunk on its way to the client."""
        if not self.generated:
            self.metrics.first_token(self.endpoint, time.monotonic() - self.started, self.transport)
            wait = self.handle.queue_wait
            if wait is not None:
                self.metrics.queue_wait(self.handle.prompt_version, wait)
        self.generated += len(chunk.token_ids)

    def done(self) -> None:
        """Records the tokens produced, however the stream ended."""
        self.metrics.tokens_generated(self.handle.prompt_version, self.generated)
