"""The OpenAI-compatible HTTP API on a real server (a free port), through the official `openai` package and raw HTTP.

Greedy outputs are compared with the gRPC path's and with the no-cache reference; raw HTTP checks
what the SDK hides: SSE framing, error bodies and statuses, auth, unsupported parameters, oversized
and malformed bodies, disconnects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from helpers import TEXTS, reference_greedy, running_server, wait_until
from softprompt.client import Client, InvalidArgumentError
from softprompt.prompts.tokens import encode_messages
from softprompt.server.access.tokens import Role, format_entry, hash_token
from softprompt.server.core.handle import Handle

TASKS = ("pirate", "poet")


def _prompt(base, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(4, base.spec.hidden_size) * base.model.get_input_embeddings().weight.std() * 4


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    """(app, gRPC address, HTTP base URL) with two tasks registered, `pirate@prod` -> version 1."""
    with running_server(tiny_base, tmp_path_factory.mktemp("store"), http_port=0) as (app, address):
        with Client(address) as client:
            for seed, task in enumerate(TASKS):
                client.register(task, _prompt(tiny_base, seed))
            client.register("pirate", _prompt(tiny_base, 7))  # pirate@2 is the newest
            client.set_alias("pirate", "prod", 1)
        yield app, address, f"http://127.0.0.1:{app.http_port}/v1"


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server[2], api_key="unused", max_retries=0)


def _grpc(server, task: str, text: str, n: int, **kw):
    with Client(server[1]) as client:
        return client.generate(task, text, max_new_tokens=n, **kw)


def _reference_text(base, app, task: str, ids: list[int], n: int) -> str:
    prompt = None if not task else app.registry.load_embeddings(app.registry.resolve(task)).to(base.dtype)
    tokens = reference_greedy(base.model, prompt, ids, n, {base.tokenizer.eos_token_id})
    return base.tokenizer.decode(tokens)


# ---------------------------------------------------------------- the SDK, against gRPC and the reference


@pytest.mark.parametrize("model", ["pirate", "pirate@prod", "poet"])
def test_completions_equal_grpc_and_the_reference(server, sdk, tiny_base, model):
    app = server[0]
    out = sdk.completions.create(model=model, prompt=TEXTS[0], max_tokens=8, temperature=0)
    grpc_result = _grpc(server, model, TEXTS[0], 8)
    assert out.choices[0].text == grpc_result.text
    ids = tiny_base.tokenizer(TEXTS[0]).input_ids
    assert out.choices[0].text == _reference_text(tiny_base, app, model, ids, 8)
    assert out.choices[0].finish_reason in ("stop", "length") and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(grpc_result.token_ids)
    assert out.system_fingerprint == grpc_result.prompt_version  # the version `model` resolved to


def test_the_base_model_id_runs_without_a_prompt(server, sdk, tiny_base):
    base_id = tiny_base.spec.model_id
    out = sdk.completions.create(model=base_id, prompt=TEXTS[1], max_tokens=6, temperature=0)
    assert out.choices[0].text == _grpc(server, "", TEXTS[1], 6).text


def test_a_list_of_prompts_gets_one_choice_each_in_order(server, sdk):
    out = sdk.completions.create(model="poet", prompt=TEXTS[:3], max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [_grpc(server, "poet", t, 5).text for t in TEXTS[:3]]


def test_streamed_completions_join_to_the_whole_answer_with_usage_last(server, sdk):
    whole = sdk.completions.create(model="pirate", prompt=TEXTS[2], max_tokens=10, temperature=0)
    chunks = list(sdk.completions.create(model="pirate", prompt=TEXTS[2], max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])


def test_chat_goes_through_the_chat_template_and_streams_the_role_first(server, sdk, tiny_base):
    app = server[0]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": TEXTS[3]}]
    out = sdk.chat.completions.create(model="poet", messages=messages, max_tokens=8, temperature=0)
    ids = encode_messages(tiny_base.tokenizer, [("system", "be brief"), ("user", TEXTS[3])])
    assert out.choices[0].message.content == _reference_text(tiny_base, app, "poet", ids, 8)
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(ids)
    stream = list(sdk.chat.completions.create(model="poet", messages=messages, max_tokens=8, temperature=0,
                                              stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_one_user_message_equals_grpc_with_the_chat_template(server, sdk):
    out = sdk.chat.completions.create(model="pirate", messages=[{"role": "user", "content": TEXTS[0]}],
                                      max_completion_tokens=7, temperature=0)
    assert out.choices[0].message.content == _grpc(server, "pirate", TEXTS[0], 7, chat=True).text


def test_async_streaming_equals_sync(server):
    import asyncio

    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=server[2], api_key="unused", max_retries=0)
        stream = await client.completions.create(model="poet", prompt=TEXTS[1], max_tokens=9, temperature=0,
                                                 stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        await client.close()
        return text

    assert asyncio.run(run()) == _grpc(server, "poet", TEXTS[1], 9).text


def test_seeded_sampling_repeats(server, sdk):
    kw = dict(model="pirate", prompt=TEXTS[0], max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    assert sdk.completions.create(**kw).choices[0].text == sdk.completions.create(**kw).choices[0].text


def test_http_and_grpc_requests_share_batches_and_give_what_they_give_alone(server, sdk):
    jobs = [(t, TEXTS[i % 4]) for i, t in enumerate(["pirate", "poet", "pirate@prod", "poet"] * 3)]
    alone = [_grpc(server, t, x, 10).text for t, x in jobs]

    def run(i: int) -> str:
        task, text = jobs[i]
        if i % 2:
            return _grpc(server, task, text, 10).text
        return sdk.completions.create(model=task, prompt=text, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, range(len(jobs))))
    assert together == alone


def test_classify_equals_grpc_classify(server):
    labels = ["great", "awful film", "so so"]
    body = httpx.post(f"{server[2]}/classify", json={"model": "poet", "input": [TEXTS[0], TEXTS[1]],
                                                      "labels": labels}).json()
    with Client(server[1]) as client:
        expected = [client.classify("poet", t, labels) for t in TEXTS[:2]]
    for row, want in zip(body["data"], expected):
        assert row["label"] == want.label and row["num_classes"] == 3
        assert row["probs"] == pytest.approx([s.probability for s in want.scores], abs=1e-9)


# ---------------------------------------------------------------- models


def test_models_lists_the_base_model_tasks_versions_and_aliases(server, sdk, tiny_base):
    base_id = tiny_base.spec.model_id
    ids = {m.id: m for m in sdk.models.list().data}
    assert {base_id, "pirate", "pirate@1", "pirate@2", "pirate@prod", "poet", "poet@1"} <= set(ids)
    assert ids["pirate@prod"].model_extra["parent"] == base_id and ids["pirate"].owned_by == "softprompt"
    assert sdk.models.retrieve("pirate@prod").id == "pirate@prod"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nobody")


def test_openapi_describes_every_answer_and_its_errors(server):
    spec = httpx.get(server[2].removesuffix("/v1") + "/openapi.json", timeout=30).json()

    def schema(op: dict, status: str) -> str:
        return op["responses"][status]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]

    ops = {path: op for path, methods in spec["paths"].items() for op in methods.values()}
    assert {path: schema(op, "200") for path, op in ops.items()} == {
        "/v1/models": "ModelList", "/v1/models/{model}": "Model", "/v1/completions": "Completion",
        "/v1/chat/completions": "ChatCompletion", "/v1/classify": "ClassifyResponse"}
    # Every status the server answers, each by its number with OpenAI's error model; never FastAPI's 422. This
    # server takes no token: no 401 and no bearer scheme (tests/test_openapi.py has the server with tokens).
    errors = {path: sorted(int(s) for s in op["responses"] if s != "200") for path, op in ops.items()}
    generation = [400, 403, 404, 413, 429, 499, 500, 503, 504]
    assert errors == {"/v1/models": [400, 500, 503], "/v1/models/{model}": [403, 404, 500, 503],
                      "/v1/completions": generation, "/v1/chat/completions": generation, "/v1/classify": generation}
    assert all(schema(op, status) == "ErrorResponse" for op in ops.values() for status in op["responses"]
               if status != "200")
    assert "Retry-After" in ops["/v1/completions"]["responses"]["429"]["headers"]
    assert "text/event-stream" in ops["/v1/chat/completions"]["responses"]["200"]["content"]
    assert "securitySchemes" not in spec["components"]


# ---------------------------------------------------------------- errors, raw


def _post(server, path: str, body: object, **kw) -> httpx.Response:
    return httpx.post(f"{server[2]}{path}", json=body, timeout=30, **kw)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_an_unknown_model_is_404_with_close_matches(server):
    response = _post(server, "/completions", {"model": "pirat", "prompt": "hi"})
    assert response.status_code == 404
    error = _error(response)
    assert error["param"] == "model" and "'pirate'" in error["message"] and error["type"] == "not_found_error"


@pytest.mark.parametrize(("extra", "param"), [
    ({"n": 2}, "n"), ({"logprobs": 3}, "logprobs"), ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"best_of": 3}, "best_of"), ({"temprature": 0}, "temprature"), ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"stop": 5}, "stop"),
])
def test_unsupported_or_bad_parameters_are_400_naming_them(server, extra, param):
    response = _post(server, "/completions", {"model": "poet", "prompt": "hi", **extra})
    assert response.status_code == 400, response.text
    assert _error(response)["param"] == param


def test_neutral_values_of_unimplemented_parameters_and_no_effect_fields_pass(server):
    body = {"model": "poet", "prompt": "hi", "max_tokens": 3, "temperature": 0, "n": 1, "presence_penalty": 0,
            "logprobs": None, "user": "u-1", "metadata": {"a": "b"}}
    assert _post(server, "/completions", body).status_code == 200


def test_chat_refuses_tools_and_unknown_roles(server):
    base = {"model": "poet", "messages": [{"role": "user", "content": "hi"}]}
    response = _post(server, "/chat/completions", {**base, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert response.status_code == 400 and _error(response)["param"] == "tools"
    response = _post(server, "/chat/completions", {"model": "poet", "messages": [{"role": "robot", "content": "hi"}]})
    assert response.status_code == 400 and _error(response)["param"].startswith("messages[0].role")


def test_malformed_and_oversized_bodies(server):
    app = server[0]
    response = httpx.post(f"{server[2]}/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and _error(response)["code"] == "invalid_json"
    big = b'{"model": "poet", "prompt": "' + b"a" * (app.config.max_upload_bytes + 1) + b'"}'
    response = httpx.post(f"{server[2]}/completions", content=big, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and "--max-upload-mb" in _error(response)["message"]


def test_sse_framing_and_request_ids(server):
    with httpx.stream("POST", f"{server[2]}/completions", timeout=30, headers={"x-request-id": "abc-123"},
                      json={"model": "poet", "prompt": "hi", "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == "abc-123"
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line and not line.startswith(":")]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


@pytest.mark.parametrize(("path", "field"), [("/completions", "max_tokens"), ("/chat/completions", "max_tokens"),
                                           ("/chat/completions", "max_completion_tokens")])
def test_a_limit_names_the_field_the_caller_sent(server, path, field):
    text = {"prompt": "hi"} if path == "/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    response = _post(server, path, {"model": "poet", **text, field: 100000})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == field and error["message"].startswith(f"{field} 100000 exceeds this server's limit")
    assert "max_new_tokens" not in error["message"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"max_tokens": "5"}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"), ({"priority": True}, "priority"),
    ({"stream": 1}, "stream"), ({"temperature": False}, "temperature"), ({"seed": 2**53}, "seed"),
])
def test_numbers_and_flags_are_json_s(server, extra, param):
    """What the schema says an integer, number or boolean is, the server takes, and nothing else: pydantic alone
    would take "5" and true for integers and 1 for a boolean."""
    response = _post(server, "/completions", {"model": "poet", "prompt": "hi", **extra})
    assert response.status_code == 400 and _error(response)["param"] == param
    whole = {"model": "poet", "prompt": "hi", "max_tokens": 2.0, "seed": 2**53 - 1, "temperature": 0}
    assert _post(server, "/completions", whole).status_code == 200  # 2.0 is the integer 2, as JSON Schema has it


def test_max_tokens_beside_max_completion_tokens_is_checked_too(server):
    """The newer name decides how many tokens; the older one given beside it must still be in range, as the
    schema says of both (schemathesis found a body the schema forbids that was served)."""
    body = {"model": "poet", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2}
    response = _post(server, "/chat/completions", {**body, "max_tokens": 100000})
    assert response.status_code == 400 and _error(response)["param"] == "max_tokens"
    assert _post(server, "/chat/completions", {**body, "max_tokens": 50}).status_code == 200


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/completions", {"prompt": ""}, "prompt"),
    ("/completions", {"prompt": ["hi", ""]}, "prompt[1]"),
    ("/completions", {"prompt": []}, "prompt"),
    ("/chat/completions", {"messages": []}, "messages"),
    ("/classify", {"input": "", "labels": ["a", "b"]}, "input"),
])
def test_empty_input_is_400_as_on_grpc(server, path, body, param):
    response = _post(server, path, {"model": "poet", **body})
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == param and error["message"].startswith(f"{error['param']} is empty: give")
    with Client(server[1]) as client, pytest.raises(InvalidArgumentError, match="input is empty: give some text"):
        client.generate("poet", "")  # the same rule on gRPC


@pytest.mark.parametrize("task", ["pirate", ""])
def test_every_chunk_of_a_stream_carries_the_fingerprint(server, tiny_base, task):
    model = task or tiny_base.spec.model_id
    with httpx.stream("POST", f"{server[2]}/chat/completions", timeout=30, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1]["usage"]  # first and usage chunks
    expected = "pirate@2" if task else tiny_base.spec.model_id  # what ran: the version, or the base model
    assert [c["system_fingerprint"] for c in chunks] == [expected] * len(chunks)
    whole = _post(server, "/completions", {"model": model, "prompt": "hi", "max_tokens": 2}).json()
    assert whole["system_fingerprint"] == expected


def test_a_client_that_disconnects_frees_its_row(server, tiny_base):
    app = server[0]
    scheduler = app.scheduler
    longest = tiny_base.max_sequence_length - 8  # the row would run ~250 steps if nobody stopped it
    body = {"model": "poet", "prompt": "hi", "max_tokens": longest, "temperature": 0, "stream": True}
    reached, gate = threading.Event(), threading.Event()
    most = [0]  # the most tokens the row was seen to have made

    def hold(module, args, kwargs) -> None:  # this server's worker stops once the row made 3 tokens
        if not scheduler.in_worker():
            return  # the model is shared: other servers' workers pass
        running = scheduler.snapshot().running
        most[0] = max([most[0], *(row.generated for row in running)])
        if not reached.is_set() and most[0] >= 3:
            reached.set()
            gate.wait(60)

    hook = tiny_base.model.register_forward_pre_hook(hold, with_kwargs=True)
    app.scheduler.engine.ignore_eos = True
    try:
        with httpx.stream("POST", f"{server[2]}/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            assert reached.wait(60)
            (row,) = scheduler.snapshot().running
        gate.set()
        wait_until(lambda: scheduler.snapshot().idle)
    finally:
        gate.set()
        hook.remove()
        app.scheduler.engine.ignore_eos = False
    assert row.kv_blocks and most[0] < 10  # it held blocks and stopped long before its ~250 tokens
    assert scheduler.snapshot().kv.used_blocks == 0  # and gave its KV blocks back


def test_a_client_that_leaves_before_its_whole_answer_frees_its_row(server, tiny_base, monkeypatch):
    """A non-streamed request is cancelled when its client disconnects: the server waits for the disconnect
    itself, and the scheduler drops the row at its next step."""
    app = server[0]
    scheduler = app.scheduler
    body = json.dumps({"model": "poet", "prompt": "hi", "max_tokens": tiny_base.max_sequence_length - 8,
                       "temperature": 0}).encode()
    reached, gate, cancelled = threading.Event(), threading.Event(), threading.Event()

    def hold(module, args, kwargs) -> None:  # this server's worker stops once the row made 3 tokens
        if not scheduler.in_worker() or reached.is_set():
            return  # the model is shared: other servers' workers pass
        if any(row.generated >= 3 for row in scheduler.snapshot().running):
            reached.set()
            gate.wait(60)

    def cancel(handle: Handle, cancel=Handle.cancel) -> None:
        cancel(handle)
        cancelled.set()

    monkeypatch.setattr(Handle, "cancel", cancel)
    hook = tiny_base.model.register_forward_pre_hook(hold, with_kwargs=True)
    app.scheduler.engine.ignore_eos = True
    try:
        with socket.create_connection(("127.0.0.1", app.http_port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert reached.wait(60)
        assert cancelled.wait(60), "the disconnect did not cancel the generation"
        steps = scheduler.snapshot().stats.steps
        gate.set()
        wait_until(lambda: not scheduler.snapshot().running)
    finally:
        gate.set()
        hook.remove()
        app.scheduler.engine.ignore_eos = False
    assert scheduler.snapshot().stats.steps - steps < 10  # dropped at once, not run out to max_tokens


# ---------------------------------------------------------------- queue full, draining, auth: servers of their own


def test_a_full_queue_is_429_with_retry_after_and_draining_is_503(tiny_base, tmp_path):
    with running_server(tiny_base, tmp_path / "store", http_port=0, max_queued_requests=1) as (app, _):
        url = f"http://127.0.0.1:{app.http_port}/v1/completions"
        body = {"model": tiny_base.spec.model_id, "prompt": "hi", "max_tokens": 2, "temperature": 0}
        release = threading.Event()
        busy = threading.Thread(target=app.scheduler.call, args=(release.wait,))  # holds the worker
        busy.start()
        wait_until(lambda: not app.scheduler.snapshot().side_jobs)
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, url, json=body, timeout=30)
            wait_until(lambda: app.scheduler.queue_depth() == 1)
            refused = httpx.post(url, json=body, timeout=30)
            release.set()
            assert queued.result().status_code == 200
        busy.join()
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert _error(refused)["type"] == "rate_limit_error"
        app.scheduler.stop_admitting()
        draining = httpx.post(url, json=body, timeout=30)
        assert draining.status_code == 503 and "shutting down" in _error(draining)["message"]


def test_tokens_roles_and_task_patterns_apply_over_http(tiny_base, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("\n".join([format_entry(hash_token("all"), Role.INFER),
                                 format_entry(hash_token("pirates"), Role.INFER, ["pir*"])]) + "\n")
    with running_server(tiny_base, tmp_path / "store", http_port=0, auth_tokens=tokens) as (app, address):
        app.registry.register("poet", _tensor_prompt(tiny_base), tiny_base.spec)
        app.registry.register("pirate", _tensor_prompt(tiny_base), tiny_base.spec)
        base_url = f"http://127.0.0.1:{app.http_port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        response = httpx.get(f"{base_url}/models")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        limited = openai.OpenAI(base_url=base_url, api_key="pirates", max_retries=0)
        assert {m.id for m in limited.models.list().data} == {"pirate", "pirate@1"}
        with pytest.raises(openai.PermissionDeniedError):
            limited.completions.create(model="poet", prompt="hi", max_tokens=2)
        assert limited.completions.create(model="pirate", prompt="hi", max_tokens=2).choices
        everyone = openai.OpenAI(base_url=base_url, api_key="all", max_retries=0)
        assert tiny_base.spec.model_id in {m.id for m in everyone.models.list().data}


def _tensor_prompt(base):
    from softprompt.prompts.format.tensor import PromptTensor

    return PromptTensor(embeddings=_prompt(base, 3), source_type="RAW")


def test_open_streams_all_get_their_first_token_and_hold_no_thread(tiny_base, tmp_path):
    """256 streams (anyio's shared pool has 40 threads) all see their first token while every one of them is still
    running, and none holds a thread meanwhile: generations are awaited on the event loop. Threads serve only
    admission (anyio's bounded pool), so the server has no more threads of its own than before the streams."""
    streams = 256
    with running_server(tiny_base, tmp_path / "store", http_port=0, max_batch_size=streams) as (app, _):
        url = f"http://127.0.0.1:{app.http_port}/v1/completions"
        body = {"model": tiny_base.spec.model_id, "prompt": "hi", "max_tokens": 40, "temperature": 0, "stream": True}
        all_started, all_first, release = threading.Event(), threading.Event(), threading.Event()
        scheduler = app.scheduler

        def hold(module, args, kwargs) -> None:  # once every stream made a token, the worker waits for all readers
            if not scheduler.in_worker() or release.is_set():
                return  # the model is shared: other servers' workers pass
            running = scheduler.snapshot().running
            if len(running) == streams and all(row.generated for row in running):
                all_started.set()
                release.wait(60)

        async def clients() -> list[int]:
            firsts = 0

            async def client(http: httpx.AsyncClient) -> int:
                nonlocal firsts
                async with http.stream("POST", url, json=body) as r:
                    lines = r.aiter_lines()
                    async for line in lines:
                        if line.startswith("data: "):
                            break
                    firsts += 1
                    if firsts == streams:
                        all_first.set()
                    return sum([1 async for line in lines if line.startswith("data: ")])

            limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
            async with httpx.AsyncClient(timeout=120, limits=limits) as http:
                return await asyncio.gather(*(client(http) for _ in range(streams)))

        own_threads = _server_threads()
        hook = tiny_base.model.register_forward_pre_hook(hold, with_kwargs=True)
        app.scheduler.engine.ignore_eos = True
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="test-clients") as pool:  # one thread for every client
                results = pool.submit(asyncio.run, clients())
                assert all_started.wait(120)
                assert all_first.wait(60), f"not all of {streams} streams saw a token while all were running"
                reading, threads_now = _reading_threads(), _server_threads()
                release.set()
                assert all(n > 0 for n in results.result())
        finally:
            release.set()
            hook.remove()
            app.scheduler.engine.ignore_eos = False
    assert reading == 0, f"{reading} threads were blocked reading a generation"
    assert threads_now <= own_threads, "open streams added threads to the server"


def _server_threads() -> int:
    """This process's threads, less anyio's bounded pool (admission) and the test's own client thread."""
    return sum(1 for t in threading.enumerate() if t.name != "AnyIO worker thread" and not t.name.startswith("test-"))


def _reading_threads() -> int:
    """Threads whose stack is inside a blocking read of a generation (`Handle.chunks`)."""
    def inside(frame) -> bool:
        while frame is not None:
            if frame.f_code.co_name == "chunks" and frame.f_code.co_filename.endswith("handle.py"):
                return True
            frame = frame.f_back
        return False
    return sum(inside(f) for f in sys._current_frames().values())
