"""`python -m softprompt.benchmarks.many_tasks`: a registry of many tasks, as a new user would build and serve it.

Starts `softprompt serve` (a subprocess: the default model, a local folder store, `--python` picks the
interpreter, so an older build can be measured the same way) and then, as issue 22 describes:

  registration  `--threads` client threads register `--tasks` random prompts of 8-20 virtual tokens over gRPC
                (raw [n, hidden] tensors); the rate of every `--window` registrations is printed, and the first
                and last windows compared (the store's size must not slow a registration). `--fill direct`
                writes the windows in between straight into the folder through `Registry` in this process,
                bypassing the server (for builds whose gRPC registration would take hours); the first and
                last windows are always registered over gRPC.
  listing       every version through ListPrompts (the client's default page size, as `softprompt list`
                pages, and pages of 1,000), one page, and `GET /v1/models` (every id, and one page where the
                server pages it).
  restart       the server stopped and started again on the full store: seconds until ModelInfo answers,
                against the start on an empty store; then the seconds until the host tier of prompt
                embeddings is loaded (servers that report it).
  first tokens  `--clients` concurrent streaming clients, `--new-tokens` tokens each: warm phases ask the
                `--warm` tasks already served once, cold phases tasks never served since the restart (each
                request a different one); `--rounds` alternating rounds of `--per-client` requests per client,
                then p50 and p99 of the time to first token of each kind.
  memory        the server's RSS after the restart and after serving (with the distinct tasks served).
  outputs       `--check` tasks (half warm, half never served) generated greedily and compared with the
                base model's full forward over [prompt ; input] without a KV cache, in this process.

Prints the issue's table; `--json-out` saves the figures, and `--before FILE` prints them beside a saved
run (e.g. the old build's) as "before" and "after"; `--after FILE` prints a saved run instead of running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from softprompt.benchmarks.results import percentile
from softprompt.benchmarks.workload import build_texts
from softprompt.client import Client

START_TIMEOUT_S = 600.0
SEED = 22


@dataclass(frozen=True)
class Plan:
    """What the run does (the flags, parsed)."""

    tasks: int = 10_000
    window: int = 1_000
    threads: int = 4
    fill: str = "grpc"  # or "direct"
    clients: int = 16
    new_tokens: int = 4
    input_tokens: int = 32
    warm: int = 32
    per_client: int = 8
    rounds: int = 2
    check: int = 12
    python: str = sys.executable
    serve_args: tuple[str, ...] = ()
    work: Path | None = None


@dataclass
class Figures:
    """What a run measured; every field is one row (or part of a row) of the table."""

    build: str = ""
    tasks: int = 0
    windows: list[tuple[int, float]] = field(default_factory=list)  # (tasks registered after it, registrations/s)
    register_s: float = 0.0  # all registrations, over gRPC or (middle windows) direct
    direct_windows: list[int] = field(default_factory=list)  # windows written in this process, not over gRPC
    start_empty_s: float = 0.0
    start_full_s: float = 0.0
    host_tier_load_s: float | None = None
    prefix_warm_s: float | None = None  # until the prefix tier reported nothing pending (idle-time warming)
    prefix_warmed: int = 0  # prefixes it then held
    list_default_s: float = 0.0
    list_1000_s: float = 0.0
    list_page_s: float = 0.0
    listed: int = 0
    models_s: float = 0.0
    models_page_s: float | None = None
    models: int = 0
    ttft_warm: list[float] = field(default_factory=list)
    ttft_cold: list[float] = field(default_factory=list)
    rss_ready_mib: float = 0.0
    rss_served_mib: float = 0.0
    served_tasks: int = 0
    outputs_exact: int = 0
    outputs_checked: int = 0
    model_info: dict[str, Any] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    load_average: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- the server process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running `softprompt serve`: its process, gRPC address and HTTP base URL."""

    process: subprocess.Popen
    address: str
    http: str
    log: Path

    def rss_mib(self) -> float:
        """The process's resident memory now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0


@contextmanager
def serving(plan: Plan, store: Path, log: Path) -> Iterator[tuple[Server, float]]:
    """`softprompt serve` on `store`: yields it and the seconds until ModelInfo answered; stops it on exit."""
    port, http_port = _free_port(), _free_port()
    args = [plan.python, "-m", "softprompt.client.cli", "serve", "--device", "cpu", "--port", str(port),
            "--http-port", str(http_port), "--store", str(store), "--log-level", "WARNING", *plan.serve_args]
    started = time.monotonic()
    with log.open("a") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", log)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with Client(server.address, timeout=5) as client:
                    client.model_info()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() - started > START_TIMEOUT_S:
                    raise RuntimeError(f"the server did not answer in {START_TIMEOUT_S:.0f} s") from None
                time.sleep(0.05)
        yield server, time.monotonic() - started
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- prompts


class Prompts:
    """Task i's prompt: 8-20 random rows with the embedding matrix's mean row norm, from seed i (so this
    process can rebuild any task's prompt for the reference)."""

    def __init__(self, hidden: int, norm: float) -> None:
        self.hidden = hidden
        self.norm = norm

    @staticmethod
    def name(i: int) -> str:
        """Task i's registry name."""
        return f"task-{i:06d}"

    def tensor(self, i: int) -> np.ndarray:
        """Task i's [n, hidden] float32 prompt."""
        rng = np.random.default_rng(SEED * 1_000_003 + i)
        rows = rng.standard_normal((int(rng.integers(8, 21)), self.hidden), dtype=np.float32)
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True) * self.norm).astype(np.float32)


def register_over_grpc(address: str, prompts: Prompts, first: int, count: int, threads: int) -> float:
    """Registers tasks first..first+count-1 with `threads` clients; returns registrations/s."""
    clients = [Client(address, timeout=120) for _ in range(threads)]
    lock = threading.Lock()
    todo = iter(range(first, first + count))

    def work(client: Client) -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            client.register(prompts.name(i), prompts.tensor(i))

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, clients))
    finally:
        for c in clients:
            c.close()
    return count / (time.perf_counter() - started)


DIRECT_THREADS = 8  # a registration mostly waits on fsync: threads overlap the waits


def register_direct(store: Path, prompts: Prompts, first: int, count: int, spec: Any) -> float:
    """Writes tasks first..first+count-1 straight into the folder (no server), from `DIRECT_THREADS` threads;
    returns registrations/s."""
    import torch

    from softprompt.prompts.format.tensor import PromptTensor
    from softprompt.prompts.registry.local import LocalStore
    from softprompt.prompts.registry.registry import Registry

    registry = Registry(store=LocalStore(store))

    def one(i: int) -> None:
        registry.register(prompts.name(i), PromptTensor(torch.from_numpy(prompts.tensor(i)), "RAW"), spec)

    started = time.perf_counter()
    with ThreadPoolExecutor(DIRECT_THREADS) as pool:
        list(pool.map(one, range(first, first + count)))
    return count / (time.perf_counter() - started)


# ---------------------------------------------------------------- listing


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def measure_listing(server: Server, figures: Figures) -> None:
    """ListPrompts (every version at two page sizes, and one page) and GET /v1/models (every id, one page)."""
    with Client(server.address, timeout=600) as client:
        figures.list_default_s, listed = _timed(lambda: client.list_prompts())
        figures.list_1000_s, _ = _timed(lambda: client.list_prompts(page_size=1000))
        figures.list_page_s, _ = _timed(lambda: next(iter(client.iter_prompts())))
    figures.listed = len(listed)

    def get(path: str) -> dict[str, Any]:
        with urllib.request.urlopen(server.http + path, timeout=600) as response:
            return json.loads(response.read())

    figures.models_s, body = _timed(lambda: get("/v1/models"))
    figures.models = len(body["data"])
    seconds, page = _timed(lambda: get("/v1/models?limit=100"))
    # A server that does not page answers every id again: no page figure.
    figures.models_page_s = seconds if len(page["data"]) <= 100 else None


# ---------------------------------------------------------------- first tokens


def first_token_s(client: Client, task: str, text: str, new_tokens: int) -> float:
    """Seconds from sending a streamed request to its first chunk (the rest is read to the end)."""
    started = time.perf_counter()
    stream = client.stream(task, text, max_new_tokens=new_tokens)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter() - started
    assert first is not None
    return first


def measure_ttft(server: Server, plan: Plan, prompts: Prompts, texts: list[str], warm: list[int],
                 cold: Iterator[int], figures: Figures) -> None:
    """Alternating warm and cold phases of `plan.clients` concurrent streaming clients."""
    clients = [Client(server.address, timeout=300) for _ in range(plan.clients)]
    lock = threading.Lock()
    try:
        for i in warm:  # served once, so they are warm
            first_token_s(clients[0], prompts.name(i), texts[0], plan.new_tokens)
        for _ in range(plan.rounds):
            for kind in ("warm", "cold"):
                def run(c: int, kind: str = kind) -> list[float]:
                    out = []
                    for j in range(plan.per_client):
                        if kind == "warm":
                            task = warm[(c * plan.per_client + j) % len(warm)]
                        else:
                            with lock:
                                task = next(cold)
                        text = texts[(c * plan.per_client + j) % len(texts)]
                        out.append(first_token_s(clients[c], prompts.name(task), text, plan.new_tokens))
                    return out

                with ThreadPoolExecutor(plan.clients) as pool:
                    results = [t for ts in pool.map(run, range(plan.clients)) for t in ts]
                (figures.ttft_warm if kind == "warm" else figures.ttft_cold).extend(results)
    finally:
        for c in clients:
            c.close()


# ---------------------------------------------------------------- outputs


def check_outputs(server: Server, base: Any, prompts: Prompts, tasks: list[int], text: str, new_tokens: int) -> int:
    """How many of `tasks` generate exactly what the full forward without a KV cache does (greedy)."""
    import torch

    from softprompt.prompts.tokens import eos_token_ids

    eos = set(eos_token_ids(base.model, base.tokenizer))
    exact = 0
    with Client(server.address, timeout=300) as client:
        ids = list(client.tokenize(text).token_ids)
        for i in tasks:
            got = client.generate(prompts.name(i), text, max_new_tokens=new_tokens).token_ids
            prompt = torch.from_numpy(prompts.tensor(i))
            embed = base.model.get_input_embeddings()
            want: list[int] = []
            with torch.no_grad():
                for _ in range(new_tokens):
                    x = torch.cat([prompt[None], embed(torch.tensor([ids + want]))], dim=1)
                    token = int(base.model(inputs_embeds=x, use_cache=False).logits[0, -1].argmax())
                    want.append(token)
                    if token in eos:
                        break
            exact += list(got) == want
    return exact


# ---------------------------------------------------------------- the run


def tier_ready(server: Server, name: str, timeout_s: float = 3600.0) -> float | None:
    """Seconds until the server reports nothing pending in a tier of prompt memory ("host": its background load;
    "prefix": its idle-time warming), None if it reports no such tier."""
    started = time.perf_counter()
    with Client(server.address, timeout=30) as client:
        while True:
            info = client.model_info()
            tiers = {t.name: t for t in getattr(info, "caches", ()) or ()}
            tier = tiers.get(name)
            if tier is None:
                return None
            if tier.pending == 0:
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout_s:
                raise RuntimeError(f"the {name} tier still had {tier.pending} versions pending after {timeout_s:.0f} s")
            time.sleep(0.5)


def model_info_dict(server: Server) -> dict[str, Any]:
    """ModelInfo's cache tiers, as plain data."""
    with Client(server.address, timeout=30) as client:
        info = client.model_info()
    return {t.name: dataclasses.asdict(t) for t in getattr(info, "caches", ()) or ()}


def run(plan: Plan, base: Any) -> Figures:
    """The whole run; see the module docstring."""
    figures = Figures(build=plan.python, tasks=plan.tasks)
    weight = base.model.get_input_embeddings().weight.detach().float()
    prompts = Prompts(int(weight.shape[1]), float(weight.norm(dim=-1).mean()))
    texts = build_texts(base.tokenizer, 64, plan.input_tokens, None)
    work = Path(tempfile.mkdtemp(prefix="many-tasks-", dir=plan.work))
    store, log = work / "store", work / "serve.log"
    print(f"store {store}, server log {log}", flush=True)
    began = time.perf_counter()

    # Registration, from an empty store.
    with serving(plan, store, log) as (server, figures.start_empty_s):
        print(f"started on an empty store in {figures.start_empty_s:.1f} s", flush=True)
        windows = max(1, (plan.tasks + plan.window - 1) // plan.window)
        for w in range(windows):
            first, count = w * plan.window, min(plan.window, plan.tasks - w * plan.window)
            direct = plan.fill == "direct" and 0 < w < windows - 1
            if direct:
                rate = register_direct(store, prompts, first, count, base.spec)
                figures.direct_windows.append(w)
            else:
                rate = register_over_grpc(server.address, prompts, first, count, plan.threads)
            figures.windows.append((first + count, rate))
            print(f"  tasks {first:>7,}-{first + count - 1:>7,}: {rate:6.1f} registrations/s"
                  f"{' (direct, no server)' if direct else ''}  [{time.perf_counter() - began:.0f} s]", flush=True)
        figures.register_s = time.perf_counter() - began
        figures.phase_s["register"] = figures.register_s
        started = time.perf_counter()
        measure_listing(server, figures)
        figures.phase_s["listing"] = time.perf_counter() - started
        print(f"listed {figures.listed:,} versions in {figures.list_default_s:.2f} s; /v1/models "
              f"{figures.models:,} ids in {figures.models_s:.2f} s", flush=True)

    # Restart on the full store, then first tokens, memory and outputs.
    with serving(plan, store, log) as (server, figures.start_full_s):
        print(f"restarted on {plan.tasks:,} tasks in {figures.start_full_s:.1f} s", flush=True)
        figures.host_tier_load_s = tier_ready(server, "host")
        if figures.host_tier_load_s is not None:
            print(f"host tier loaded in {figures.host_tier_load_s:.1f} s", flush=True)
        warmed = tier_ready(server, "prefix")  # builds without warming report none pending at once
        if warmed is not None:
            figures.prefix_warm_s = (figures.host_tier_load_s or 0.0) + warmed
            prefix = model_info_dict(server).get("prefix", {})
            figures.prefix_warmed = int(prefix.get("entries", 0))
            print(f"prefix KV of {figures.prefix_warmed:,} versions warmed {figures.prefix_warm_s:.1f} s after the "
                  f"start ({prefix.get('bytes', 0) / (1 << 20):.0f} of {prefix.get('capacity_bytes', 0) / (1 << 20):.0f}"
                  " MiB)", flush=True)
        figures.rss_ready_mib = server.rss_mib()
        rng = random.Random(SEED)
        order = rng.sample(range(plan.tasks), min(plan.tasks, plan.warm + plan.check
                                                   + plan.clients * plan.per_client * plan.rounds + 1))
        warm, rest = order[:plan.warm], order[plan.warm:]
        checked_cold, cold = rest[:plan.check - plan.check // 2], iter(rest[plan.check - plan.check // 2:])
        started = time.perf_counter()
        measure_ttft(server, plan, prompts, texts, warm, cold, figures)
        figures.phase_s["first_tokens"] = time.perf_counter() - started
        figures.served_tasks = len(warm) + len(figures.ttft_cold)
        figures.rss_served_mib = server.rss_mib()
        started = time.perf_counter()
        checked = warm[:plan.check // 2] + checked_cold
        figures.outputs_exact = check_outputs(server, base, prompts, checked, texts[1], 8)
        figures.outputs_checked = len(checked)
        figures.phase_s["outputs"] = time.perf_counter() - started
        figures.model_info = model_info_dict(server)
    figures.phase_s["total"] = time.perf_counter() - began
    figures.load_average = list(os.getloadavg())
    return figures


# ---------------------------------------------------------------- the table


def _rate_rows(f: Figures) -> dict[str, str]:
    grpc = [(n, r) for k, (n, r) in enumerate(f.windows) if k not in f.direct_windows]
    first, last = grpc[0][1], grpc[-1][1]
    rows = {
        "registrations/s, first window": f"{first:.1f}/s",
        "registrations/s, last window": f"{last:.1f}/s ({last / first:.2f}x the first)",
    }
    if len(grpc) > 2:
        middle = [r for _, r in grpc[1:-1]]
        rows["registrations/s, windows between (min / median)"] = f"{min(middle):.1f} / {statistics.median(middle):.1f}/s"
    how = " (middle windows direct)" if f.direct_windows else ""
    rows[f"{f.tasks:,} registrations"] = f"{f.register_s / 60:.1f} min{how}"
    return rows


def table(f: Figures) -> dict[str, str]:
    """The issue's rows for one run."""
    warm, cold = f.ttft_warm, f.ttft_cold
    w50, w99, c50, c99 = (percentile(warm, 50), percentile(warm, 99), percentile(cold, 50), percentile(cold, 99))
    rows = _rate_rows(f)
    rows.update({
        f"restart on {f.tasks:,} tasks vs an empty store": f"{f.start_full_s:.1f} s vs {f.start_empty_s:.1f} s",
        "host tier loaded after the restart": "-" if f.host_tier_load_s is None else f"{f.host_tier_load_s:.1f} s",
        "prefix KV warmed after the restart":
            "-" if not f.prefix_warmed else f"{f.prefix_warmed:,} versions in {f.prefix_warm_s or 0.0:.1f} s",
        f"ListPrompts, all {f.listed:,} (default pages / pages of 1,000 / one page)":
            f"{f.list_default_s:.2f} s / {f.list_1000_s:.2f} s / {f.list_page_s * 1000:.0f} ms",
        f"GET /v1/models ({f.models:,} ids) / one page of 100":
            f"{f.models_s:.2f} s / " + ("-" if f.models_page_s is None else f"{f.models_page_s * 1000:.0f} ms"),
        "TTFT warm task p50 / p99": f"{w50 * 1000:.0f} / {w99 * 1000:.0f} ms",
        "TTFT task never served p50 / p99":
            f"{c50 * 1000:.0f} / {c99 * 1000:.0f} ms ({c50 / w50:.2f}x / {c99 / w99:.2f}x warm)",
        "server RSS after the restart / after serving": f"{f.rss_ready_mib:,.0f} / {f.rss_served_mib:,.0f} MiB "
                                                        f"({f.served_tasks} distinct tasks served)",
        "outputs vs no-cache reference": f"{f.outputs_exact}/{f.outputs_checked}",
    })
    host = f.model_info.get("host")
    if host:  # servers with a host tier of prompt embeddings
        rows["host tier: versions held, memory per version, budget"] = _host_row(host, f.tasks)
    return rows


def _host_row(host: dict[str, Any], tasks: int) -> str:
    """What the host tier holds, what one version costs there, and how many versions its budget holds (where a
    larger registry spills to the store, read at first request)."""
    entries, size, budget = host["entries"], host["bytes"], host["capacity_bytes"]
    each = size / entries if entries else 0.0
    fits = int(budget // each) if each else 0
    spill = "all held" if entries >= tasks and not host["evictions"] else f"{host['evictions']:,} evicted"
    return (f"{entries:,} versions, {size / (1 << 20):,.0f} MiB ({each / 1024:.1f} KiB each) of "
            f"{budget / (1 << 20):,.0f} MiB: holds ~{fits:,} versions; {spill}")


def print_table(after: Figures, before: Figures | None) -> None:
    """The rows, beside a saved run's when given."""
    rows = table(after)
    if before is None:
        print("\n| measure | figure |\n|---|---|")
        for k, v in rows.items():
            print(f"| {k} | {v} |")
        return
    old = table(before)
    print("\n| measure | before | after |\n|---|---|---|")
    for k, v in rows.items():
        # Rows are matched by name, or (a name holding a count that differs, e.g. versions listed) by place.
        o = old.get(k) or next((ov for ok, ov in zip(old, old.values()) if _shape(ok) == _shape(k)), "-")
        print(f"| {k} | {o} | {v} |")


def _shape(row: str) -> str:
    """A row's name without its numbers."""
    return "".join(c for c in row if not (c.isdigit() or c == ","))


def main(argv: list[str] | None = None) -> int:
    """Parses flags, runs, prints the table."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.many_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Plan()
    parser.add_argument("--tasks", type=int, default=d.tasks, help="tasks to register (default: %(default)s)")
    parser.add_argument("--window", type=int, default=d.window, help="registrations per measured window")
    parser.add_argument("--threads", type=int, default=d.threads, help="client threads registering")
    parser.add_argument("--fill", choices=["grpc", "direct"], default=d.fill,
                        help="how windows between the first and the last are registered")
    parser.add_argument("--clients", type=int, default=d.clients, help="concurrent streaming clients")
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens)
    parser.add_argument("--input-tokens", type=int, default=d.input_tokens)
    parser.add_argument("--warm", type=int, default=d.warm, help="tasks served before the warm phases")
    parser.add_argument("--per-client", type=int, default=d.per_client, help="requests per client per phase")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="warm/cold phase pairs")
    parser.add_argument("--check", type=int, default=d.check, help="tasks compared with the reference")
    parser.add_argument("--python", default=d.python, help="the server's interpreter (another build's venv)")
    parser.add_argument("--serve-arg", action="append", default=[], help="an extra `softprompt serve` argument")
    parser.add_argument("--work", type=Path, default=None, help="where the store and log go (default: /tmp)")
    parser.add_argument("--json-out", type=Path, default=None, help="save the figures here")
    parser.add_argument("--before", type=Path, default=None, help="a saved run to print as 'before'")
    parser.add_argument("--after", type=Path, default=None,
                        help="a saved run to print as 'after' instead of running (with --before: both columns)")
    args = parser.parse_args(argv)
    before = None if args.before is None else Figures(**json.loads(args.before.read_text()))
    if args.after is not None:
        print_table(Figures(**json.loads(args.after.read_text())), before)
        return 0
    plan = Plan(tasks=args.tasks, window=args.window, threads=args.threads, fill=args.fill, clients=args.clients,
                new_tokens=args.new_tokens, input_tokens=args.input_tokens, warm=args.warm,
                per_client=args.per_client, rounds=args.rounds, check=args.check, python=args.python,
                serve_args=tuple(args.serve_arg), work=args.work)
    from softprompt.server.app.loading import load_base_model

    base = load_base_model(None, device="cpu")
    print(f"load average before: {os.getloadavg()}", flush=True)
    figures = run(plan, base)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(dataclasses.asdict(figures), indent=1))
    print_table(figures, before)
    print(f"\nphases (s): {', '.join(f'{k} {v:.0f}' for k, v in figures.phase_s.items())}; "
          f"load average after: {figures.load_average}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
