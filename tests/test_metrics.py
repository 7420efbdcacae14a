"""Observability over a real port: Prometheus metrics scraped over HTTP, request ids in metadata and logs.

The server is the real one on the tiny model with `metrics_port=0`; /metrics is read with urllib and
parsed with prometheus_client's own parser. Counters are compared before and after each test's calls,
so the tests share one server.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
import torch

from helpers import running_server
from softprompt.client import Client
from softprompt.client import errors as client_errors
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.observability import logs
from softprompt.server.grpc_api.interceptors.observing import ObservingInterceptor
from softprompt.server.observability.logs import REQUEST_ID_KEY
from softprompt.server.observability.factory import create_metrics
from softprompt.server.observability.metrics import BASE_TASK, MAX_TASK_LABELS, OTHER_TASK, NoMetrics, TaskLabels

INFERENCE = "softprompt.v1.Inference"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    with running_server(tiny_base, tmp_path_factory.mktemp("store"), metrics_port=0, max_batch_size=8, http_port=0,
                          max_new_tokens=32, default_max_new_tokens=6, max_virtual_tokens=32, batch_wait_ms=2) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server[1], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server[1]) as channel:
        yield pb_grpc.InferenceStub(channel)


def scrape(server) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    app, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def register(client, name: str, seed: int, tiny_base) -> None:
    torch.manual_seed(seed)
    hidden = tiny_base.spec.hidden_size
    client.register(name, torch.randn(3, hidden) * tiny_base.model.get_input_embeddings().weight.std() * 4)


def test_rpcs_tokens_and_latency_are_counted_by_method_and_status(server, client, tiny_base):
    before = scrape(server)
    register(client, "pirate", 1, tiny_base)
    tokens = len(client.generate("pirate", "hello", max_new_tokens=5).token_ids)
    tokens += len(client.generate("", "the quick brown fox", max_new_tokens=4).token_ids)
    tokens += sum(len(chunk.token_ids) for chunk in client.stream("pirate", "hello", max_new_tokens=3))
    with pytest.raises(client_errors.NotFoundError):
        client.generate("no-such-task", "hello")
    after = scrape(server)

    rpcs = "softprompt_rpc_requests_total"
    assert delta(before, after, rpcs, transport="grpc", service=INFERENCE, method="Generate", code="OK") == 2
    assert delta(before, after, rpcs, transport="grpc", service=INFERENCE, method="Generate", code="NOT_FOUND") == 1
    assert delta(before, after, rpcs, transport="grpc", service=INFERENCE, method="GenerateStream", code="OK") == 1
    assert delta(before, after, rpcs, transport="grpc", service="softprompt.v1.Registry", method="RegisterPrompt", code="OK") == 1
    # Every RPC is timed, failed ones too; only generations that produced a token have a first-token time.
    latency = "softprompt_rpc_duration_seconds_count"
    assert delta(before, after, latency, transport="grpc", service=INFERENCE, method="Generate") == 3
    assert delta(before, after, latency, transport="grpc", service=INFERENCE, method="GenerateStream") == 1
    ttft = "softprompt_time_to_first_token_seconds_count"
    assert delta(before, after, ttft, transport="grpc", method="Generate") == 2
    assert delta(before, after, ttft, transport="grpc", method="GenerateStream") == 1
    assert delta(before, after, "softprompt_time_to_first_token_seconds_sum", transport="grpc", method="Generate") > 0
    assert delta(before, after, "softprompt_generated_tokens_total") == tokens == 5 + 4 + 3
    assert delta(before, after, "softprompt_task_generated_tokens_total", task="pirate") == 8
    assert delta(before, after, "softprompt_task_generated_tokens_total", task=BASE_TASK) == 4
    assert delta(before, after, "softprompt_task_requests_total", task="pirate") == 2
    # The unknown task was never admitted: it takes no task label.
    assert not any(labels == (("task", "no-such-task"),) for _, labels in after)


def test_prompt_and_prefix_caches_count_misses_loads_then_hits(server, client, tiny_base):
    before = scrape(server)
    register(client, "cached", 2, tiny_base)  # RegisterPrompt loads the version and computes its prefix
    registered = scrape(server)
    client.generate("cached", "hello", max_new_tokens=1)
    served = scrape(server)
    for cache in ("prompt", "prefix"):
        # Resolving the new version misses the device cache; computing its prefix ahead is no lookup.
        assert delta(before, registered, "softprompt_cache_misses_total", cache=cache) == (cache == "prompt")
        assert delta(before, registered, "softprompt_cache_loads_total", cache=cache) == 1
        assert delta(before, registered, "softprompt_cache_hits_total", cache=cache) == 0
        assert delta(registered, served, "softprompt_cache_hits_total", cache=cache) == 1
        assert delta(registered, served, "softprompt_cache_misses_total", cache=cache) == 0
        assert value(served, "softprompt_cache_entries", cache=cache) >= 1
        assert value(served, "softprompt_cache_bytes", cache=cache) > 0


def test_scrape_time_gauges(server, tiny_base):
    samples = scrape(server)
    assert value(samples, "softprompt_queue_depth") == 0
    assert value(samples, "softprompt_batch_size") == 0
    assert value(samples, "softprompt_decode_steps_total") > 0
    assert value(samples, "softprompt_prefills_total") > 0
    assert value(samples, "softprompt_preemptions_total") == 0  # tests/test_preemption.py makes them
    # The KV pool: its size is fixed at startup; which blocks are used moves with the requests.
    kv, config = server[0].scheduler.engine.kv_usage(), tiny_base.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # keys, values; fp32
    blocks = {state: value(samples, "softprompt_kv_cache_blocks", state=state) for state in ("used", "free")}
    assert kv.total_blocks > 0 and blocks["used"] + blocks["free"] == kv.total_blocks
    assert value(samples, "softprompt_kv_cache_capacity_bytes") == kv.total_blocks * kv.block_size * bytes_per_token
    assert ("softprompt_kv_cache_rows", ()) in samples  # its value races the worker freeing finished rows
    states = {dict(labels)["state"] for name, labels in samples if name == "softprompt_training_jobs"}
    assert states == {"queued", "running", "succeeded", "failed", "cancelled"}


def test_task_labels_are_bounded(server, client, tiny_base):
    def use(i: int) -> None:
        register(client, f"task{i}", 100 + i, tiny_base)
        client.generate(f"task{i}", "hi", max_new_tokens=1)

    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(use, range(MAX_TASK_LABELS + 5)))
    samples = scrape(server)
    for metric in ("softprompt_task_requests_total", "softprompt_task_generated_tokens_total"):
        tasks = {dict(labels)["task"] for name, labels in samples if name == metric}
        assert OTHER_TASK in tasks
        assert len(tasks - {BASE_TASK}) <= MAX_TASK_LABELS + 1


def test_task_labels_unit():
    labels = TaskLabels(limit=2)
    assert [labels(t) for t in ("a@1", "b", "c@prod", "a@2", "")] == ["a", "b", OTHER_TASK, "a", BASE_TASK]


def test_request_id_is_echoed_and_logged(server, stub, caplog):
    caplog.set_level(logging.INFO, logger="softprompt")
    request = pb.GenerateRequest(task="", input="hello", params=pb.DecodingParameters(max_new_tokens=2))
    _, call = stub.Generate.with_call(request, metadata=((REQUEST_ID_KEY, "trace-abc.123"),), timeout=60)
    assert dict(call.initial_metadata())[REQUEST_ID_KEY] == "trace-abc.123"
    done = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-abc.123"]
    assert any(r.name == "softprompt.server.grpc_api.servicers" and "rpc=Generate" in r.getMessage() for r in done)

    # Streams carry it from their first message; errors carry it too, and their status line is logged.
    stream = stub.GenerateStream(request, metadata=((REQUEST_ID_KEY, "stream-1"),), timeout=60)
    assert dict(stream.initial_metadata())[REQUEST_ID_KEY] == "stream-1"
    list(stream)
    with pytest.raises(grpc.RpcError) as failed:
        stub.Generate(pb.GenerateRequest(task="missing", input="x"), metadata=((REQUEST_ID_KEY, "err-7"),), timeout=60)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(failed.value.initial_metadata())[REQUEST_ID_KEY] == "err-7"
    assert any(getattr(r, "request_id", None) == "err-7" and "code=NOT_FOUND" in r.getMessage()
               for r in caplog.records)


def test_request_id_is_generated_when_missing_or_unsafe(stub):
    request = pb.TokenizeRequest(text="hello")
    for metadata in ((), ((REQUEST_ID_KEY, "two words; key=value"),), ((REQUEST_ID_KEY, "x" * 200),)):
        _, call = stub.Tokenize.with_call(request, metadata=metadata, timeout=60)
        assert re.fullmatch(r"[0-9a-f]{16}", dict(call.initial_metadata())[REQUEST_ID_KEY])


def test_log_line_format():
    formatter = logs.KeyValueFormatter()
    record = logging.LogRecord("softprompt.server.grpc_api.servicers", logging.INFO, __file__, 1, "rpc=%s ms=%d", ("Generate", 3),
                               None)
    record.request_id = "abc123"
    assert re.fullmatch(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=INFO logger=softprompt\.server\.grpc_api\.servicers "
                        r"request_id=abc123 rpc=Generate ms=3", formatter.format(record))
    plain = logging.LogRecord("softprompt.server.app.server", logging.WARNING, __file__, 1, "hello", (), None)
    assert formatter.format(plain).endswith(" level=WARNING logger=softprompt.server.app.server hello")


def test_endpoint_stops_with_the_server(tiny_base, tmp_path):
    with running_server(tiny_base, tmp_path / "store", metrics_port=0) as (app, _):
        port = app.metrics_port
        assert port and scrape((app, None))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_http_requests_are_counted_under_the_http_transport(server, tiny_base):
    import httpx

    app, _ = server
    url = f"http://127.0.0.1:{app.http_port}/v1"
    before = scrape(server)
    body = {"model": tiny_base.spec.model_id, "prompt": "hello", "max_tokens": 3, "temperature": 0}
    assert httpx.post(f"{url}/completions", json=body, timeout=60).status_code == 200
    with httpx.stream("POST", f"{url}/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and list(r.iter_lines())
    assert httpx.post(f"{url}/completions", json={**body, "model": "nobody"}, timeout=60).status_code == 404
    after = scrape(server)
    rpcs, route = "softprompt_rpc_requests_total", "/v1/completions"
    assert delta(before, after, rpcs, transport="http", service="openai", method=route, code="200") == 2
    assert delta(before, after, rpcs, transport="http", service="openai", method=route, code="404") == 1
    assert delta(before, after, "softprompt_time_to_first_token_seconds_count", transport="http", method=route) == 2
    assert delta(before, after, "softprompt_task_requests_total", task=BASE_TASK) == 2  # shared with gRPC


class _Recorder(NoMetrics):
    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def rpc_done(self, method: str, code: str, seconds: float, transport: str = "grpc") -> None:
        with self.changed:
            self.done.append((method, code))
            self.changed.notify_all()

    def wait_for(self, entry: tuple[str, str], timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: entry in self.done, timeout)


@pytest.fixture
def fake():
    """A bare gRPC server with the interceptor and handlers that end in every way."""

    def endless(request: bytes, context: grpc.ServicerContext):
        while context.is_active():
            yield b"x"
            time.sleep(0.005)

    def boom(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise ValueError("boom")

    def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    handlers = {"Endless": grpc.unary_stream_rpc_method_handler(endless),
                "Boom": grpc.unary_unary_rpc_method_handler(boom),
                "Refuse": grpc.unary_unary_rpc_method_handler(refuse)}
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[ObservingInterceptor(recorder)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Fake", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield recorder, channel
    server.stop(None)


def test_interceptor_records_the_final_status_of_every_ending(fake):
    recorder, channel = fake
    with pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/test.Fake/Boom")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNKNOWN
    with pytest.raises(grpc.RpcError):
        channel.unary_unary("/test.Fake/Refuse")(b"", timeout=10)
    stream = channel.unary_stream("/test.Fake/Endless")(b"", timeout=30)
    next(stream)
    stream.cancel()
    assert recorder.wait_for(("/test.Fake/Endless", "CANCELLED"))
    with pytest.raises(grpc.RpcError) as e:
        list(channel.unary_stream("/test.Fake/Endless")(b"", timeout=0.3))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert recorder.wait_for(("/test.Fake/Endless", "DEADLINE_EXCEEDED"))
    assert ("/test.Fake/Boom", "UNKNOWN") in recorder.done
    assert ("/test.Fake/Refuse", "PERMISSION_DENIED") in recorder.done
    assert len(recorder.done) == 4  # each RPC once


def test_missing_prometheus_client_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "softprompt.server.observability.prometheus", raising=False)
    assert isinstance(create_metrics(False), NoMetrics)
    with pytest.raises(RuntimeError, match="prometheus_client"):
        create_metrics(True)


def test_server_runs_without_prometheus_client(tiny_model_dir, tmp_path):
    """The GPU image has no prometheus_client: with metrics off the server never imports it."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["prometheus_client"] = None  # any import of it now fails
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from helpers import running_server
        from softprompt.client import Client
        from softprompt.server.app.loading import load_base_model

        base = load_base_model({str(tiny_model_dir)!r}, device="cpu")
        with running_server(base, {str(tmp_path / "store")!r}) as (app, address):
            assert app.metrics_port is None
            with Client(address, timeout=60) as client:
                assert client.generate("", "hello", max_new_tokens=2).token_ids
        print("served")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "served" in result.stdout


def _readme_metric_rows() -> dict[str, set[str]]:
    """README's metrics table: each metric's name (as scraped) and the labels the row lists."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows: dict[str, set[str]] = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`softprompt_"):
            continue
        labels = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", cells[2])))  # "(`used`, `free`)": values
        for name in re.findall(r"`(softprompt_\w+)`", cells[0]):
            rows[name] = labels
    return rows


def test_the_readme_lists_every_label_of_each_metric(server, client, tiny_base):
    """The table README gives operators names every label a metric has (`transport` included) and no other."""
    from prometheus_client.parser import text_string_to_metric_families

    client.generate("", "hello", max_new_tokens=2)
    app, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{app.http_port}/v1/models", timeout=10):
        pass
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    scraped: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            scraped.setdefault(s.name, set()).update(set(s.labels) - {"le", "quantile"})
    rows = _readme_metric_rows()
    assert "softprompt_rpc_requests_total" in rows and "softprompt_time_to_first_token_seconds" in rows
    for name, labels in rows.items():
        scraped_name = name if name in scraped else f"{name}_count"  # a histogram's row names the family
        if scraped_name in scraped:
            assert labels == scraped[scraped_name], f"README's row for {name} lists {sorted(labels)}"
