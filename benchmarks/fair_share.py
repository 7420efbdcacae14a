"""`python -m softprompt.benchmarks.fair_share`: many tasks on one server, measured against issue 20's targets.

Starts the server in-process on a free loopback port (as `softprompt serve` builds it, `--max-batch-size`
16 by default) over the default model (or a random-weight Llama shaped like it, `--hidden`, for a quick
run), registers random soft prompts, and drives it with asyncio gRPC streaming clients. The engine runs
with `ignore_eos`, so every request makes exactly the tokens it asks for. Scenarios (`--scenario`):

  flood    Task A sends `--flood` requests at once (`--flood-new` new tokens each); `--gap` seconds later
           task B sends a `--b-new`-token request, then another as each returns (`--b-requests`). The
           reference: B beside a full batch and no backlog (A keeps `--max-batch-size` - 1 requests running,
           one sent as each returns). Run once per `--modes` entry: `off` (arrival order, as before issue
           20), `fair` (fair share with preemption, the default) and `fair-nopreempt` (fair admission only,
           --no-fair-preemption). Targets: B's mean latency <= 1.5x the reference, B's TTFT p99 <= 2x, A's
           whole flood within 1.1x of `off`.
  weights  Two tasks with weights 1 and 3 (a --task-policy file), each kept backlogged (2 x batch requests
           outstanding each) for `--seconds`: served tokens (input + output) and VTC's weighted service
           (input x1, output x2) over that time, from the server's per-task counters. Target: within 10 %
           of 1:3.
  many     `--tasks` tasks each sending at its fair rate (Poisson arrivals, seeded, together `--load` of the
           server's measured capacity, or of `--capacity`) for `--many-seconds`, first alone, then while one more
           task floods (keeps 4 x batch requests outstanding), the clients in a process of their own. Per task: p99
           latency with the flood over without (the same seeded arrivals in both; at the default length each
           task's p99 is over ~10 requests, at 60 s over ~3). Also each phase's mean forward: its wall time, the
           rows it decodes and the prefill positions it computes. Target: none above 2x.
  rate     A task limited to `--rate` tokens/s (burst one second's worth): requests sent within the rate all
           succeed; then twice the bucket's worth sent at once: those beyond the bucket are refused with
           RESOURCE_EXHAUSTED and a retry delay, the rest succeed.

Prints each scenario's figures and whether its target was met; `--json-out` saves them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.benchmarks.workload import build_texts, make_prompts
from softprompt.client import AsyncClient, ResourceExhaustedError
from softprompt.server.app.server import build_app, shutdown, start
from softprompt.server.config import ServerConfig
from softprompt.server.core.engine import StepTimings
from softprompt.server.core.fairness import INPUT_COST, OUTPUT_COST
from softprompt.server.core.model import BaseModel

SCENARIOS = ("flood", "weights", "many", "rate")
MODES = {  # name: (--fair-share, --fair-preemption)
    "off": ("off", False),
    "fair": ("task", True),
    "fair-nopreempt": ("task", False),
}
INPUT_TOKENS = 16
QUEUE = 100_000  # --max-queued-requests: the server's own queue limit is not what is measured
VIRTUAL_TOKENS = 8


@dataclass(frozen=True)
class Plan:
    """The bench's flags."""

    batch: int = 16
    flood: int = 300
    flood_new: int = 64
    b_new: int = 16
    b_requests: int = 6
    gap: float = 1.0
    modes: tuple[str, ...] = ("off", "fair", "fair-nopreempt")
    seconds: float = 60.0
    many_seconds: float = 180.0
    tasks: int = 100
    load: float = 0.5
    rate: float = 200.0
    wait: float = 0.0  # --fair-preemption-wait of the fair modes
    capacity: float = 0.0  # requests/s the many scenario's load is a fraction of (0: measured first)


@dataclass
class Timing:
    """One request as its client saw it."""

    sent: float
    first: float | None = None
    done: float | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return (self.done or math.nan) - self.sent

    @property
    def ttft(self) -> float:
        return (self.first or math.nan) - self.sent


@dataclass
class Results:
    """Every scenario's figures, as printed."""

    config: dict[str, Any] = field(default_factory=dict)
    flood: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    many: dict[str, Any] = field(default_factory=dict)
    rate: dict[str, Any] = field(default_factory=dict)


class Server:
    """An in-process server over `base` with these settings; `async with` gives a connected client."""

    def __init__(self, base: BaseModel, store: Path, **settings: Any) -> None:
        config = ServerConfig(port=0, http_port=None, store=store, **settings)
        self.app = build_app(config, base=base)
        self.app.scheduler.engine.ignore_eos = True  # every request makes exactly what it asks for
        self._server, port, self._health = start(self.app)
        self.target = f"127.0.0.1:{port}"

    def close(self) -> None:
        shutdown(self.app, self._server, self._health, grace_s=1.0)

    def served(self) -> dict[str, tuple[int, int]]:
        """Each task's (input, output) tokens computed since start."""
        return {t.task: (t.input_tokens, t.output_tokens) for t in self.app.scheduler.task_loads(everything=True)}


async def _one(client: AsyncClient, task: str, text: str, new: int, into: list[Timing] | None = None,
               sent: float | None = None) -> Timing:
    """Streams one request; its timing (an error is recorded, not raised)."""
    timing = Timing(time.perf_counter() if sent is None else sent)
    if into is not None:
        into.append(timing)
    try:
        async for _ in client.stream(task, text, max_new_tokens=new):
            if timing.first is None:
                timing.first = time.perf_counter()
        timing.done = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        timing.error = f"{type(e).__name__}: {e}"
    return timing


async def _register(client: AsyncClient, names: Sequence[str], prompts: Sequence[torch.Tensor]) -> None:
    for name, prompt in zip(names, prompts):
        await client.register(name, prompt)


def _p(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else math.nan


def _mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---------------------------------------------------------------- flood


async def _flood_run(server: Server, texts: list[str], plan: Plan, *, backlog: bool) -> dict[str, Any]:
    """A's flood (or, without `backlog`, A keeping batch - 1 rows busy) and B's sequential requests."""
    async with AsyncClient(server.target, timeout=3600.0) as client:
        a_timings: list[Timing] = []
        stop = asyncio.Event()

        async def keep_busy(i: int) -> None:
            while not stop.is_set():
                await _one(client, "task-a", texts[i % len(texts)], plan.flood_new, a_timings)

        start_s = time.perf_counter()
        a_jobs: list[asyncio.Task[Any]]
        if backlog:
            a_jobs = [asyncio.create_task(_one(client, "task-a", texts[i % len(texts)], plan.flood_new, a_timings))
                      for i in range(plan.flood)]
        else:
            a_jobs = [asyncio.create_task(keep_busy(i)) for i in range(plan.batch - 1)]
        await asyncio.sleep(plan.gap)
        b = [await _one(client, "task-b", texts[i % len(texts)], plan.b_new) for i in range(plan.b_requests)]
        stop.set()
        await asyncio.gather(*a_jobs)
        a_seconds = max(t.done or 0.0 for t in a_timings) - start_s
    errors = [t.error for t in [*a_timings, *b] if t.error is not None]
    failed = len(errors)
    if errors:
        print(f"  {failed} requests failed, e.g. {errors[0]}")
    return {"b_latency_mean": statistics.fmean(t.latency for t in b), "b_latency_first": b[0].latency,
            "b_ttft_p99": _p([t.ttft for t in b], 0.99), "a_seconds": a_seconds, "failed": failed,
            "share_preemptions": server.app.scheduler.stats.share_preemptions,
            "prefills": server.app.scheduler.stats.prefills}


def flood(base: BaseModel, texts: list[str], prompts: list[torch.Tensor], plan: Plan, store: Path) -> dict[str, Any]:
    """The issue's scenario in each mode, against B beside a full batch with no backlog."""
    out: dict[str, Any] = {}
    for i, mode in enumerate(("reference", *plan.modes)):
        key, preempt = MODES["fair" if mode == "reference" else mode]
        server = Server(base, store / f"flood-{i}", max_batch_size=plan.batch, max_queued_requests=QUEUE,
                        fair_share=key, fair_preemption=preempt, fair_preemption_wait=plan.wait)
        try:
            asyncio.run(_with_client(server, lambda c: _register(c, ["task-a", "task-b"], prompts[:2])))
            out[mode] = asyncio.run(_flood_run(server, texts, plan, backlog=mode != "reference"))
        finally:
            server.close()
        r = out[mode]
        print(f"  {mode:15s} B mean {r['b_latency_mean']:7.2f} s (first {r['b_latency_first']:7.2f} s), B TTFT p99 "
              f"{r['b_ttft_p99']:7.2f} s, A {'flood' if mode != 'reference' else 'busy'} {r['a_seconds']:7.1f} s, "
              f"{r['prefills']} prefills, {r['share_preemptions']} share preemptions, {r['failed']} failed", flush=True)
    ref = out["reference"]
    for mode in plan.modes:
        r = out[mode]
        r["b_latency_x"] = r["b_latency_mean"] / ref["b_latency_mean"]
        r["b_ttft_p99_x"] = r["b_ttft_p99"] / ref["b_ttft_p99"]
        if "off" in out:
            r["a_seconds_x_off"] = r["a_seconds"] / out["off"]["a_seconds"]
        print(f"  {mode:15s} B latency {r['b_latency_x']:5.2f}x the reference (target <= 1.5: "
              f"{_mark(r['b_latency_x'] <= 1.5)}), TTFT p99 {r['b_ttft_p99_x']:5.2f}x (<= 2: "
              f"{_mark(r['b_ttft_p99_x'] <= 2)})" + (f", A's flood {r['a_seconds_x_off']:4.2f}x off's (<= 1.1: "
                                                   f"{_mark(r['a_seconds_x_off'] <= 1.1)})" if "off" in out else ""))
    return out


async def _with_client(server: Server, fn: Any) -> Any:
    async with AsyncClient(server.target, timeout=600.0) as client:
        return await fn(client)


# ---------------------------------------------------------------- weights


async def _backlogged(server: Server, texts: list[str], tasks: Sequence[str], outstanding: int, new: int,
                      seconds: float, warmup: float) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Keeps `outstanding` requests of each task in flight; the served counters after `warmup` and at the end."""
    async with AsyncClient(server.target, timeout=3600.0) as client:
        stop = asyncio.Event()

        async def loop(task: str, i: int) -> None:
            while not stop.is_set():
                await _one(client, task, texts[i % len(texts)], new)

        jobs = [asyncio.create_task(loop(t, i)) for t in tasks for i in range(outstanding)]
        await asyncio.sleep(warmup)
        before = server.served()
        await asyncio.sleep(seconds)
        after = server.served()
        stop.set()
        await asyncio.gather(*jobs)
    return before, after


def weights(base: BaseModel, texts: list[str], prompts: list[torch.Tensor], plan: Plan, store: Path) -> dict[str, Any]:
    """Two backlogged tasks weighted 1 and 3: what each was served over `seconds`."""
    policy = store / "weights.toml"
    store.mkdir(parents=True, exist_ok=True)
    policy.write_text('[[tasks]]\nmatch = "w1"\nweight = 1\n\n[[tasks]]\nmatch = "w3"\nweight = 3\n')
    server = Server(base, store / "weights", max_batch_size=plan.batch, max_queued_requests=QUEUE,
                    task_policy=policy)
    try:
        asyncio.run(_with_client(server, lambda c: _register(c, ["w1", "w3"], prompts[:2])))
        before, after = asyncio.run(_backlogged(server, texts, ["w1", "w3"], 2 * plan.batch, plan.flood_new,
                                                plan.seconds, warmup=min(10.0, plan.seconds / 6)))
    finally:
        server.close()
    got = {t: (after[t][0] - before[t][0], after[t][1] - before[t][1]) for t in ("w1", "w3")}
    tokens = {t: i + o for t, (i, o) in got.items()}
    service = {t: i * INPUT_COST + o * OUTPUT_COST for t, (i, o) in got.items()}
    out = {"input_output": got, "tokens_ratio": tokens["w3"] / max(1, tokens["w1"]),
           "service_ratio": service["w3"] / max(1.0, service["w1"])}
    print(f"  over {plan.seconds:g} s: w1 {got['w1'][0]} input + {got['w1'][1]} output tokens, w3 {got['w3'][0]} + "
          f"{got['w3'][1]}; tokens w3:w1 = {out['tokens_ratio']:.2f}, weighted service {out['service_ratio']:.2f} "
          f"(target 3 within 10 %: {_mark(abs(out['service_ratio'] / 3 - 1) <= 0.1)})")
    return out


# ---------------------------------------------------------------- many


def _capacity(base: BaseModel, texts: list[str], prompts: list[torch.Tensor], plan: Plan, store: Path) -> float:
    """Requests of `--b-new` tokens per second the server completes with a full batch."""
    server = Server(base, store / "capacity", max_batch_size=plan.batch, max_queued_requests=QUEUE)
    try:
        asyncio.run(_with_client(server, lambda c: _register(c, ["cap"], prompts[:1])))
        seconds = max(5.0, plan.seconds / 6)
        before, after = asyncio.run(_backlogged(server, texts, ["cap"], 2 * plan.batch, plan.b_new, seconds, 2.0))
    finally:
        server.close()
    return (after["cap"][1] - before["cap"][1]) / plan.b_new / seconds


def _many_clients(target: str, texts: list[str], names: list[str], plan: Plan, per_task_rate: float,
                  flooding: bool) -> dict[str, list[Timing]]:
    """`_many_run` in a process of its own (the server's process runs the model only, as it would for real clients:
    the Python work of ~70 streams in the server's process would compete with its worker for the interpreter)."""
    return asyncio.run(_many_run(target, texts, names, plan, per_task_rate, flooding))


async def _many_run(target: str, texts: list[str], names: list[str], plan: Plan, per_task_rate: float,
                    flooding: bool) -> dict[str, list[Timing]]:
    """Each task's requests sent at its seeded Poisson times for `seconds` (and the flood beside them)."""
    async with AsyncClient(target, timeout=3600.0) as client:
        timings: dict[str, list[Timing]] = {n: [] for n in names}
        stop = asyncio.Event()

        async def flood_loop(i: int) -> None:
            while not stop.is_set():
                await _one(client, "flooder", texts[i % len(texts)], plan.flood_new)

        async def arrivals(task: str, seed: int) -> None:
            rng, at, jobs, start_s = random.Random(seed), 0.0, [], time.perf_counter()
            while (at := at + rng.expovariate(per_task_rate)) < plan.many_seconds:
                await asyncio.sleep(max(0.0, start_s + at - time.perf_counter()))
                jobs.append(asyncio.create_task(_one(client, task, texts[seed % len(texts)], plan.b_new,
                                                     timings[task])))
            await asyncio.gather(*jobs)

        flooders = [asyncio.create_task(flood_loop(i)) for i in range(4 * plan.batch)] if flooding else []
        if flooding:
            await asyncio.sleep(plan.gap)
        await asyncio.gather(*(arrivals(n, i) for i, n in enumerate(names)))
        stop.set()
        await asyncio.gather(*flooders)
    return timings


def many(base: BaseModel, texts: list[str], prompts: list[torch.Tensor], plan: Plan, store: Path) -> dict[str, Any]:
    """`--tasks` tasks at their fair rate, alone and beside a flooding task: each one's p99 latency."""
    capacity = plan.capacity or _capacity(base, texts, prompts, plan, store)
    per_task_rate = plan.load * capacity / plan.tasks
    print(f"  capacity {capacity:.1f} requests/s of {plan.b_new} tokens; {plan.tasks} tasks at "
          f"{per_task_rate:.3f} requests/s each ({plan.load:.0%} together)", flush=True)
    names = [f"many-{i}" for i in range(plan.tasks)]
    p99: dict[bool, dict[str, float]] = {}
    forwards: dict[bool, dict[str, float]] = {}
    failed = 0
    for flooding in (False, True):
        server = Server(base, store / f"many-{flooding}", max_batch_size=plan.batch,
                        max_queued_requests=QUEUE, fair_preemption_wait=plan.wait)
        try:
            asyncio.run(_with_client(server, lambda c: _register(c, [*names, "flooder"],
                                                                 [prompts[i % len(prompts)] for i in
                                                                  range(plan.tasks + 1)])))
            server.app.scheduler.engine.timings = StepTimings()
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
                timings = clients.submit(_many_clients, server.target, texts, names, plan, per_task_rate,
                                         flooding).result()
            stats = server.app.scheduler.stats
            forwards[flooding] = _forwards(server)
        finally:
            server.close()
        errors = [t.error for ts in timings.values() for t in ts if t.error is not None]
        failed += len(errors)
        if errors:
            print(f"  {len(errors)} requests failed, e.g. {errors[0]}")
        p99[flooding] = {n: _p([t.latency for t in ts if t.error is None], 0.99) for n, ts in timings.items()
                         if any(t.error is None for t in ts)}
        every = [t.latency for ts in timings.values() for t in ts if t.error is None]
        firsts = [t.ttft for ts in timings.values() for t in ts if t.error is None]
        print(f"  {'with' if flooding else 'without'} the flood: {len(every)} requests, p50 "
              f"{_p(every, 0.5):.2f} s, p99 {_p(every, 0.99):.2f} s (first token p50 {_p(firsts, 0.5):.2f} s, p99 "
              f"{_p(firsts, 0.99):.2f} s); {stats.steps} decode steps, {stats.prefills} "
              f"prefills, {stats.max_batch} rows at most, {stats.share_preemptions} share preemptions "
              f"({getattr(stats, 'resumed_parked', 0)} rejoined with their KV)", flush=True)
        f = forwards[flooding]
        print(f"    each forward: {f['ms']:.1f} ms for {f['rows']:.1f} rows' next tokens and {f['prefill']:.1f} "
              f"prefill positions", flush=True)
    ratios = sorted(p99[True][n] / p99[False][n] for n in p99[True] if n in p99[False])
    cost = forwards[True]["ms"] / forwards[False]["ms"]
    print(f"  the flood makes each forward {cost:.2f}x as long: every light request's tokens wait on it")
    out = {"capacity_rps": capacity, "per_task_rate": per_task_rate, "forwards": forwards, "forward_cost": cost,
           "p99_ratio_max": ratios[-1] if ratios else math.nan,  # no task got a request through in both runs
           "p99_ratio_median": statistics.median(ratios) if ratios else math.nan,
           "over_2x": sum(r > 2 for r in ratios), "failed": failed}
    print(f"  per-task p99 with / without the flood: median {out['p99_ratio_median']:.2f}x, worst "
          f"{out['p99_ratio_max']:.2f}x, {out['over_2x']} of {len(ratios)} over 2x (target none: "
          f"{_mark(not out['over_2x'])}); {failed} failed")
    return out


def _forwards(server: Server) -> dict[str, float]:
    """The engine's forwards so far: mean wall ms, tokens made (rows decoding, or finishing their prefill) and
    prefill positions computed (every task's input tokens as fair share counts them) per forward."""
    timings = server.app.scheduler.engine.timings.snapshot()
    calls = sum(timings[part][0] for part in ("prefill", "decode", "mixed"))
    seconds = sum(timings[part][1] for part in ("prefill", "decode", "mixed"))
    served = server.served().values()
    calls = max(1, calls)
    return {"ms": 1000 * seconds / calls, "rows": sum(o for _, o in served) / calls,
            "prefill": sum(i for i, _ in served) / calls}


# ---------------------------------------------------------------- rate


async def _paced(client: AsyncClient, task: str, text: str, new: int, per_second: float | None, count: int
                 ) -> list[BaseException | None]:
    """`count` requests sent at `per_second` a second (all at once if None), each awaited in the background; each
    one's error or None."""
    async def one() -> BaseException | None:
        try:
            async for _ in client.stream(task, text, max_new_tokens=new):
                pass
            return None
        except Exception as e:  # noqa: BLE001 - the refusals are what is counted
            return e

    jobs = []
    for _ in range(count):
        jobs.append(asyncio.create_task(one()))
        if per_second is not None:
            await asyncio.sleep(1.0 / per_second)
    return list(await asyncio.gather(*jobs))


def rate(base: BaseModel, texts: list[str], prompts: list[torch.Tensor], plan: Plan, store: Path) -> dict[str, Any]:
    """A rate-limited task within its rate, then a burst of twice its bucket."""
    store.mkdir(parents=True, exist_ok=True)
    policy = store / "rate.toml"
    policy.write_text(f'[[tasks]]\nmatch = "limited"\ntokens_per_second = {plan.rate}\n')
    server = Server(base, store / "rate", max_batch_size=plan.batch, task_policy=policy)
    text = texts[0]
    cost = len(base.tokenizer(text).input_ids) + plan.b_new  # what one request takes from the bucket
    try:
        async def drive(client: AsyncClient) -> tuple[list[BaseException | None], list[BaseException | None]]:
            await _register(client, ["limited"], prompts[:1])
            count = max(4, int(plan.seconds / 6 * plan.rate / cost))
            within = await _paced(client, "limited", text, plan.b_new, 0.8 * plan.rate / cost, count)
            await asyncio.sleep(2.0)  # the bucket refills
            # Twice the bucket at once: refusals do not depend on how fast this client sends.
            burst = 2 * math.ceil(max(1.0, plan.rate) / cost) + 1
            over = await _paced(client, "limited", text, plan.b_new, None, burst)
            return within, over

        within, over = asyncio.run(_with_client(server, drive))
    finally:
        server.close()
    refused = [e for e in over if isinstance(e, ResourceExhaustedError)]
    other = [e for e in over if e is not None and not isinstance(e, ResourceExhaustedError)]
    out = {"within_sent": len(within), "within_failed": sum(e is not None for e in within), "over_sent": len(over),
           "over_refused": len(refused), "over_other_errors": len(other),
           "retry_after_given": all(e.retry_after for e in refused), "message": str(refused[0]) if refused else ""}
    ok = not out["within_failed"] and refused and out["retry_after_given"] and not other
    print(f"  {plan.rate:g} tokens/s ({cost} a request): within the rate {len(within)} sent, "
          f"{out['within_failed']} failed; twice the bucket at once: {len(over)} sent, {len(refused)} refused with "
          f"RESOURCE_EXHAUSTED{' and a retry delay' if out['retry_after_given'] else ''} ({_mark(bool(ok))})")
    if refused:
        print(f"  e.g. {refused[0]}")
    return out


RUNNERS = {"flood": flood, "weights": weights, "many": many, "rate": rate}


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.fair_share", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Plan()
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run this scenario (repeatable; default: all)")
    parser.add_argument("--model", help="model name or path (default: the server's default model)")
    parser.add_argument("--hidden", type=int, default=0,
                        help="instead, a random-weight Llama shaped like the default model with this hidden size "
                             "(a multiple of 192) and --layers: a quick run")
    parser.add_argument("--layers", type=int, default=2, help="the random model's layers (default 2)")
    parser.add_argument("--batch", type=int, default=d.batch, help=f"--max-batch-size (default {d.batch})")
    parser.add_argument("--flood", type=int, default=d.flood, help=f"A's requests at once (default {d.flood})")
    parser.add_argument("--flood-new", type=int, default=d.flood_new,
                        help=f"new tokens of each flooding request (default {d.flood_new})")
    parser.add_argument("--b-new", type=int, default=d.b_new,
                        help=f"new tokens of each interactive request (default {d.b_new})")
    parser.add_argument("--b-requests", type=int, default=d.b_requests,
                        help=f"B's requests, one after another (default {d.b_requests})")
    parser.add_argument("--gap", type=float, default=d.gap, help=f"seconds between A's flood and B (default {d.gap})")
    parser.add_argument("--modes", default=",".join(d.modes),
                        help=f"flood modes, comma-separated, of {', '.join(MODES)} (default: all)")
    parser.add_argument("--seconds", type=float, default=d.seconds,
                        help=f"length of the weights scenario (a sixth of it sizes the capacity measurement and "
                             f"the rate scenario's paced requests) (default {d.seconds:g})")
    parser.add_argument("--many-seconds", type=float, default=d.many_seconds,
                        help=f"length of each of the many scenario's two phases (default {d.many_seconds:g}: each "
                             "task's p99 over ~10 requests)")
    parser.add_argument("--tasks", type=int, default=d.tasks, help=f"tasks in the many scenario (default {d.tasks})")
    parser.add_argument("--load", type=float, default=d.load,
                        help=f"their rate together, a fraction of capacity (default {d.load})")
    parser.add_argument("--rate", type=float, default=d.rate,
                        help=f"the rate scenario's limit, tokens/s (default {d.rate:g})")
    parser.add_argument("--wait", type=float, default=d.wait,
                        help=f"the server's --fair-preemption-wait in the fair modes (default {d.wait:g}: always "
                             "preempt)")
    parser.add_argument("--capacity", type=float, default=0.0,
                        help="requests/s of --b-new tokens that --load is a fraction of in the many scenario "
                             "(default: measured first; give one to compare builds at the same arrival rate)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the chosen scenarios and prints their figures; 0 unless a request failed unexpectedly."""
    parser = build_parser()
    a = parser.parse_args(argv)
    modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes takes a comma-separated list of {', '.join(MODES)}, got {a.modes!r}")
    for name in ("batch", "flood", "flood_new", "b_new", "b_requests", "tasks"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if (not 0 < a.load <= 1 or min(a.seconds, a.many_seconds, a.rate) <= 0 or a.gap < 0 or not 0 <= a.wait <= 1
            or a.capacity < 0):
        parser.error("--load must be in (0, 1], --seconds, --many-seconds and --rate > 0, --gap and --capacity >= 0, "
                     "--wait in [0, 1]")
    plan = Plan(batch=a.batch, flood=a.flood, flood_new=a.flood_new, b_new=a.b_new, b_requests=a.b_requests,
                gap=a.gap, modes=modes, seconds=a.seconds, many_seconds=a.many_seconds, tasks=a.tasks, load=a.load,
                rate=a.rate, wait=a.wait, capacity=a.capacity)
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.getLogger("softprompt").setLevel(logging.ERROR)  # refusals and preemptions are counted here
    if a.hidden:
        from softprompt.benchmarks.churn import random_llama

        try:
            base, shape = random_llama(a.hidden, a.layers, torch.device("cpu"))
        except ValueError as e:
            parser.error(str(e))
        described = f"random-weight Llama {json.dumps(shape)}"
    else:
        from softprompt.server.app.loading import load_base_model

        base = load_base_model(a.model)
        described = base.spec.model_id
    texts = build_texts(base.tokenizer, 16, INPUT_TOKENS, None)
    prompts = make_prompts(base.model, 4, VIRTUAL_TOKENS, base.dtype)
    results = Results(config={"model": described, "device": str(base.device), **asdict(plan)})
    print(f"model {described} on {base.device} ({base.dtype}), max batch {plan.batch}, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in a.scenario or SCENARIOS:
            print(f"{scenario}:", flush=True)
            started = time.perf_counter()
            figures = RUNNERS[scenario](base, texts, prompts, plan, Path(tmp) / scenario)
            setattr(results, scenario, figures)
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
            failed += sum(v.get("failed", 0) for v in figures.values() if isinstance(v, dict))
            failed += figures.get("failed", 0) if scenario == "many" else 0
            failed += figures.get("within_failed", 0) + figures.get("over_other_errors", 0) if scenario == "rate" else 0
    if a.json_out:
        a.json_out.write_text(json.dumps(asdict(results), indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
