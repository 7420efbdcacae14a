"""Unit tests of softprompt.client against a real gRPC server hosting fake servicers.

The servicers return canned responses and fail on demand: a task or ref "abort:CODE:message" makes
them abort with that status, "sleep" makes them wait (for deadlines), "endless" streams until the
client cancels. No model and no torch are involved.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import typing
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from softprompt.client import (
    AsyncClient,
    CancelledError,
    Client,
    DeadlineExceededError,
    DecodingKeywords,
    DecodingOptions,
    FailedPreconditionError,
    GenerateResult,
    InternalError,
    InvalidArgumentError,
    KvCache,
    Limits,
    ModelInfo,
    NotFoundError,
    PermissionDeniedError,
    PromptInfo,
    ResourceExhaustedError,
    SoftpromptError,
    StreamChunk,
    TokenizeResult,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    Usage,
    from_rpc_error,
)
from softprompt.client import convert, sources
from softprompt.client.cli import main
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc

NUM_PROMPTS = 7
DEFAULT_PAGE_SIZE = 3  # the fake's default, so that listing everything takes 3 pages

ERROR_CLASSES = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
}


# ---------------------------------------------------------------------- fake server


def _misbehave(name: str, context: grpc.ServicerContext) -> None:
    if name.startswith("abort:"):
        _, code, message = name.split(":", 2)
        context.abort(grpc.StatusCode[code], message)
    if name == "sleep":
        deadline = time.monotonic() + 5
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)


def _prompt(name: str, version: int, **extra: Any) -> pb.PromptInfo:
    return pb.PromptInfo(
        name=name,
        version=version,
        ref=f"{name}@{version}",
        num_virtual_tokens=20,
        hidden_size=64,
        sha256="ab" * 32,
        base_model_fingerprint="fp-base",
        created_at="2025-01-02T03:04:05Z",
        description=f"{name} v{version}",
        tags={"lang": "en"},
        aliases=["prod"] if version == 1 else [],
        peft_type="PROMPT_TUNING",
        **extra,
    )


class FakeInference(pb_grpc.InferenceServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.stream_ended = threading.Event()

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        _misbehave(request.task, context)
        return pb.GenerateResponse(
            text=f"echo:{request.input}",
            token_ids=[5, 6, 7],
            finish_reason=pb.FINISH_REASON_EOS,
            usage=pb.Usage(input_tokens=4, virtual_tokens=20, generated_tokens=3),
            prompt_version=f"{request.task}@1" if request.task else "",
        )

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        _misbehave(request.task, context)
        context.add_callback(self.stream_ended.set)
        if request.task == "endless":
            yield from self._endless(context)
            return
        version = f"{request.task}@1" if request.task else ""
        yield pb.GenerateStreamResponse(text="Hel", token_ids=[1], prompt_version=version)
        yield pb.GenerateStreamResponse(text="lo", token_ids=[2, 3], prompt_version=version)
        yield pb.GenerateStreamResponse(
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(input_tokens=2, virtual_tokens=20, generated_tokens=3),
            prompt_version=version,
        )

    def _endless(self, context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        i = 0
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            yield pb.GenerateStreamResponse(text=f"t{i} ", token_ids=[i])
            i += 1
            time.sleep(0.005)

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        words = request.text.split()
        if request.apply_chat_template:
            words = ["<user>", *words, "</user>"]
        return pb.TokenizeResponse(token_ids=list(range(10, 10 + len(words))), tokens=words)

    def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.ServicerContext) -> Any:
        return pb.ModelInfoResponse(
            model_id="tiny-llama",
            hidden_size=64,
            dtype="float32",
            device="cpu",
            max_sequence_length=2048,
            vocab_size=300,
            fingerprint="fp-base",
            limits=pb.Limits(
                max_new_tokens=512,
                default_max_new_tokens=64,
                max_input_tokens=1024,
                max_virtual_tokens=100,
                max_batch_size=8,
                max_queued_requests=32,
                max_upload_bytes=1 << 20,
            ),
            has_chat_template=True,
            kv_cache=pb.KvCache(block_size=16, total_blocks=4687, used_blocks=150, rows=2, bytes_per_token=18432,
                                total_tokens=4687 * 16, free_tokens=(4687 - 150) * 16),
        )


class FakeRegistry(pb_grpc.RegistryServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.prompts = [_prompt(f"task{i // 3}", i % 3 + 1) for i in range(NUM_PROMPTS)]

    def RegisterPrompt(self, request: pb.RegisterPromptRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        _misbehave(request.name, context)
        rows = request.tensor.shape[0] if request.HasField("tensor") else 20
        return pb.PromptInfo(
            name=request.name,
            version=4,
            ref=f"{request.name}@4",
            num_virtual_tokens=rows,
            description=request.description,
            tags=request.tags,
            base_model_fingerprint=request.base_model_fingerprint,
            peft_type="RAW" if request.HasField("tensor") else "PROMPT_TUNING",
        )

    def GetPrompt(self, request: pb.GetPromptRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        _misbehave(request.ref, context)
        return _prompt(request.ref.split("@")[0], 1)

    def ListPrompts(self, request: pb.ListPromptsRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        _misbehave(request.name, context)
        matching = [p for p in self.prompts if not request.name or p.name == request.name]
        size = request.page_size or DEFAULT_PAGE_SIZE
        start = int(request.page_token or 0)
        end = start + size
        return pb.ListPromptsResponse(
            prompts=matching[start:end],
            next_page_token=str(end) if end < len(matching) else "",
        )

    def DeletePrompt(self, request: pb.DeletePromptRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        _misbehave(request.ref, context)
        if request.all_versions:
            return pb.DeletePromptResponse(deleted=[f"{request.ref}@1", f"{request.ref}@2"])
        return pb.DeletePromptResponse(deleted=[request.ref])

    def SetAlias(self, request: pb.SetAliasRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        _misbehave(request.name, context)
        info = _prompt(request.name, request.version)
        info.aliases[:] = [request.alias]
        return info


class FakeServer:
    def __init__(self) -> None:
        self.inference = FakeInference()
        self.registry = FakeRegistry()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_InferenceServicer_to_server(self.inference, self.server)
        pb_grpc.add_RegistryServicer_to_server(self.registry, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"
        self.server.start()

    def last(self, kind: type) -> Any:
        """The latest request of message type `kind` either servicer received."""
        for request in reversed(self.inference.requests + self.registry.requests):
            if isinstance(request, kind):
                return request
        raise AssertionError(f"no {kind.__name__} received")


@pytest.fixture(scope="module")
def _server() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.server.stop(None)


@pytest.fixture
def fake(_server: FakeServer) -> FakeServer:
    _server.inference.requests.clear()
    _server.registry.requests.clear()
    _server.inference.stream_ended.clear()
    return _server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[Client]:
    with Client(fake.target, timeout=10) as c:
        yield c


def _closed_port_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


# ---------------------------------------------------------------------- safetensors helpers


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None
) -> bytes:
    """A minimal safetensors file: u64 LE header length, JSON header (padded), then the data."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def write_peft_dir(path: Path, fingerprint: str | None = None) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "token_dim": 3})
    )
    (path / "adapter_model.safetensors").write_bytes(
        safetensors_bytes({"prompt_embeddings": ("F32", [2, 3], f32(1, 2, 3, 4, 5, 6))})
    )
    if fingerprint is not None:
        (path / "softprompt.json").write_text(json.dumps({"base_model_fingerprint": fingerprint}))
    return path


# ---------------------------------------------------------------------- inference


def test_generate_converts_result_and_sends_params(client: Client, fake: FakeServer) -> None:
    result = client.generate(
        "sentiment@prod",
        "great film",
        max_new_tokens=16,
        temperature=0.5,
        top_k=40,
        top_p=0.9,
        seed=7,
        stop=["\n", "END"],
        chat=True,
    )
    assert result == GenerateResult(
        text="echo:great film",
        token_ids=[5, 6, 7],
        finish_reason="eos",
        usage=Usage(input_tokens=4, virtual_tokens=20, generated_tokens=3),
        prompt_version="sentiment@prod@1",
    )
    request = fake.last(pb.GenerateRequest)
    assert (request.task, request.input) == ("sentiment@prod", "great film")
    params = request.params
    assert (params.max_new_tokens, params.top_k, params.seed) == (16, 40, 7)
    assert params.temperature == pytest.approx(0.5) and params.top_p == pytest.approx(0.9)
    assert list(params.stop) == ["\n", "END"] and params.apply_chat_template


def test_generate_defaults_leave_seed_unset(client: Client, fake: FakeServer) -> None:
    client.generate("", "hi", stop="\n")
    params = fake.last(pb.GenerateRequest).params
    assert not params.HasField("seed")
    assert list(params.stop) == ["\n"]  # a lone string is one stop sequence, not one per char
    assert params.max_new_tokens == 0 and params.temperature == 0 and not params.apply_chat_template


def test_decoding_keywords_are_the_decoding_options_fields() -> None:
    # `generate(..., top_p=0.9)` is typed by DecodingKeywords and built as DecodingOptions: they must not drift.
    assert typing.get_type_hints(DecodingKeywords) == typing.get_type_hints(DecodingOptions)
    assert DecodingKeywords.__optional_keys__ == set(typing.get_type_hints(DecodingOptions))  # each one optional


def test_generate_takes_options_and_keywords_replace_their_fields(client: Client, fake: FakeServer) -> None:
    sampled = DecodingOptions(temperature=0.5, top_k=5, seed=2, stop=("\n",))
    client.generate("qa", "hi", options=sampled, seed=9, stop="END")
    params = fake.last(pb.GenerateRequest).params
    assert (params.top_k, params.seed, list(params.stop)) == (5, 9, ["END"])
    assert params.temperature == pytest.approx(0.5)
    list(client.stream("qa", "hi", options=sampled))
    assert fake.last(pb.GenerateRequest).params.seed == 2

    fake.inference.requests.clear()
    with pytest.raises(TypeError, match="top_q"):
        client.generate("qa", "hi", top_q=0.9)  # type: ignore[call-arg]
    assert fake.inference.requests == []  # refused before anything was sent


def test_both_clients_have_the_same_documented_methods() -> None:
    def methods(cls: type) -> dict[str, inspect.Signature]:
        return {name: inspect.signature(getattr(cls, name)) for name in dir(cls)
                if not name.startswith("_") and callable(getattr(cls, name))}

    blocking, awaited = methods(Client), methods(AsyncClient)
    assert blocking == awaited and {"generate", "stream", "list_prompts", "wait_for_training_job"} <= set(blocking)
    assert all(getattr(Client, name).__doc__ for name in blocking)
    assert list(blocking["generate"].parameters)[:4] == ["self", "task", "input", "options"]


def test_stream_yields_chunks_with_final_usage(client: Client) -> None:
    chunks = list(client.stream("qa", "hi"))
    assert chunks == [
        StreamChunk("Hel", [1], None, None, "qa@1"),
        StreamChunk("lo", [2, 3], None, None, "qa@1"),
        StreamChunk("", [], "stop", Usage(2, 20, 3), "qa@1"),
    ]


def test_stream_closed_early_cancels_the_call(client: Client, fake: FakeServer) -> None:
    stream = client.stream("endless", "go")
    first = [next(stream), next(stream)]
    assert [c.token_ids for c in first] == [[0], [1]]
    stream.close()
    assert fake.inference.stream_ended.wait(5), "the server never saw the cancellation"


def test_stream_error_is_typed(client: Client) -> None:
    with pytest.raises(NotFoundError, match="no task qa"):
        list(client.stream("abort:NOT_FOUND:no task qa", "hi"))


def test_tokenize(client: Client, fake: FakeServer) -> None:
    assert client.tokenize("hello world") == TokenizeResult([10, 11], ["hello", "world"])
    assert client.tokenize("hi", chat=True).tokens == ["<user>", "hi", "</user>"]
    assert fake.last(pb.TokenizeRequest).apply_chat_template


def test_model_info(client: Client) -> None:
    info = client.model_info()
    assert info == ModelInfo(
        model_id="tiny-llama",
        hidden_size=64,
        dtype="float32",
        device="cpu",
        max_sequence_length=2048,
        vocab_size=300,
        fingerprint="fp-base",
        limits=Limits(512, 64, 1024, 100, 8, 32, 1 << 20),
        has_chat_template=True,
        kv_cache=KvCache(block_size=16, total_blocks=4687, used_blocks=150, rows=2, bytes_per_token=18432,
                         total_tokens=74992, free_tokens=72592),
    )
    assert info.kv_cache.total_bytes == 74992 * 18432
    # A server from before the KV pool reports none.
    assert convert.model_info(pb.ModelInfoResponse()).kv_cache is None


# ---------------------------------------------------------------------- errors and deadlines


@pytest.mark.parametrize("code", list(ERROR_CLASSES), ids=lambda c: c.name)
def test_each_status_raises_its_error_class(client: Client, code: grpc.StatusCode) -> None:
    with pytest.raises(SoftpromptError) as info:
        client.generate(f"abort:{code.name}:went wrong: {code.name}", "x")
    assert type(info.value) is ERROR_CLASSES[code]
    assert info.value.code == code
    assert info.value.details == f"went wrong: {code.name}"
    assert str(info.value) == f"{code.name}: went wrong: {code.name}"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unmapped_status_raises_base_error(client: Client) -> None:
    with pytest.raises(SoftpromptError) as info:
        client.get_prompt("abort:ALREADY_EXISTS:dup")
    assert type(info.value) is SoftpromptError
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_from_rpc_error_without_status() -> None:
    error = from_rpc_error(grpc.RpcError("opaque"))
    assert type(error) is SoftpromptError and error.code == grpc.StatusCode.UNKNOWN


def test_default_deadline_and_per_call_override(fake: FakeServer) -> None:
    with Client(fake.target, timeout=0.2) as c:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            c.generate("sleep", "x")
        assert time.monotonic() - started < 3
        with pytest.raises(DeadlineExceededError):
            list(c.stream("sleep", "x"))
        assert c.generate("quick", "x", timeout=10).text == "echo:x"
    with Client(fake.target) as c:
        with pytest.raises(DeadlineExceededError):
            c.generate("sleep", "x", timeout=0.2)


def test_unreachable_server_is_unavailable() -> None:
    with Client(_closed_port_target(), timeout=5) as c:
        with pytest.raises(UnavailableError):
            c.model_info()


# ---------------------------------------------------------------------- registry


def test_register_peft_dir_sends_files_and_recorded_fingerprint(
    client: Client, fake: FakeServer, tmp_path: Path
) -> None:
    adapter = write_peft_dir(tmp_path / "adapter", fingerprint="fp-recorded")
    info = client.register("sentiment", adapter, description="first", tags={"lang": "en"})
    assert isinstance(info, PromptInfo) and info.ref == "sentiment@4"
    assert info.tags == {"lang": "en"} and info.peft_type == "PROMPT_TUNING"
    request = fake.last(pb.RegisterPromptRequest)
    assert request.WhichOneof("source") == "peft"
    assert request.peft.adapter_config_json == (adapter / "adapter_config.json").read_text()
    assert request.peft.adapter_model_safetensors == (adapter / "adapter_model.safetensors").read_bytes()
    assert request.base_model_fingerprint == "fp-recorded"
    assert (request.description, dict(request.tags), request.force) == ("first", {"lang": "en"}, False)

    client.register("sentiment", str(adapter), base_model_fingerprint="fp-given", force=True)
    request = fake.last(pb.RegisterPromptRequest)
    assert request.base_model_fingerprint == "fp-given" and request.force


def test_register_peft_dir_without_model_file_fails_locally(
    client: Client, fake: FakeServer, tmp_path: Path
) -> None:
    adapter = write_peft_dir(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        client.register("sentiment", adapter)
    assert not fake.registry.requests


def test_register_safetensors_file_sends_raw_tensor(
    client: Client, fake: FakeServer, tmp_path: Path
) -> None:
    raw = f32(1, 2, 3, 4, 5, 6)
    path = tmp_path / "prompt.safetensors"
    path.write_bytes(safetensors_bytes({"emb": ("F32", [2, 3], raw)}, metadata={"format": "pt"}))
    info = client.register("raw-task", path)
    assert info.peft_type == "RAW" and info.num_virtual_tokens == 2
    tensor = fake.last(pb.RegisterPromptRequest).tensor
    assert (list(tensor.shape), tensor.dtype, tensor.data) == ([2, 3], "float32", raw)


@pytest.mark.parametrize("tag, name", [("F16", "float16"), ("BF16", "bfloat16")])
def test_safetensors_half_dtypes(tmp_path: Path, tag: str, name: str) -> None:
    raw = bytes(range(2 * 2 * 2))
    path = tmp_path / "p.safetensors"
    path.write_bytes(safetensors_bytes({"emb": (tag, [2, 2], raw)}))
    matrix = sources.read_safetensors_matrix(path)
    assert (matrix.shape, matrix.dtype, matrix.data) == ((2, 2), name, raw)


def test_safetensors_written_by_the_safetensors_library(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "lib.safetensors"
    st.save_file({"prompt_embeddings": array}, str(path), metadata={"format": "np"})
    matrix = sources.read_safetensors_matrix(path)
    assert matrix.shape == (3, 4) and matrix.data == array.tobytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01", "too short"),
        (struct.pack("<Q", 10) + b"not json!!", "bad header"),
        (safetensors_bytes({"a": ("F32", [1, 1], f32(1)), "b": ("F32", [1, 1], f32(2))}), "2 tensors"),
        (safetensors_bytes({"a": ("F32", [3], f32(1, 2, 3))}), "shape"),
        (safetensors_bytes({"a": ("I64", [1, 1], b"\0" * 8)}), "dtype I64"),
        (safetensors_bytes({"a": ("F32", [2, 2], f32(1, 2, 3))}), "bytes"),
        (safetensors_bytes({"a": ("F32", [1, 2], f32(1, 2))})[:-3], "truncated"),
    ],
)
def test_bad_safetensors_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        sources.read_safetensors_matrix(path)


def test_register_numpy_array_and_torch_like_object(client: Client, fake: FakeServer) -> None:
    np = pytest.importorskip("numpy")
    array = np.arange(6, dtype=np.float64).reshape(3, 2).T  # non-contiguous, float64
    client.register("np-task", array)
    tensor = fake.last(pb.RegisterPromptRequest).tensor
    assert (list(tensor.shape), tensor.dtype) == ([2, 3], "float32")
    assert tensor.data == np.ascontiguousarray(array, dtype="<f4").tobytes()

    class FakeTorchTensor:
        """Just the duck-typed chain the client uses: detach().cpu().float().numpy()."""

        def __init__(self, values: Any) -> None:
            self.values = values
            self.calls: list[str] = []

        def detach(self) -> FakeTorchTensor:
            self.calls.append("detach")
            return self

        def cpu(self) -> FakeTorchTensor:
            self.calls.append("cpu")
            return self

        def float(self) -> FakeTorchTensor:
            self.calls.append("float")
            return self

        def numpy(self) -> Any:
            self.calls.append("numpy")
            return self.values.astype(np.float32)

    fake_tensor = FakeTorchTensor(np.ones((4, 2), dtype=np.float16))
    client.register("torch-task", fake_tensor)
    assert fake_tensor.calls == ["detach", "cpu", "float", "numpy"]
    tensor = fake.last(pb.RegisterPromptRequest).tensor
    assert list(tensor.shape) == [4, 2] and tensor.data == f32(*([1.0] * 8))


def test_register_rejects_bad_objects(client: Client, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="matrix"):
        client.register("t", np.zeros(5))
    with pytest.raises(TypeError, match="cannot register a int"):
        client.register("t", 42)
    with pytest.raises(FileNotFoundError, match="no such file"):
        client.register("t", tmp_path / "missing.safetensors")


def test_get_prompt_converts_every_field(client: Client) -> None:
    info = client.get_prompt("task0@prod")
    assert info == PromptInfo(
        name="task0",
        version=1,
        ref="task0@1",
        num_virtual_tokens=20,
        hidden_size=64,
        sha256="ab" * 32,
        base_model_fingerprint="fp-base",
        created_at="2025-01-02T03:04:05Z",
        description="task0 v1",
        tags={"lang": "en"},
        aliases=("prod",),
        peft_type="PROMPT_TUNING",
    )


def test_list_prompts_follows_pages(client: Client, fake: FakeServer) -> None:
    prompts = client.list_prompts()
    assert [p.ref for p in prompts] == [p.ref for p in fake.registry.prompts]
    tokens = [r.page_token for r in fake.registry.requests]
    assert tokens == ["", "3", "6"]  # three pages

    fake.registry.requests.clear()
    assert [p.ref for p in client.iter_prompts("task1", page_size=2)] == ["task1@1", "task1@2", "task1@3"]
    assert [(r.name, r.page_size) for r in fake.registry.requests] == [("task1", 2), ("task1", 2)]


def test_delete_and_alias(client: Client, fake: FakeServer) -> None:
    assert client.delete_prompt("task0@2") == ["task0@2"]
    assert client.delete_prompt("task0", all_versions=True, force=True) == ["task0@1", "task0@2"]
    request = fake.last(pb.DeletePromptRequest)
    assert request.all_versions and request.force
    info = client.set_alias("task0", "staging", 2)
    assert info.ref == "task0@2" and info.aliases == ("staging",)
    assert fake.last(pb.SetAliasRequest).version == 2


# ---------------------------------------------------------------------- asyncio


def test_async_client(fake: FakeServer, tmp_path: Path) -> None:
    adapter = write_peft_dir(tmp_path / "adapter")

    async def scenario() -> None:
        async with AsyncClient(fake.target, timeout=10) as c:
            result = await c.generate("qa", "hi", seed=3)
            assert result.text == "echo:hi" and result.finish_reason == "eos"
            assert inspect.iscoroutinefunction(c.generate)
            await c.generate("qa", "hi", options=DecodingOptions(top_k=4), chat=True)
            params = fake.last(pb.GenerateRequest).params
            assert params.top_k == 4 and params.apply_chat_template
            chunks = [chunk async for chunk in c.stream("qa", "hi")]
            assert "".join(ch.text for ch in chunks) == "Hello"
            assert chunks[-1].usage == Usage(2, 20, 3)
            assert (await c.tokenize("a b")).token_ids == [10, 11]
            assert (await c.model_info()).limits.max_batch_size == 8
            assert len(await c.list_prompts()) == NUM_PROMPTS
            assert [p.version async for p in c.iter_prompts("task2")] == [1]
            assert (await c.register("t", adapter)).ref == "t@4"
            assert (await c.get_prompt("t@prod")).aliases == ("prod",)
            assert await c.delete_prompt("t@1") == ["t@1"]
            assert (await c.set_alias("t", "prod", 3)).ref == "t@3"
            with pytest.raises(FailedPreconditionError, match="other model"):
                await c.register("abort:FAILED_PRECONDITION:other model", adapter)
            with pytest.raises(DeadlineExceededError):
                await c.generate("sleep", "x", timeout=0.2)
            with pytest.raises(NotFoundError):
                async for _ in c.stream("abort:NOT_FOUND:nope", "x"):
                    pass

            stream = c.stream("endless", "go")
            assert (await stream.__anext__()).token_ids == [0]
            await stream.aclose()
            assert await asyncio.to_thread(fake.inference.stream_ended.wait, 5)

    asyncio.run(scenario())


# ---------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_table_and_json(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--server", fake.target, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["REF", "TYPE", "TOKENS", "HIDDEN", "ALIASES", "CREATED", "DESCRIPTION"]
    assert len(lines) == 1 + NUM_PROMPTS
    assert lines[1].split()[:5] == ["task0@1", "PROMPT_TUNING", "20", "64", "prod"]
    assert lines[1].index("PROMPT_TUNING") == lines[0].index("TYPE")  # aligned columns

    code, out, _ = run_cli(capsys, "list", "task1", "--json", "--server", fake.target)
    assert code == 0
    data = json.loads(out)
    assert [p["ref"] for p in data] == ["task1@1", "task1@2", "task1@3"]
    assert data[0]["tags"] == {"lang": "en"} and data[0]["aliases"] == ["prod"]


def test_cli_server_from_environment(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTPROMPT_SERVER", fake.target)
    code, out, _ = run_cli(capsys, "list", "nothing-here")
    assert code == 0 and out.strip() == "no versions of nothing-here"


def test_cli_show_alias_delete(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--server", fake.target, "show", "task0@prod")
    assert code == 0 and "ref" in out and "task0@1" in out and "lang=en" in out
    code, out, _ = run_cli(capsys, "--server", fake.target, "--json", "show", "task0")
    assert json.loads(out)["ref"] == "task0@1"
    code, out, _ = run_cli(capsys, "--server", fake.target, "alias", "task0", "prod", "2")
    assert code == 0 and out.strip() == "task0@prod -> task0@2"
    code, out, _ = run_cli(capsys, "--server", fake.target, "delete", "task0", "--all", "--force")
    assert code == 0 and out.splitlines() == ["deleted task0@1", "deleted task0@2"]
    request = fake.last(pb.DeletePromptRequest)
    assert request.all_versions and request.force
    code, out, _ = run_cli(capsys, "--server", fake.target, "delete", "task0@3", "--json")
    assert json.loads(out) == {"deleted": ["task0@3"]}


def test_cli_register(fake: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    adapter = write_peft_dir(tmp_path / "adapter")
    code, out, _ = run_cli(
        capsys, "--server", fake.target, "register", "sentiment", str(adapter),
        "--description", "v1", "--tag", "lang=en", "--tag", "team=nlp=core",
        "--fingerprint", "fp-x", "--force",
    )
    assert code == 0 and out.startswith("registered sentiment@4")
    request = fake.last(pb.RegisterPromptRequest)
    assert dict(request.tags) == {"lang": "en", "team": "nlp=core"}
    assert (request.description, request.base_model_fingerprint, request.force) == ("v1", "fp-x", True)

    code, _, err = run_cli(capsys, "--server", fake.target, "register", "t", str(tmp_path / "nope"))
    assert code == 1 and err.startswith("error: no such file or directory")
    code, _, err = run_cli(capsys, "register", "t", str(adapter), "--tag", "novalue")
    assert code == 2 and "KEY=VALUE" in err


def test_cli_generate(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys, "--server", fake.target, "generate", "qa", "hi there",
        "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9",
        "--seed", "1", "--stop", "\n", "--stop", "END", "--chat",
    )
    assert code == 0 and out == "echo:hi there\n"
    assert "qa@1" in err and "eos" in err and "3 generated" in err
    params = fake.last(pb.GenerateRequest).params
    assert (params.max_new_tokens, params.top_k, params.seed) == (8, 5, 1)
    assert list(params.stop) == ["\n", "END"] and params.apply_chat_template

    code, out, _ = run_cli(capsys, "--server", fake.target, "generate", "-", "hi", "--json")
    assert json.loads(out)["usage"] == {"input_tokens": 4, "virtual_tokens": 20, "generated_tokens": 3}
    assert fake.last(pb.GenerateRequest).task == ""  # "-" is the bare model


def test_cli_generate_stream_and_stdin(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(capsys, "--server", fake.target, "generate", "qa", "hi", "--stream")
    assert code == 0 and out == "Hello\n" and "stop" in err
    code, out, _ = run_cli(capsys, "--server", fake.target, "generate", "qa", "hi", "--stream", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["text"] for line in lines] == ["Hel", "lo", ""] and lines[-1]["finish_reason"] == "stop"

    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    code, out, _ = run_cli(capsys, "--server", fake.target, "generate", "qa", "-")
    assert out == "echo:from stdin\n"


def test_cli_tokenize_and_info(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--server", fake.target, "tokenize", "hello world")
    assert code == 0 and out.splitlines()[0] == "2 tokens" and "'hello'" in out
    code, out, _ = run_cli(capsys, "--server", fake.target, "tokenize", "hi", "--chat", "--json")
    assert json.loads(out) == {"token_ids": [10, 11, 12], "tokens": ["<user>", "hi", "</user>"]}
    code, out, _ = run_cli(capsys, "--server", fake.target, "info")
    assert code == 0 and "tiny-llama" in out and "512 (default 64)" in out
    assert "1.3 GiB, 74,992 tokens (4,687 blocks of 16), 3% used, 2 rows" in out
    code, out, _ = run_cli(capsys, "--server", fake.target, "info", "--json")
    assert json.loads(out)["limits"]["max_upload_bytes"] == 1 << 20


def test_cli_server_errors(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--server", fake.target, "show", "abort:NOT_FOUND:no task x")
    assert (code, out) == (1, "")
    assert err == "error: NOT_FOUND: no task x\n"
    code, _, err = run_cli(capsys, "--server", fake.target, "--timeout", "0.2", "generate", "sleep", "x")
    assert code == 1 and err.startswith("error: DEADLINE_EXCEEDED:")
    assert "Traceback" not in err


def test_cli_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    target = _closed_port_target()
    code, _, err = run_cli(capsys, "--server", target, "--timeout", "5", "list")
    assert code == 1 and err.startswith("error: UNAVAILABLE:")
    assert f"is the server running at {target}? start it with `softprompt serve`" in err
    assert "Traceback" not in err


def test_cli_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys)[0] == 2
    code, _, err = run_cli(capsys, "alias", "t", "prod", "zero")
    assert code == 2 and "an integer >= 1" in err
    assert run_cli(capsys, "--timeout", "-1", "list")[0] == 2
    assert run_cli(capsys, "bogus")[0] == 2
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "examples:" in out and "serve" in out and "generate" in out
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert code == 0 and "bare base model" in out and "examples:" in out


def test_cli_serve_passes_argv_through(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[list[str]] = []

    def fake_serve_main(argv: list[str]) -> int:
        received.append(argv)
        return 3

    module = types.ModuleType("softprompt.server.app.serve_cli")
    module.main = fake_serve_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "softprompt.server.app.serve_cli", module)
    assert main(["serve", "--port", "0", "--help"]) == 3
    assert main(["--json", "--server", "x:1", "serve", "list"]) == 3
    assert received == [["--port", "0", "--help"], ["list"]]

    def serve_without_torch(argv: list[str]) -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    module.main = serve_without_torch  # type: ignore[attr-defined]
    code, _, err = run_cli(capsys, "serve")
    assert code == 1 and "No module named 'torch'" in err and "softprompt[server]" in err

    def serve_with_a_bug(argv: list[str]) -> int:
        raise ModuleNotFoundError("No module named 'softprompt.oops'", name="softprompt.oops")

    module.main = serve_with_a_bug  # type: ignore[attr-defined]
    with pytest.raises(ModuleNotFoundError):  # a bug, not a missing extra: keep the traceback
        main(["serve"])


# ---------------------------------------------------------------------- import hygiene


def test_client_imports_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, softprompt.client, softprompt.client.cli; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, "
        "[m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class _Metadata(grpc.ServerInterceptor):
    """Records each call's invocation metadata."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        self.seen.append(dict(handler_call_details.invocation_metadata))
        return continuation(handler_call_details)


def test_route_by_task_sends_the_task_as_rays_multiplexed_model_id() -> None:
    """A Ray Serve deployment routes a task's requests to the replica holding its prompt by this metadata."""
    recorder = _Metadata()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[recorder])
    pb_grpc.add_InferenceServicer_to_server(FakeInference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10, route_by_task=True, token="t0ken") as routed:
            routed.generate("pirate@prod", "hi")
            list(routed.stream("poet", "hi"))
            routed.generate("", "hi")  # the bare model: nothing to route on
        with Client(f"127.0.0.1:{port}", timeout=10) as plain:
            plain.generate("pirate", "hi")
    finally:
        server.stop(None)
    ids = [m.get("multiplexed_model_id") for m in recorder.seen]
    assert ids == ["pirate", "poet", None, None]
    assert recorder.seen[0]["authorization"] == "Bearer t0ken"
