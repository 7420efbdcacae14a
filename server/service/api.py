"""The services as a transport calls them: one Protocol per service, and `Services`, the three together.

Torch-free, so a transport imports this and never the concrete services (`inference`, `prompts`,
`training`), which hold the scheduler, engine and registry; `server/app` builds those and hands them over.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from softprompt.server.core.handle import Handle
from softprompt.server.core.types import ClassifyRequest, ClassifyResult, GenerationRequest, StreamChunk, Tokenization
from softprompt.server.service.types import (
    JobSnapshot,
    ModelInfo,
    PromptFiles,
    PromptUpload,
    PromptVersion,
    TrainJobRequest,
)


class PendingClassification(Protocol):
    """A queued Classify request: wait for its result, or cancel it."""

    @property
    def prompt_version(self) -> str:
        """The version scoring uses ("name@3"; "" for the bare model)."""

    def cancel(self) -> None:
        """Drops the request if the worker has not scored it yet."""

    def result(self) -> ClassifyResult:
        """Waits for the scores; raises the request's error."""

    async def aresult(self) -> ClassifyResult:
        """Awaits the scores without holding a thread; raises the request's error."""


class Inference(Protocol):
    """Generate (whole or streamed), Classify, Tokenize and ModelInfo."""

    @property
    def model_id(self) -> str:
        """The served base model's id."""

    def generate(self, request: GenerationRequest) -> Handle:
        """Admits and queues a generation; read it with `stream` or `astream`, cancel the handle if the client
        leaves."""

    def stream(self, handle: Handle, endpoint: str, started: float, transport: str = "grpc") -> Iterator[StreamChunk]:
        """The handle's chunks, blocking, with time to first token (since `started`, time.monotonic()) and the
        tokens produced recorded under `endpoint` of `transport`."""

    def astream(self, handle: Handle, endpoint: str, started: float, transport: str) -> AsyncIterator[StreamChunk]:
        """`stream` for asyncio: awaited without holding a thread."""

    def classify(self, request: ClassifyRequest) -> PendingClassification:
        """Admits and queues a Classify request; cancel it if the client leaves."""

    def tokenize(self, text: str, *, chat: bool = False) -> Tokenization:
        """Tokenizes like generation does."""

    def model_info(self) -> ModelInfo:
        """The served model, its limits and the KV cache's size and use now."""


class Prompts(Protocol):
    """Register, inspect, list, alias and delete prompt versions."""

    def register(self, upload: PromptUpload) -> PromptVersion:
        """Checks an upload, stores it as the task's next version and warms it."""

    def get(self, ref: str) -> PromptVersion:
        """The version a reference ("name", "name@3", "name@prod") names now."""

    def list_page(self, name: str | None, page_size: int = 0, page_token: str = "", *,
                  after: str = "") -> tuple[Sequence[PromptVersion], str]:
        """One page of versions and the token of the next ("" after the last); `after` ("name@3") starts the
        page after that version instead of a token."""

    def nearby(self, ref: str) -> list[str]:
        """References (task names, versions, aliases) near `ref`, which names nothing: for "did you mean"."""

    def delete(self, ref: str, *, all_versions: bool = False, force: bool = False) -> list[str]:
        """Deletes a version (or a whole task); returns the deleted refs."""

    def set_alias(self, name: str, alias: str, version: int) -> PromptVersion:
        """Points ``name@alias`` at `version`."""

    def export(self, ref: str) -> PromptFiles:
        """The version a reference names and every file of it, the weights checked against their checksum."""


class Training(Protocol):
    """Submit, inspect, watch, cancel and list server-side training jobs."""

    def submit(self, request: TrainJobRequest) -> JobSnapshot:
        """Checks and queues a job."""

    def get(self, job_id: str) -> JobSnapshot:
        """The job's current state."""

    def watch(self, job_id: str, is_active: Callable[[], bool]) -> Iterator[JobSnapshot]:
        """The job now and after each change, until it ends or `is_active()` turns false."""

    def cancel(self, job_id: str) -> JobSnapshot:
        """Cancels a queued job, or asks a running one to stop."""

    def list(self) -> Sequence[JobSnapshot]:
        """All remembered jobs, newest first."""


@dataclass(frozen=True)
class Services:
    """The services a transport serves, built once per process by `server/app`."""

    inference: Inference
    prompts: Prompts
    training: Training
