"""`python -m softprompt.benchmarks.replicas`: `softprompt serve` replicas over one S3 bucket, measured.

Starts a real S3 endpoint (moto's server, a subprocess on a loopback port, dummy credentials) and three
`softprompt serve` subprocesses on a small random-weight Llama (saved to a temporary folder with the
default model's tokenizer): A and B on one bucket (`--store s3://...`, each with its own file cache), F on
a local folder. Then:

  propagation  a new version registered through A (gRPC RegisterPrompt), then streamed through B at once:
               (a) named explicitly, `task@N` (B reads it through on the miss), and (b) by the bare task
               name (B serves the newest version it sees, which it sees within `--store-refresh-s`; B is
               asked every `--poll-ms`, before the registration for a random part of a refresh period
               and after it until it answers with the new version). Each round times
               RegisterPrompt's return to B's first streamed token; `--rounds` rounds of each,
               alternating, then p50 and p99. A first token for a version B already holds is the floor.
  cold read    `--cold` fresh versions written straight into each store (never read by any server),
               each asked once by reference on B (s3://) and on F (folder), alternating: time to first
               token, p50; asked again, the same versions warm.
  throughput   `--clients` concurrent streaming clients, `--requests` greedy requests of `--new-tokens`
               tokens over `--tasks` prompts, against A alone and then split round-robin across A and B
               (the same bucket); tokens/s, `--repeats` alternating runs. On a small CPU both replicas
               share the same cores, so this shows the cost of the split, not a scale-out (report only).

The S3 endpoint is on loopback: a real bucket adds its per-request latency to every store round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.benchmarks.churn import random_llama
from softprompt.benchmarks.results import percentile
from softprompt.benchmarks.workload import build_texts, make_prompts
from softprompt.client import Client
from softprompt.client import errors as client_errors
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry, open_store

# Dummy credentials for the loopback endpoint; no real AWS configuration may reach it (or the servers).
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
BUCKET = "replicas-bench"
START_TIMEOUT_S = 300.0
INPUT = "hello there"
SEED = 0


@dataclass(frozen=True)
class Plan:
    """What the three measurements do."""

    rounds: int = 20
    poll_ms: float = 10.0
    cold: int = 10
    clients: int = 16
    requests: int = 32
    tasks: int = 4
    new_tokens: int = 32
    input_tokens: int = 32
    repeats: int = 2
    virtual_tokens: int = 20
    refresh_s: float = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(ready: Any, process: subprocess.Popen, what: str, log: Path) -> None:
    """Polls `ready()` until it returns without error, failing if `process` exits or the start times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            ready()
            return
        except Exception:  # noqa: BLE001 - not up yet: any error until the deadline
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {START_TIMEOUT_S:.0f} s:\n"
                                   f"{log.read_text()[-4000:]}") from None
            time.sleep(0.2)


@contextmanager
def _process(args: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A subprocess writing to `log`, terminated (then killed) on exit."""
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def s3_endpoint(work: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port with the bucket `BUCKET` created: yields its URL."""
    import boto3

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "moto.log"
    with _process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log) as process:
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        _wait(s3.list_buckets, process, "the S3 endpoint", log)
        s3.create_bucket(Bucket=BUCKET)
        yield url


@contextmanager
def replicas(model_dir: Path, stores: dict[str, str], endpoint: str, work: Path,
             refresh_s: float) -> Iterator[dict[str, str]]:
    """One `softprompt serve` per store, started together: yields name -> address once all answer."""
    with ExitStack() as stack:
        started = {}
        for name, store in stores.items():
            port = _free_port()
            args = [sys.executable, "-m", "softprompt.client.cli", "serve", "--model", str(model_dir),
                    "--device", "cpu", "--port", str(port), "--http-port", "off", "--store", store,
                    "--store-refresh-s", str(refresh_s), "--cache-dir", str(work / f"cache-{name}"),
                    "--batch-wait-ms", "1", "--log-level", "WARNING"]
            if store.startswith("s3://"):
                args += ["--s3-endpoint-url", endpoint]
            log = work / f"serve-{name}.log"
            started[name] = (f"127.0.0.1:{port}", stack.enter_context(_process(args, log)), log)
        for name, (address, process, log) in started.items():
            def ready(address: str = address) -> None:
                with Client(address, timeout=5) as client:
                    client.model_info()

            _wait(ready, process, f"replica {name}", log)
        yield {name: address for name, (address, _, _) in started.items()}


def save_model(folder: Path, hidden: int, layers: int) -> tuple[torch.nn.Module, Any]:
    """Saves a random-weight Llama (churn's `random_llama`) with its tokenizer to `folder`; returns both."""
    base, _ = random_llama(hidden, layers, torch.device("cpu"))
    base.model.save_pretrained(folder)
    base.tokenizer.save_pretrained(folder)
    return base.model, base.tokenizer


def first_token(client: Client, ref: str) -> tuple[float, str]:
    """Streams one token of `ref`: (the monotonic time its first chunk arrived, the version that served it)."""
    stream = client.stream(ref, INPUT, max_new_tokens=1)
    try:
        chunk = next(stream)
        return time.monotonic(), chunk.prompt_version
    finally:
        stream.close()


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    return {"p50_s": percentile(values, 50), "p99_s": percentile(values, 99), "n": len(values)}


def propagation(a: Client, b: Client, prompts: Sequence[torch.Tensor], plan: Plan) -> dict[str, Any]:
    """Registration through A to first token through B, by explicit reference and by bare name."""
    # Each task's first version is served by B before the timed rounds, so B's view of it is warm.
    for task, prompt in (("explicit", prompts[0]), ("newest", prompts[0])):
        a.register(task, prompt)
        first_token(b, f"{task}@1")
    floor = []
    explicit: list[float] = []
    bare: list[float] = []
    polls: list[int] = []
    rng = random.Random(SEED)
    for r in range(plan.rounds):
        prompt = prompts[1 + r]
        started = time.monotonic()
        floor.append(first_token(b, "explicit@1")[0] - started)

        version = a.register("explicit", prompt).version
        registered = time.monotonic()
        at, served = first_token(b, f"explicit@{version}")
        if served != f"explicit@{version}":
            raise RuntimeError(f"B served {served} for explicit@{version}")
        explicit.append(at - registered)

        # B keeps being asked (as a busy replica is) for a random part of a refresh period first, so the
        # registration lands at a random age of B's view, not at one phase of this loop.
        until = time.monotonic() + rng.uniform(0, plan.refresh_s)
        while time.monotonic() < until:
            first_token(b, "newest")
            time.sleep(plan.poll_ms / 1e3)
        version = a.register("newest", prompt).version
        registered = time.monotonic()
        asked = 0
        while True:
            at, served = first_token(b, "newest")
            asked += 1
            if served == f"newest@{version}":
                break
            if at - registered > 30 * max(plan.refresh_s, 1.0):
                raise RuntimeError(f"B still serves {served}, not newest@{version}, after {at - registered:.1f} s")
            time.sleep(plan.poll_ms / 1e3)
        bare.append(at - registered)
        polls.append(asked)
    return {"explicit": _quantiles(explicit), "bare": _quantiles(bare), "held": _quantiles(floor),
            "bare_requests_mean": statistics.mean(polls)}


def cold_reads(b: Client, f: Client, stores: dict[str, Registry], spec: Any,
               prompts: Sequence[torch.Tensor]) -> dict[str, Any]:
    """First and second request for versions written straight into each store, on B (s3://) and F (folder)."""
    for i, prompt in enumerate(prompts):
        for registry in stores.values():
            registry.register(f"cold-{i}", PromptTensor(prompt.float(), "RAW"), spec)
    figures: dict[str, Any] = {}
    for phase in ("cold", "warm"):
        times: dict[str, list[float]] = {"s3": [], "folder": []}
        for i in range(len(prompts)):
            for name, client in (("s3", b), ("folder", f)):
                started = time.monotonic()
                at, served = first_token(client, f"cold-{i}@1")
                if served != f"cold-{i}@1":
                    raise RuntimeError(f"{name} served {served} for cold-{i}@1")
                times[name].append(at - started)
        figures[phase] = {name: _quantiles(t) for name, t in times.items()}
    return figures


def _generate(client: Client, ref: str, text: str, new_tokens: int) -> int:
    """Streams one request to its end: the tokens it made."""
    return sum(len(chunk.token_ids) for chunk in client.stream(ref, text, max_new_tokens=new_tokens))


def drive(clients: Sequence[Client], refs: Sequence[str], texts: Sequence[str], plan: Plan) -> float:
    """Sends request i to `clients[i % len(clients)]`, `plan.clients` at once: tokens/s over the wall time."""
    with ThreadPoolExecutor(plan.clients) as pool:
        started = time.perf_counter()
        made = pool.map(lambda i: _generate(clients[i % len(clients)], refs[i % len(refs)], texts[i],
                                            plan.new_tokens), range(len(texts)))
        tokens = sum(made)
        return tokens / (time.perf_counter() - started)


def throughput(a: Client, b: Client, texts: Sequence[str], plan: Plan) -> dict[str, Any]:
    """Tokens/s of one replica against two (round-robin) over the cold-read prompts, alternating runs."""
    refs = [f"cold-{t}@1" for t in range(plan.tasks)]
    for client in (a, b):  # each replica reads and caches every prompt before the timed runs
        for ref in refs:
            first_token(client, ref)
    setups = {"one replica": [a], "two replicas": [a, b]}
    rates: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(plan.repeats):
        for name, clients in setups.items():
            rates[name].append(drive(clients, refs, texts, plan))
    figures: dict[str, Any] = {name: {"median_tok_s": statistics.median(r), "runs_tok_s": r}
                               for name, r in rates.items()}
    figures["ratio"] = figures["two replicas"]["median_tok_s"] / figures["one replica"]["median_tok_s"]
    return figures


def measure(plan: Plan, hidden: int, layers: int) -> dict[str, Any]:
    """Sets up the endpoint, the model and three replicas; runs the three measurements."""
    with tempfile.TemporaryDirectory(prefix="softprompt-replicas-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model, tokenizer = save_model(work / "model", hidden, layers)
        from softprompt.prompts.base import spec_of

        spec = spec_of(model, str(work / "model"))
        prompts = make_prompts(model, plan.rounds + 1 + plan.cold, plan.virtual_tokens, torch.float32)
        texts = build_texts(tokenizer, plan.requests, plan.input_tokens, None)
        del model
        endpoint = stack.enter_context(s3_endpoint(work))
        s3_url = f"s3://{BUCKET}/prompts"
        started = time.monotonic()
        up = stack.enter_context(replicas(work / "model", {"A": s3_url, "B": s3_url, "F": str(work / "folder")},
                                          endpoint, work, plan.refresh_s))
        start_s = time.monotonic() - started
        a, b, f = (stack.enter_context(Client(up[name], timeout=120)) for name in ("A", "B", "F"))
        os.environ.update(S3_ENV)  # the benchmark's own writes to the bucket use the same dummy credentials
        stores = {"s3": Registry(store=open_store(s3_url, endpoint_url=endpoint, cache_dir=work / "cache-bench")),
                  "folder": Registry(root=work / "folder")}
        return {
            "replicas_start_s": start_s,
            "propagation": propagation(a, b, prompts[:plan.rounds + 1], plan),
            "cold_read": cold_reads(b, f, stores, spec, prompts[plan.rounds + 1:]),
            "throughput": throughput(a, b, texts, plan),
        }


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    p = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Plan()
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"propagation rounds of each kind (default: {d.rounds})")
    p.add_argument("--poll-ms", type=float, default=d.poll_ms,
                   help=f"pause between B's requests by bare name (default: {d.poll_ms:g})")
    p.add_argument("--cold", type=int, default=d.cold, help=f"fresh versions per store (default: {d.cold})")
    p.add_argument("--clients", type=int, default=d.clients, help=f"concurrent streams (default: {d.clients})")
    p.add_argument("--requests", type=int, default=d.requests, help=f"requests per throughput run (default: {d.requests})")
    p.add_argument("--tasks", type=int, default=d.tasks, help=f"prompts in the throughput runs (default: {d.tasks})")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help=f"tokens per request (default: {d.new_tokens})")
    p.add_argument("--input-tokens", type=int, default=d.input_tokens, help=f"input length (default: {d.input_tokens})")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"alternating throughput runs (default: {d.repeats})")
    p.add_argument("--virtual-tokens", type=int, default=d.virtual_tokens,
                   help=f"soft-prompt length (default: {d.virtual_tokens})")
    p.add_argument("--refresh-s", type=float, default=d.refresh_s,
                   help=f"the replicas' --store-refresh-s (default: {d.refresh_s:g})")
    p.add_argument("--hidden", type=int, default=192, help="random model's hidden size, a multiple of 192 (default: 192)")
    p.add_argument("--layers", type=int, default=2, help="random model's layers (default: 2)")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def _ms(q: dict[str, float]) -> str:
    return f"p50 {q['p50_s'] * 1e3:7.1f} ms  p99 {q['p99_s'] * 1e3:7.1f} ms"


def report(figures: dict[str, Any], plan: Plan) -> None:
    """Prints the figures."""
    p, c, t = figures["propagation"], figures["cold_read"], figures["throughput"]
    print(f"replicas A, B on one bucket (moto on loopback), F on a folder; --store-refresh-s {plan.refresh_s:g}; "
          f"started in {figures['replicas_start_s']:.1f} s")
    load = figures["loadavg"]
    print(f"1-min load average {load['before']} before, {load['after']} after, on {os.cpu_count()} cores "
          f"(above ~1 before: other work shares the machine)")
    print(f"registered through A -> first token through B ({plan.rounds} rounds each):")
    print(f"  task@N (read through)       {_ms(p['explicit'])}")
    print(f"  bare task (newest, polled)  {_ms(p['bare'])}  ({p['bare_requests_mean']:.1f} requests per round)")
    print(f"  held version (floor)        {_ms(p['held'])}")
    print(f"first request for a version no server read ({plan.cold} versions), time to first token:")
    for phase in ("cold", "warm"):
        print(f"  {phase}: s3:// {c[phase]['s3']['p50_s'] * 1e3:7.1f} ms  folder {c[phase]['folder']['p50_s'] * 1e3:7.1f} ms"
              f"  (p50)")
    print(f"throughput, {plan.clients} streaming clients, {plan.requests} x {plan.new_tokens} new tokens, "
          f"{plan.tasks} tasks ({plan.repeats} alternating runs, median):")
    for name in ("one replica", "two replicas"):
        runs = ", ".join(f"{r:.1f}" for r in t[name]["runs_tok_s"])
        print(f"  {name:<13} {t[name]['median_tok_s']:7.1f} tok/s  ({runs})")
    print(f"  two / one     {t['ratio']:.2f}x (both replicas share this machine's {os.cpu_count()} cores)")


def _loadavg() -> float | None:
    """The 1-minute load average (None where /proc/loadavg is missing): other work on a shared machine."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the three measurements and prints them; with --json, writes them too."""
    parser = build_parser()
    a = parser.parse_args(argv)
    plan = Plan(rounds=a.rounds, poll_ms=a.poll_ms, cold=a.cold, clients=a.clients, requests=a.requests,
                tasks=a.tasks, new_tokens=a.new_tokens, input_tokens=a.input_tokens, repeats=a.repeats,
                virtual_tokens=a.virtual_tokens, refresh_s=a.refresh_s)
    for name in ("rounds", "cold", "clients", "requests", "tasks", "new_tokens", "repeats", "virtual_tokens"):
        if getattr(plan, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(plan, name)}")
    if plan.tasks > plan.cold:
        parser.error(f"--tasks ({plan.tasks}) must not exceed --cold ({plan.cold}): the throughput runs use those")
    if plan.refresh_s < 0 or plan.poll_ms < 0:
        parser.error("--refresh-s and --poll-ms must be >= 0")
    loadavg_before = _loadavg()
    try:
        figures = measure(plan, a.hidden, a.layers)
    except (RuntimeError, ValueError, client_errors.SoftpromptError) as e:
        print(f"replicas benchmark: {e}", file=sys.stderr)
        return 1
    figures["plan"] = plan.__dict__
    figures["loadavg"] = {"before": loadavg_before, "after": _loadavg()}
    report(figures, plan)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
