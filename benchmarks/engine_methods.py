"""Our methods: the engine offline (d, h), the gRPC server (e), the server while a job trains (f) and the
server's OpenAI-compatible HTTP API (i).

Each builds its own App on the shared model with two public engine options: `ignore_eos`, so every
request runs to max_new_tokens like HF with min_new_tokens, and `timings`, which splits the
engine's time into its step parts for the report.
"""

from __future__ import annotations

import copy
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from softprompt.benchmarks.results import Outcome, percentile
from softprompt.benchmarks.workload import Settings, Workload, task_name
from softprompt.server.core.engine import StepTimings
from softprompt.server.core.model import BaseModel

REGISTRATION_TASK = "bench-fresh"  # (e) registers new versions of this task and times their first request
REGISTRATION_ROUNDS = 10


def engine_config(s: Settings, base: BaseModel, work: Workload, store: Path, *, serve_http: bool = False) -> Any:
    """A server config whose limits admit the whole workload at once; the HTTP API on a free port only with
    `serve_http` (its packages are the server extra's, and a run without (i) must not need them)."""
    from softprompt.server.config import ServerConfig

    longest = max(len(ids) for ids in work.input_ids)
    return ServerConfig(
        port=0, model=s.model, device=s.device, dtype=s.dtype, store=store, max_batch_size=s.batch_size,
        max_queued_requests=max(256, s.requests), max_new_tokens=max(1024, s.new_tokens),
        max_input_tokens=max(2048, longest), max_virtual_tokens=max(256, s.virtual_tokens),
        kv_cache_memory=str(kv_cache_bytes(s, base, longest)), cuda_graphs=s.cuda_graphs,
        packed_linears=s.packed_linears, paged_kernel=s.paged_kernel, mixed_steps=s.mixed_steps,
        fair_share=s.fair_share,
        http_port=0 if serve_http else None,
    )


def kv_cache_bytes(s: Settings, base: BaseModel, longest: int) -> int:
    """A KV pool holding a full batch of the workload's longest rows: every method that builds an App gets
    the same, sized to the workload rather than to the device memory the previous App left free."""
    from softprompt.server.core import kv
    from softprompt.server.core.pool import BLOCK_SIZE, KvPool, LayerShape, blocks_for

    layers = [LayerShape(h, d) for h, d in kv.layer_shapes(base.model)]
    blocks = blocks_for(s.virtual_tokens + longest + s.new_tokens + 1) * min(s.batch_size, s.requests)
    return KvPool.bytes_per_token(layers, base.dtype) * BLOCK_SIZE * (blocks + 2)


def build_bench_app(s: Settings, base: BaseModel, work: Workload, store: Path, *,
                    serve_http: bool = False) -> tuple[Any, StepTimings]:
    """An App on the shared model and prompt store (serving HTTP too with `serve_http`), registering the prompts
    if the store has none yet; returns it with the timings its engine records into."""
    from softprompt.prompts.format.tensor import PromptTensor
    from softprompt.server.app.server import build_app

    app = build_app(engine_config(s, base, work, store, serve_http=serve_http), base=base)
    engine = app.admission.engine
    # Every request runs to max_new_tokens, like HF with min_new_tokens.
    engine.ignore_eos = True
    engine.timings = timings = StepTimings()
    if not app.registry.tasks():
        for task, prompt in enumerate(work.prompts):
            # The dtype-cast values, widened losslessly: the engine serves exactly what HF gets.
            app.registry.register(task_name(task), PromptTensor(embeddings=prompt.float().cpu(), source_type="RAW"),
                                  base.spec)
    return app, timings


def engine_extra(app: Any, timings: StepTimings, before: dict[str, tuple[int, float]], stats0: Any,
                 wall: float) -> dict[str, Any]:
    """The scheduler's steps and the engine's time split for one run."""
    after = timings.snapshot()
    parts = {p: {"calls": after[p][0] - before[p][0], "seconds": after[p][1] - before[p][1]} for p in after}
    stats = app.scheduler.stats
    busy = sum(parts[p]["seconds"] for p in ("prefill", "decode", "mixed", "filter", "concatenate") if p in parts)
    return {
        "engine": parts,
        "outside_engine_s": wall - busy,
        "decode_steps": stats.steps - stats0.steps,
        "prefills": stats.prefills - stats0.prefills,
        "max_batch": stats.max_batch,
    }


class EngineOffline:
    """(d) admission + scheduler in-process: every request submitted at once, one reader thread each.

    (h) is the same with every request on the first task: (d)/(h) is what mixing tasks costs.
    """

    def __init__(self, s: Settings, base: BaseModel, work: Workload, store: Path, *, one_task: bool = False) -> None:
        self.work = replace(work, task_of=[0] * len(work.task_of)) if one_task else work
        self.app, self.timings = build_bench_app(s, base, work, store)
        self.app.scheduler.start()
        self.readers = ThreadPoolExecutor(max_workers=len(work.texts), thread_name_prefix="bench-reader")

    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        from softprompt.prompts.options import DecodingOptions
        from softprompt.server.core.types import GenerationRequest

        before, stats0 = self.timings.snapshot(), copy.copy(self.app.scheduler.stats)
        options = DecodingOptions(max_new_tokens=new_tokens)
        t0 = time.perf_counter()
        futures = []
        for text, task in zip(self.work.texts, self.work.task_of):
            sent = time.perf_counter()
            admitted = self.app.admission.admit(GenerationRequest(task_name(task), text, options))
            handle = self.app.scheduler.submit(admitted)
            futures.append(self.readers.submit(_read_handle, handle, sent))
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        return Outcome([r[0] for r in results], [r[2] for r in results], [r[1] for r in results],
                       engine_extra(self.app, self.timings, before, stats0, wall))

    def close(self) -> None:
        """Stops the scheduler."""
        self.readers.shutdown()
        self.app.scheduler.close(0.0)


def _read_handle(handle: Any, sent: float) -> tuple[list[int], float, float]:
    """Drains a handle: (ids, time to first token, latency), both from `sent`."""
    ids: list[int] = []
    first = None
    for chunk in handle.chunks():
        first = first or time.perf_counter()
        ids.extend(chunk.token_ids)
    return ids, (first or time.perf_counter()) - sent, time.perf_counter() - sent


class Streamed(NamedTuple):
    """One streamed request as its client saw it; `ids` is None where the transport streams text only."""

    ids: list[int] | None
    text: str
    made: int  # tokens generated, as the stream reported them
    ttft: float  # send to first streamed chunk
    latency: float  # send to the stream's end


class _StreamingServer:
    """The real server on 127.0.0.1, one streaming client per thread, each sending its share of the requests one
    after another; subclasses say how a client connects and streams, and whether HTTP is served beside gRPC."""

    serve_http = False

    def __init__(self, s: Settings, base: BaseModel, work: Workload, store: Path) -> None:
        from softprompt.server.app.server import start

        self.work = work
        self.app, self.timings = build_bench_app(s, base, work, store, serve_http=self.serve_http)
        self.server, self.grpc_port, self.health = start(self.app)
        n = max(1, min(s.clients, len(work.texts)))
        self.clients = [self._connect() for _ in range(n)]
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-client")

    def _connect(self) -> Any:
        """One client, used by one thread only; it must have `close()`."""
        raise NotImplementedError

    def _request(self, client: Any, task: str, text: str, new_tokens: int) -> Streamed:
        """Streams one request to its end."""
        raise NotImplementedError

    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        n = len(self.work.texts)
        before, stats0 = self.timings.snapshot(), copy.copy(self.app.scheduler.stats)
        results: list[Streamed | None] = [None] * n
        go = threading.Event()

        def client_loop(c: int) -> None:
            go.wait()
            for i in range(c, n, len(self.clients)):
                task = task_name(self.work.task_of[i])
                results[i] = self._request(self.clients[c], task, self.work.texts[i], new_tokens)

        futures = [self.pool.submit(client_loop, c) for c in range(len(self.clients))]
        t0 = time.perf_counter()
        go.set()
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
        done = [r for r in results if r is not None]  # every slot: a failed request raised above
        ids = [r.ids for r in done if r.ids is not None]
        return Outcome(ids if len(ids) == n else None, [r.latency for r in done], [r.ttft for r in done],
                       engine_extra(self.app, self.timings, before, stats0, wall),
                       texts=[r.text for r in done], counts=[r.made for r in done])

    def close(self) -> None:
        """Closes the clients and drains the server."""
        from softprompt.server.app.server import shutdown

        for client in self.clients:
            client.close()
        self.pool.shutdown()
        shutdown(self.app, self.server, self.health, grace_s=1.0)


class GrpcServer(_StreamingServer):
    """(e) the server's gRPC streams, through our client."""

    def _connect(self) -> Any:
        from softprompt.client import Client

        return Client(f"127.0.0.1:{self.grpc_port}", timeout=3600)

    def _request(self, client: Any, task: str, text: str, new_tokens: int) -> Streamed:
        return _stream_one(client, task, text, new_tokens)

    def probe_registration(self, rounds: int = REGISTRATION_ROUNDS) -> dict[str, float]:
        """Seconds from RegisterPrompt returning to the first streamed token of the next request for that
        version (p50 over `rounds` new versions), and for the same request once the version is warm."""
        client, text = self.clients[0], self.work.texts[0]
        g = torch.Generator().manual_seed(11)
        fresh, warm = [], []
        for _ in range(rounds):
            prompt = self.work.prompts[0].float().cpu()
            info = client.register(REGISTRATION_TASK, prompt + 0.01 * torch.randn(prompt.shape, generator=g))
            version = info.ref
            for times in (fresh, warm):
                t0 = time.perf_counter()
                chunk = next(iter(client.stream(REGISTRATION_TASK, text, max_new_tokens=1)))
                times.append(time.perf_counter() - t0)
                if chunk.prompt_version != version:
                    raise RuntimeError(f"the request after registering {version} was served {chunk.prompt_version}")
        return {"fresh_p50_s": percentile(fresh, 50), "warm_p50_s": percentile(warm, 50), "rounds": rounds}


class GrpcWhileTraining(GrpcServer):
    """(f) as (e), while a server-side training job runs on the same in-memory model.

    The ratio f/e is what a running job costs serving (the server's --train-share bounds it);
    the job's steps during the run show what training still gets.
    """

    def __init__(self, s: Settings, base: BaseModel, work: Workload, store: Path) -> None:
        from softprompt.client import TrainingOptions

        super().__init__(s, base, work, store)
        data = [{"input": text, "target": ("negative", "positive")[i % 2]} for i, text in enumerate(work.texts)]
        options = TrainingOptions(num_virtual_tokens=s.virtual_tokens, epochs=1_000_000, eval_fraction=0.0, patience=0)
        client = self.clients[0]
        self.job_id = client.train("bench-training", data, options=options).job_id
        for job in client.watch_training_job(self.job_id):
            if job.done:
                raise RuntimeError(f"the benchmark's training job ended early: {job.state} {job.error}")
            if job.progress is not None and job.progress.step >= 1:
                break

    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`; adds the training steps the job made during the run."""
        step0, units0 = self._steps(), self.app.scheduler.stats.side_units
        outcome = super().run(new_tokens)
        outcome.extra["training_steps"] = self._steps() - step0
        outcome.extra["training_units"] = self.app.scheduler.stats.side_units - units0
        return outcome

    def _steps(self) -> int:
        progress = self.clients[0].get_training_job(self.job_id).progress
        return 0 if progress is None else progress.step

    def close(self) -> None:
        """Cancels the job, then drains the server."""
        self.clients[0].cancel_training_job(self.job_id)
        self.clients[0].wait_for_training_job(self.job_id, timeout=600)
        super().close()


class HttpStreams(_StreamingServer):
    """(i) the server's OpenAI-compatible API: each client streams `/v1/completions` over HTTP/1.1, a new
    connection per request (uvicorn drops a connection idle for 5 s, as one is between runs; a loopback
    connect is negligible next to a request).

    The client is the standard library's `http.client` rather than httpx or the `openai` package: it needs
    no dependency the server extra lacks, and reads each event with the least Python work (no pydantic
    objects, no async transport under a sync facade), so (i)/(e) measures the servers, not the clients.
    """

    serve_http = True

    def _connect(self) -> Any:
        return http.client.HTTPConnection("127.0.0.1", self.app.http_port, timeout=3600)

    def _request(self, client: Any, task: str, text: str, new_tokens: int) -> Streamed:
        return _stream_http(client, task, text, new_tokens)


def _stream_http(conn: http.client.HTTPConnection, task: str, text: str, new_tokens: int) -> Streamed:
    """One greedy request streamed from `/v1/completions`, its usage asked for in a last event.

    The API streams text, not ids: the usage's completion_tokens is what the server made.
    """
    body = json.dumps({"model": task, "prompt": text, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    parts: list[str] = []
    made: int | None = None
    first: float | None = None
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"/v1/completions answered {response.status}: {response.read()[:500]!r}")
    for line in response:
        if not line.startswith(b"data:"):
            continue  # the blank line ending each event, and keep-alive comments
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"/v1/completions failed mid-stream: {event['error']}")
        if event["choices"]:
            first = first or time.perf_counter()
            parts.append(event["choices"][0]["text"])
        if event.get("usage"):
            made = event["usage"]["completion_tokens"]
    response.read()  # the chunked body's end
    end = time.perf_counter()
    conn.close()  # the next request connects anew
    if made is None:
        raise RuntimeError("/v1/completions ended its stream without the usage event")
    return Streamed(None, "".join(parts), made, (first or end) - sent, end - sent)


def _stream_one(client: Any, task: str, text: str, new_tokens: int) -> Streamed:
    """One request streamed over gRPC."""
    ids: list[int] = []
    parts: list[str] = []
    first = None
    sent = time.perf_counter()
    for chunk in client.stream(task, text, max_new_tokens=new_tokens):
        first = first or time.perf_counter()
        ids.extend(chunk.token_ids)
        parts.append(chunk.text)
    end = time.perf_counter()
    return Streamed(ids, "".join(parts), len(ids), (first or end) - sent, end - sent)
