"""The asyncio client for the softprompt gRPC server: `Client`'s twin over grpc.aio, same methods, awaited."""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import aclosing
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from softprompt.client import convert, requests
from softprompt.client.credentials import TlsOptions
from softprompt.client.errors import from_rpc_error
from softprompt.client.requests import TrainingData
from softprompt.client.sources import PromptSource
from softprompt.client.types import (
    ClassifyResult,
    GenerateResult,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TokenizeResult,
    TrainingJob,
)
from softprompt.prompts.options import TrainingOptions
from softprompt.protos import softprompt_pb2_grpc as pb_grpc


from softprompt.client.base import DEFAULT_TARGET, ChannelOptions, BaseClient, Response

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient):
    """The asyncio twin of `Client` (over grpc.aio): same methods, awaited.

    Create it inside a running event loop. Arguments as for `Client`.

    Example:
        >>> async with AsyncClient("localhost:50051") as client:
        ...     async for chunk in client.stream("sentiment", "I loved it"):
        ...         print(chunk.text, end="")
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        options: ChannelOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls: TlsOptions | bool | None = None,
        route_by_task: bool = False,
    ) -> None:
        super().__init__(target, timeout, token, tls, credentials, options, route_by_task)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(target, self._credentials, options=self._options)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._registry = pb_grpc.RegistryStub(self._channel)
        self._training = pb_grpc.TrainingStub(self._channel)

    async def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self, method: Callable[..., Awaitable[Response]], request: Any, timeout: float | None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Response:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata if metadata is None else metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # ------------------------------------------------------------------ Inference

    async def generate(
        self,
        task: str,
        input: str,
        *,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        chat: bool = False,
        timeout: float | None = None,
    ) -> GenerateResult:
        """See `Client.generate`."""
        request = requests.generate_request(
            task,
            input,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            chat=chat,
        )
        response = await self._call(self._inference.Generate, request, timeout, self._task_metadata(task))
        return convert.generate_result(response)

    def stream(
        self,
        task: str,
        input: str,
        *,
        max_new_tokens: int = 0,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        chat: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """See `Client.stream`; use with `async for`. Closing it early (`aclose()`) cancels the call."""
        request = requests.generate_request(
            task,
            input,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            chat=chat,
        )
        return self._stream(request, timeout)

    async def _stream(self, request: Any, timeout: float | None) -> AsyncIterator[StreamChunk]:
        call = self._inference.GenerateStream(request, timeout=self._deadline(timeout),
                                              metadata=self._task_metadata(request.task))
        try:
            async for message in call:
                yield convert.stream_chunk(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # frees the server's slot when the caller stops early; no-op when done

    async def tokenize(
        self, text: str, chat: bool = False, *, timeout: float | None = None
    ) -> TokenizeResult:
        """See `Client.tokenize`."""
        request = requests.tokenize_request(text, chat)
        return convert.tokenize_result(await self._call(self._inference.Tokenize, request, timeout))

    async def classify(
        self,
        task: str,
        input: str,
        labels: Iterable[str],
        *,
        chat: bool = False,
        timeout: float | None = None,
    ) -> ClassifyResult:
        """See `Client.classify`."""
        request = requests.classify_request(task, input, labels, chat=chat)
        response = await self._call(self._inference.Classify, request, timeout, self._task_metadata(task))
        return convert.classify_result(response)

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """See `Client.model_info`."""
        request = requests.model_info_request()
        return convert.model_info(await self._call(self._inference.ModelInfo, request, timeout))

    # ------------------------------------------------------------------ Registry

    async def register(
        self,
        task: str,
        source: PromptSource,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        base_model_fingerprint: str = "",
        force: bool = False,
        timeout: float | None = None,
    ) -> PromptInfo:
        """See `Client.register` (the source is read synchronously, before the call)."""
        request = requests.register_request(
            task,
            source,
            description=description,
            tags=tags,
            base_model_fingerprint=base_model_fingerprint,
            force=force,
        )
        response = await self._call(self._registry.RegisterPrompt, request, timeout)
        return convert.prompt_info(response)

    async def get_prompt(self, ref: str, *, timeout: float | None = None) -> PromptInfo:
        """See `Client.get_prompt`."""
        request = requests.get_prompt_request(ref)
        return convert.prompt_info(await self._call(self._registry.GetPrompt, request, timeout))

    async def iter_prompts(
        self, task: str | None = None, page_size: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[PromptInfo]:
        """See `Client.iter_prompts`; use with `async for`."""
        token = ""
        while True:
            request = requests.list_prompts_request(task, page_size, token)
            page = await self._call(self._registry.ListPrompts, request, timeout)
            for prompt in page.prompts:
                yield convert.prompt_info(prompt)
            token = page.next_page_token
            if not token:
                return

    async def list_prompts(
        self, task: str | None = None, page_size: int = 0, *, timeout: float | None = None
    ) -> list[PromptInfo]:
        """See `Client.list_prompts`."""
        return [p async for p in self.iter_prompts(task, page_size, timeout=timeout)]

    async def delete_prompt(
        self,
        ref: str,
        *,
        all_versions: bool = False,
        force: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        """See `Client.delete_prompt`."""
        request = requests.delete_prompt_request(ref, all_versions=all_versions, force=force)
        return convert.deleted_refs(await self._call(self._registry.DeletePrompt, request, timeout))

    async def set_alias(
        self, task: str, alias: str, version: int, *, timeout: float | None = None
    ) -> PromptInfo:
        """See `Client.set_alias`."""
        request = requests.set_alias_request(task, alias, version)
        return convert.prompt_info(await self._call(self._registry.SetAlias, request, timeout))

    # ------------------------------------------------------------------ Training

    async def train(
        self,
        task: str,
        train_data: TrainingData,
        eval_data: TrainingData | None = None,
        *,
        options: TrainingOptions | None = None,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        promote_alias: str = "",
        timeout: float | None = None,
    ) -> TrainingJob:
        """See `Client.train` (the data is read synchronously, before the call)."""
        request = requests.train_request(
            task,
            train_data,
            eval_data,
            options=options,
            description=description,
            tags=tags,
            promote_alias=promote_alias,
        )
        response = await self._call(self._training.TrainPrompt, request, timeout)
        return convert.training_job(response)

    async def get_training_job(self, job_id: str, *, timeout: float | None = None) -> TrainingJob:
        """See `Client.get_training_job`."""
        request = requests.training_job_request(job_id)
        response = await self._call(self._training.GetTrainingJob, request, timeout)
        return convert.training_job(response)

    def watch_training_job(
        self, job_id: str, *, timeout: float | None = None
    ) -> AsyncIterator[TrainingJob]:
        """See `Client.watch_training_job`; use with `async for`."""
        request = requests.training_job_request(job_id)
        return self._watch(request, timeout)

    async def _watch(
        self, request: Any, timeout: float | None
    ) -> AsyncGenerator[TrainingJob, None]:
        call = self._training.WatchTrainingJob(request, timeout=timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield convert.training_job(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # stop the server's watch when the caller stops early; no-op when done

    async def wait_for_training_job(
        self, job_id: str, *, timeout: float | None = None
    ) -> TrainingJob:
        """See `Client.wait_for_training_job`."""
        async with aclosing(self._watch(requests.training_job_request(job_id), timeout)) as jobs:
            async for job in jobs:
                if job.done:
                    return job
        # The watch ended without a final state (e.g. it began just as the job ended): ask directly.
        return await self.get_training_job(job_id, timeout=timeout)

    async def cancel_training_job(
        self, job_id: str, *, timeout: float | None = None
    ) -> TrainingJob:
        """See `Client.cancel_training_job`."""
        request = requests.training_job_request(job_id)
        response = await self._call(self._training.CancelTrainingJob, request, timeout)
        return convert.training_job(response)

    async def list_training_jobs(self, *, timeout: float | None = None) -> list[TrainingJob]:
        """See `Client.list_training_jobs`."""
        request = requests.list_training_jobs_request()
        response = await self._call(self._training.ListTrainingJobs, request, timeout)
        return convert.training_jobs(response)
