"""The blocking client for the softprompt gRPC server.

It builds requests with `softprompt.client.requests`, converts responses with `softprompt.client.convert`,
and raises every gRPC failure as a typed `SoftpromptError`. `softprompt.client.aio.AsyncClient` is its
asyncio twin, method for method.
"""

from __future__ import annotations

from collections.abc import (
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import closing
from types import TracebackType
from typing import Any

import grpc

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

__all__ = ["Client", "DEFAULT_TARGET"]


class Client(BaseClient):
    """A blocking client for the Inference, Registry and Training services.

    Example:
        >>> with Client("localhost:50051", timeout=30) as client:
        ...     print(client.generate("sentiment@prod", "I loved it").text)

    Args:
        target: the server's "host:port".
        timeout: default deadline of every call, in seconds (None: no deadline). Each method's
            `timeout` overrides it.
        options: gRPC channel options, e.g. [("grpc.max_receive_message_length", 64 << 20)].
        credentials: ready-made channel credentials (instead of `tls`).
        token: bearer token sent with every call, for servers started with --auth-tokens.
        tls: TLS settings (`TlsOptions`), or True for TLS with the system's root certificates;
            None connects without TLS.
        route_by_task: send each Generate, GenerateStream and Classify request's task as Ray Serve's
            `multiplexed_model_id`, so a Ray Serve deployment routes a task's requests to the replica that
            already holds its prompt (README, Running on Ray Serve); a plain server ignores it.
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
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, self._credentials, options=self._options)
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._registry = pb_grpc.RegistryStub(self._channel)
        self._training = pb_grpc.TrainingStub(self._channel)

    def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self, method: Callable[..., Response], request: Any, timeout: float | None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Response:
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata if metadata is None else metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # ------------------------------------------------------------------ Inference

    def generate(
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
        """Generates a completion of `input` under the prompt `task` ("" for the bare model).

        `task` is "name" (newest version), "name@3" or "name@alias". Decoding is greedy unless
        `temperature` > 0; 0 values mean the server's defaults. `stop` sequences end generation
        and are not returned. `chat` wraps the input with the model's chat template.
        """
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
        response = self._call(self._inference.Generate, request, timeout, self._task_metadata(task))
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
    ) -> Iterator[StreamChunk]:
        """Like `generate`, yielding text deltas as they are produced.

        The last chunk carries `finish_reason` and `usage`. The call starts on the first `next()`;
        closing the iterator early (break, `.close()`) cancels it on the server.
        """
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

    def _stream(self, request: Any, timeout: float | None) -> Iterator[StreamChunk]:
        call = self._inference.GenerateStream(request, timeout=self._deadline(timeout),
                                              metadata=self._task_metadata(request.task))
        try:
            for message in call:
                yield convert.stream_chunk(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # frees the server's slot when the caller stops early; no-op when done

    def tokenize(
        self, text: str, chat: bool = False, *, timeout: float | None = None
    ) -> TokenizeResult:
        """Tokenizes `text` with the base model's tokenizer (through its chat template if `chat`)."""
        request = requests.tokenize_request(text, chat)
        return convert.tokenize_result(self._call(self._inference.Tokenize, request, timeout))

    def classify(
        self,
        task: str,
        input: str,
        labels: Iterable[str],
        *,
        chat: bool = False,
        timeout: float | None = None,
    ) -> ClassifyResult:
        """Scores each of `labels` as the complete output for `input` under the prompt `task`.

        `task` is a prompt reference as in `generate` ("" for the bare model); `labels` are two or
        more distinct, non-empty strings. Each label's log-probability covers its tokens and the
        token that ends the output (end-of-sequence; with `chat`, the template's end of turn);
        probabilities are normalized over the labels. `chat` wraps the input
        with the model's chat template (do so if the prompt was trained that way).
        """
        request = requests.classify_request(task, input, labels, chat=chat)
        return convert.classify_result(self._call(self._inference.Classify, request, timeout, self._task_metadata(task)))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describes the base model and the server's limits."""
        request = requests.model_info_request()
        return convert.model_info(self._call(self._inference.ModelInfo, request, timeout))

    # ------------------------------------------------------------------ Registry

    def register(
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
        """Stores `source` as the next version of `task` and returns it.

        `source` is a PEFT `save_pretrained` directory, a .safetensors file holding one
        [num_virtual_tokens, hidden_size] tensor, or such a tensor in memory (torch or numpy).
        Registration fails with FailedPreconditionError if `base_model_fingerprint` (or the one
        recorded in the directory's softprompt.json) differs from the server's, unless `force`.

        Raises:
            FileNotFoundError, ValueError, TypeError: `source` cannot be read as a prompt.
            SoftpromptError: the server refused it.
        """
        request = requests.register_request(
            task,
            source,
            description=description,
            tags=tags,
            base_model_fingerprint=base_model_fingerprint,
            force=force,
        )
        return convert.prompt_info(self._call(self._registry.RegisterPrompt, request, timeout))

    def get_prompt(self, ref: str, *, timeout: float | None = None) -> PromptInfo:
        """Describes one version: `ref` is "name" (newest), "name@3" or "name@alias"."""
        request = requests.get_prompt_request(ref)
        return convert.prompt_info(self._call(self._registry.GetPrompt, request, timeout))

    def iter_prompts(
        self, task: str | None = None, page_size: int = 0, *, timeout: float | None = None
    ) -> Iterator[PromptInfo]:
        """Yields every version (of `task`, or of all tasks), fetching pages as needed.

        `timeout` applies to each page's call.
        """
        token = ""
        while True:
            request = requests.list_prompts_request(task, page_size, token)
            page = self._call(self._registry.ListPrompts, request, timeout)
            for prompt in page.prompts:
                yield convert.prompt_info(prompt)
            token = page.next_page_token
            if not token:
                return

    def list_prompts(
        self, task: str | None = None, page_size: int = 0, *, timeout: float | None = None
    ) -> list[PromptInfo]:
        """Returns every version (of `task`, or of all tasks), following all pages."""
        return list(self.iter_prompts(task, page_size, timeout=timeout))

    def delete_prompt(
        self,
        ref: str,
        *,
        all_versions: bool = False,
        force: bool = False,
        timeout: float | None = None,
    ) -> list[str]:
        """Deletes "name@N" (or, with `all_versions`, the whole task "name"); returns the refs deleted.

        A version an alias points at is kept unless `force` (which removes those aliases too).
        """
        request = requests.delete_prompt_request(ref, all_versions=all_versions, force=force)
        return convert.deleted_refs(self._call(self._registry.DeletePrompt, request, timeout))

    def set_alias(
        self, task: str, alias: str, version: int, *, timeout: float | None = None
    ) -> PromptInfo:
        """Points "task@alias" at `version`; returns that version."""
        request = requests.set_alias_request(task, alias, version)
        return convert.prompt_info(self._call(self._registry.SetAlias, request, timeout))

    # ------------------------------------------------------------------ Training

    def train(
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
        """Starts training a new version of `task` on the server's base model; returns the queued job.

        `train_data` and `eval_data` are each a JSONL file path, its bytes, or an iterable of
        {"input": ..., "target": ...} dicts. Without `eval_data` the server holds out
        `options.eval_fraction` of the training data. With `promote_alias`, "task@alias" moves to
        the new version only if it beats the alias's current version on the held-out data.
        Follow the job with `watch_training_job` or `wait_for_training_job`.

        The data travels inline in one request: the server refuses requests larger than its upload
        limit (`model_info().limits.max_upload_bytes`) with ResourceExhaustedError.

        Raises:
            OSError, TypeError: the data cannot be read.
            InvalidArgumentError: the server refused the data or options.
        """
        request = requests.train_request(
            task,
            train_data,
            eval_data,
            options=options,
            description=description,
            tags=tags,
            promote_alias=promote_alias,
        )
        return convert.training_job(self._call(self._training.TrainPrompt, request, timeout))

    def get_training_job(self, job_id: str, *, timeout: float | None = None) -> TrainingJob:
        """Returns the job `job_id` as it stands now."""
        request = requests.training_job_request(job_id)
        return convert.training_job(self._call(self._training.GetTrainingJob, request, timeout))

    def watch_training_job(
        self, job_id: str, *, timeout: float | None = None
    ) -> Iterator[TrainingJob]:
        """Yields the job `job_id` each time it changes; the iteration ends when the job does.

        Unlike other calls, the client's default timeout does not apply: jobs may run for hours,
        so the watch has no deadline unless `timeout` (seconds, for the whole watch) is given.
        Closing the iterator early stops watching; the job itself goes on.
        """
        request = requests.training_job_request(job_id)
        return self._watch(request, timeout)

    def _watch(self, request: Any, timeout: float | None) -> Generator[TrainingJob, None, None]:
        call = self._training.WatchTrainingJob(request, timeout=timeout, metadata=self._metadata)
        try:
            for message in call:
                yield convert.training_job(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()  # stop the server's watch when the caller stops early; no-op when done

    def wait_for_training_job(self, job_id: str, *, timeout: float | None = None) -> TrainingJob:
        """Watches the job `job_id` until it ends and returns it (succeeded, failed or cancelled).

        `timeout` bounds the whole wait (default: none, see `watch_training_job`); when it passes,
        DeadlineExceededError is raised and the job goes on.
        """
        with closing(self._watch(requests.training_job_request(job_id), timeout)) as jobs:
            for job in jobs:
                if job.done:
                    return job
        # The watch ended without a final state (e.g. it began just as the job ended): ask directly.
        return self.get_training_job(job_id, timeout=timeout)

    def cancel_training_job(self, job_id: str, *, timeout: float | None = None) -> TrainingJob:
        """Stops a queued or running job (nothing is registered) and returns it."""
        request = requests.training_job_request(job_id)
        return convert.training_job(self._call(self._training.CancelTrainingJob, request, timeout))

    def list_training_jobs(self, *, timeout: float | None = None) -> list[TrainingJob]:
        """Returns the server's training jobs, newest first (jobs are kept until it restarts)."""
        request = requests.list_training_jobs_request()
        return convert.training_jobs(self._call(self._training.ListTrainingJobs, request, timeout))
