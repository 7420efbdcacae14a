"""End to end over a real port: PEFT adapters registered, mixed-task batches, streams, every bad input.

The server is the real one (`build_app` + `start`) on a tiny model; clients talk to it through the
Python client library over loopback gRPC.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_peft_adapter, reference_greedy, running_server
from softprompt.client import Client
from softprompt.client import errors as client_errors

INPUTS = ["the quick brown fox", "hello", "a soft prompt is a small matrix of", "one frozen model serves many"]


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    with running_server(tiny_base, tmp_path_factory.mktemp("store"), max_batch_size=8, max_new_tokens=64,
                          default_max_new_tokens=12, max_virtual_tokens=32, batch_wait_ms=5) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    with Client(server[1], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two real PEFT prompt-tuning adapters of different lengths, saved by PEFT itself."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, tokens, seed in (("sentiment", 4, 11), ("summarize", 7, 22)):
        copy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # PEFT wraps it; the served model stays clean
        out[name] = make_peft_adapter(copy, tmp_path_factory.mktemp(name), num_virtual_tokens=tokens, seed=seed)
    return out


@pytest.fixture(scope="module")
def registered(client, adapters):
    return {name: client.register(name, str(path)) for name, path in adapters.items()}


def _prompt(adapter_dir: Path) -> torch.Tensor:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))["prompt_embeddings"]


def _expected(tiny_base, prompt, text, max_new_tokens):
    eos = {tiny_base.tokenizer.eos_token_id}
    return reference_greedy(tiny_base.model, prompt, tiny_base.tokenizer(text).input_ids, max_new_tokens, eos)


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server[1]) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="softprompt.v1.Inference"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"softprompt.v1.Inference", "softprompt.v1.Registry", "grpc.health.v1.Health"} <= names


def test_model_info(client, tiny_base):
    info = client.model_info()
    assert info.hidden_size == tiny_base.spec.hidden_size
    assert info.fingerprint == tiny_base.spec.fingerprint
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.limits.max_batch_size == 8
    kv, config = info.kv_cache, tiny_base.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    # Keys and values, every layer, float32.
    assert kv.bytes_per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4
    # "auto" on CPU is 2 GiB, of which the pool takes whole blocks, one of them reserved.
    per_block = kv.block_size * kv.bytes_per_token
    assert kv.total_blocks > 0 and 2 << 30 >= kv.total_bytes + per_block > (2 << 30) - per_block
    assert kv.total_tokens == kv.total_blocks * kv.block_size
    # Nothing has run on this module's server yet (the tests run in file order).
    assert (kv.used_blocks, kv.rows, kv.free_tokens) == (0, 0, kv.total_tokens)


def test_register_records_peft_metadata(registered, adapters, tiny_base):
    info = registered["sentiment"]
    assert info.ref == f"sentiment@{info.version}"
    assert info.num_virtual_tokens == 4
    assert info.base_model_fingerprint == tiny_base.spec.fingerprint
    assert info.peft_type == "PROMPT_TUNING"


def test_mixed_tasks_concurrently_match_reference_and_solo_runs(client, registered, adapters, tiny_base):
    prompts = {"": None, **{name: _prompt(path) for name, path in adapters.items()}}
    jobs = [(task, INPUTS[i % len(INPUTS)], 8 + i) for i, task in enumerate(["sentiment", "summarize", ""] * 4)]

    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda j: client.generate(j[0], j[1], max_new_tokens=j[2]), jobs))
    solo = [client.generate(task, text, max_new_tokens=n) for task, text, n in jobs]

    for (task, text, n), together, alone in zip(jobs, batched, solo):
        expected = _expected(tiny_base, prompts[task], text, n)
        assert list(together.token_ids) == expected, f"{task!r} in a mixed batch differs from the reference"
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        assert together.usage.virtual_tokens == (0 if not task else registered[task].num_virtual_tokens)
        assert together.usage.generated_tokens == len(expected)
        assert together.prompt_version == (registered[task].ref if task else "")
    assert any(a.token_ids != b.token_ids for a, b in zip(batched, batched[1:])), "tasks should differ"


def test_stream_equals_generate(client, registered):
    full = client.generate("summarize", INPUTS[2], max_new_tokens=16)
    chunks = list(client.stream("summarize", INPUTS[2], max_new_tokens=16))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == list(full.token_ids)
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == full.finish_reason
    assert chunks[-1].usage == full.usage


def test_stop_sequence(client):
    full = client.generate("", INPUTS[0], max_new_tokens=24)
    stop = next(ch for ch in full.text if not ch.isspace())
    cut = client.generate("", INPUTS[0], max_new_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(c.text for c in client.stream("", INPUTS[0], max_new_tokens=24, stop=[stop]))
    assert streamed == cut.text


def test_chat_template_and_tokenize(client, tiny_base):
    tokens = client.tokenize("hello", chat=True)
    rendered = tiny_base.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                                         add_generation_prompt=True)
    assert list(tokens.token_ids) == tiny_base.tokenizer(rendered, add_special_tokens=False).input_ids
    result = client.generate("", "hello", chat=True, max_new_tokens=5)
    assert result.usage.input_tokens == len(tokens.token_ids)


def test_new_version_and_alias(client, adapters, tiny_base):
    v1 = client.register("versioned", str(adapters["sentiment"]))
    first = client.generate("versioned", INPUTS[1], max_new_tokens=10)
    v2 = client.register("versioned", str(adapters["summarize"]))
    assert v2.version == v1.version + 1
    latest = client.generate("versioned", INPUTS[1], max_new_tokens=10)
    assert latest.prompt_version == v2.ref
    assert list(latest.token_ids) == _expected(tiny_base, _prompt(adapters["summarize"]), INPUTS[1], 10)

    client.set_alias("versioned", "prod", v1.version)
    pinned = client.generate("versioned@prod", INPUTS[1], max_new_tokens=10)
    assert pinned.prompt_version == v1.ref and pinned.token_ids == first.token_ids
    assert "prod" in client.get_prompt("versioned@prod").aliases

    with pytest.raises(client_errors.FailedPreconditionError, match="alias"):
        client.delete_prompt(v1.ref)
    assert client.delete_prompt(v2.ref) == [v2.ref]
    assert client.generate("versioned", INPUTS[1], max_new_tokens=10).prompt_version == v1.ref
    with pytest.raises(client_errors.NotFoundError):
        client.generate(v2.ref, INPUTS[1])


def test_a_registered_version_is_ready_before_register_returns(client, server, tiny_base):
    """RegisterPrompt loads the version onto the device and computes its prefix keys and values, so its first
    request finds both cached."""
    app = server[0]
    info = client.register("warmed", torch.randn(4, tiny_base.spec.hidden_size) * 0.1)
    key = (info.name, info.version, info.sha256)
    prompts, prefixes = app.prompts.lru, app.admission.engine.prefixes
    assert key in prompts._items and key in prefixes._items
    misses = (prompts.misses, prefixes.misses)
    assert client.generate("warmed", INPUTS[0], max_new_tokens=2).prompt_version == info.ref
    assert (prompts.misses, prefixes.misses) == misses


def test_raw_tensor_registration(client, tiny_base, tmp_path):
    tensor = torch.randn(3, tiny_base.spec.hidden_size) * 0.1
    info = client.register("rawtask", tensor)
    assert info.num_virtual_tokens == 3
    result = client.generate("rawtask", INPUTS[0], max_new_tokens=6)
    assert list(result.token_ids) == _expected(tiny_base, tensor, INPUTS[0], 6)
    path = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeddings": tensor}, str(path))
    assert client.register("rawtask", str(path)).sha256 == info.sha256


def test_list_paging(client, registered):
    names = {p.name for p in client.list_prompts(page_size=1)}
    assert {"sentiment", "summarize"} <= names


def _bad_adapter(adapters, tmp_path, *, config=None, tensor=None) -> Path:
    src = adapters["sentiment"]
    out = tmp_path / "bad"
    out.mkdir(exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor is None:
        (out / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    elif isinstance(tensor, bytes):
        (out / "adapter_model.safetensors").write_bytes(tensor)
    else:
        cfg["num_virtual_tokens"], cfg["token_dim"] = tensor.shape
        (out / "adapter_config.json").write_text(json.dumps(cfg))
        save_file({"prompt_embeddings": tensor}, str(out / "adapter_model.safetensors"))
    return out


def test_bad_inputs_get_precise_statuses_and_the_server_keeps_serving(client, registered, adapters, tiny_base, tmp_path):
    hidden = tiny_base.spec.hidden_size
    cases = [
        (client_errors.NotFoundError, "no-such-task", lambda: client.generate("no-such-task", "hi")),
        (client_errors.NotFoundError, "", lambda: client.generate("sentiment@99", "hi")),
        (client_errors.NotFoundError, "", lambda: client.generate("sentiment@canary", "hi")),
        (client_errors.InvalidArgumentError, "", lambda: client.generate("../etc/passwd", "hi")),
        (client_errors.InvalidArgumentError, "max_new_tokens", lambda: client.generate("", "hi", max_new_tokens=10_000)),
        (client_errors.InvalidArgumentError, "temperature", lambda: client.generate("", "hi", temperature=-1)),
        (client_errors.InvalidArgumentError, "top_p", lambda: client.generate("", "hi", temperature=1, top_p=1.5)),
        (client_errors.InvalidArgumentError, "empty", lambda: client.generate("", "")),
        (client_errors.InvalidArgumentError, "sequence length",
         lambda: client.generate("", "the quick brown fox " * 60, max_new_tokens=64)),
        (client_errors.InvalidArgumentError, "", lambda: client.register("bad name!", str(adapters["sentiment"]))),
        (client_errors.InvalidArgumentError, "hidden size",
         lambda: client.register("bad", str(_bad_adapter(adapters, tmp_path, tensor=torch.randn(4, hidden + 1))))),
        (client_errors.InvalidArgumentError, "",
         lambda: client.register("bad", str(_bad_adapter(adapters, tmp_path, tensor=torch.full((4, hidden), float("nan")))))),
        (client_errors.InvalidArgumentError, "",
         lambda: client.register("bad", str(_bad_adapter(adapters, tmp_path, tensor=b"\x00garbage")))),
        (client_errors.InvalidArgumentError, "prefix",
         lambda: client.register("bad", str(_bad_adapter(adapters, tmp_path, config={"peft_type": "PREFIX_TUNING"})))),
        (client_errors.FailedPreconditionError, "force",
         lambda: client.register("bad", str(adapters["sentiment"]), base_model_fingerprint="0123456789abcdef")),
        (client_errors.InvalidArgumentError, "",
         lambda: client.register("bad", torch.randn(64, hidden))),  # over max_virtual_tokens=32
    ]
    for error, fragment, call in cases:
        with pytest.raises(error) as info:
            call()
        assert fragment.lower() in str(info.value).lower()
    with pytest.raises(client_errors.NotFoundError):
        client.get_prompt("bad")  # nothing half-registered

    forced = client.register("forced", str(adapters["sentiment"]), base_model_fingerprint="0123456789abcdef", force=True)
    assert forced.base_model_fingerprint == tiny_base.spec.fingerprint

    result = client.generate("sentiment", INPUTS[0], max_new_tokens=8)
    assert list(result.token_ids) == _expected(tiny_base, _prompt(adapters["sentiment"]), INPUTS[0], 8)


def test_deadline_exceeded_and_recovery(client, server):
    with pytest.raises(client_errors.DeadlineExceededError):
        client.generate("", INPUTS[0], max_new_tokens=64, timeout=0.001)
    assert client.generate("", INPUTS[0], max_new_tokens=4).usage.generated_tokens == 4
    _wait_idle(server[0])


def test_cancelled_stream_frees_its_row(client, server):
    stream = client.stream("", INPUTS[0], max_new_tokens=64)
    next(iter(stream))
    stream.close()
    _wait_idle(server[0])
    assert client.generate("", INPUTS[1], max_new_tokens=3).usage.generated_tokens == 3


def _wait_idle(app, timeout: float = 10.0) -> None:
    """Waits until the scheduler holds no request (a bounded poll; correctness, not timing, is tested)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if app.scheduler.snapshot().idle:
            return
        time.sleep(0.01)
    raise AssertionError("requests are still held by the scheduler")


def test_threads_do_not_leak(client):
    def round_of_requests() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.generate("", INPUTS[i % 4], max_new_tokens=4), range(16)))

    round_of_requests()  # warms the server's thread pool
    before = threading.active_count()
    for _ in range(3):
        round_of_requests()
    assert threading.active_count() <= before


def test_cli_against_the_real_server(server, adapters, capsys, tiny_base):
    from softprompt.client.cli import main

    addr = ["--server", server[1]]
    assert main([*addr, "register", "clitask", str(adapters["summarize"]), "--tag", "team=nlp"]) == 0
    capsys.readouterr()
    assert main([*addr, "--json", "show", "clitask"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tags"] == {"team": "nlp"} and shown["num_virtual_tokens"] == 7

    assert main([*addr, "generate", "clitask", INPUTS[0], "--max-new-tokens", "9"]) == 0
    out = capsys.readouterr()
    expected = _expected(tiny_base, _prompt(adapters["summarize"]), INPUTS[0], 9)
    assert out.out.rstrip("\n") == tiny_base.tokenizer.decode(expected, skip_special_tokens=True)
    assert "clitask@" in out.err

    assert main([*addr, "generate", "clitask", INPUTS[0], "--max-new-tokens", "9", "--stream"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == out.out.rstrip("\n")

    assert main([*addr, "list"]) == 0
    assert "clitask@" in capsys.readouterr().out
    assert main([*addr, "generate", "nope", "x"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
