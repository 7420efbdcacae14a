"""Load: many concurrent streaming clients, random cancellations and short deadlines, nothing leaks.

40 client threads stream from a server with a small batch (4) and a small queue (8) for three rounds of
a few seconds each. Some cancel their stream midway, some give deadlines too short to finish, some use
unary Generate. Asserted, none of it on timing: only the intended statuses appear (OK, CANCELLED for the
streams the client cancelled, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED); every token any client received is
the reference greedy output for its (task, input), whole for completed requests and a prefix for the rest;
the queue never holds more than its bound nor the batch more than its size; after each round the
scheduler lets go of every request (cancelled and expired ones included); threads and memory do not
grow from round to round.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import torch
from helpers import running_server
from helpers import expected_ids, torch_threads, wait_until
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc

SEED = 1234
CLIENTS = 40
ROUNDS = 3
ROUND_S = 5.0
MAX_BATCH = 4
MAX_QUEUED = 8
MAX_NEW = 12
TASKS = ["", "alpha", "beta@prod"]
INPUTS = ["the quick brown fox", "hello", "a soft prompt is a small matrix of", "one frozen model serves many"]
# A leaked request holds over ten gc-tracked objects (handle, queue, event, sequence, lists) and each round
# admits hundreds, so a leak adds thousands; normal churn between rounds is a handful.
OBJECT_GROWTH_LIMIT = 500
RSS_GROWTH_LIMIT_KB = 48 * 1024

OK = grpc.StatusCode.OK
EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


@dataclass
class Tally:
    """What the clients saw; updated under a lock by every client thread."""

    statuses: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status: str, problem: str | None = None) -> None:
        with self.lock:
            self.kinds[kind] += 1
            self.statuses[status] += 1
            if problem is not None and len(self.problems) < 20:
                self.problems.append(problem)


class Monitor(threading.Thread):
    """Samples the scheduler's queue depth and batch size while the load runs."""

    def __init__(self, scheduler: Any) -> None:
        super().__init__(name="load-monitor", daemon=True)
        self.scheduler = scheduler
        self.stop = threading.Event()
        self.max_queue = 0
        self.max_running = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            # A consistent view (taken under the scheduler's lock): within one step a row that gives way is queued
            # again before the rows that made it give way leave the queue.
            snapshot = self.scheduler.snapshot()
            self.max_queue = max(self.max_queue, len(snapshot.waiting) + snapshot.scoring_queued)
            self.max_running = max(self.max_running, len(snapshot.running))
            self.samples += 1
            time.sleep(0.001)


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory) -> Iterator[tuple[Any, str, dict[tuple[str, str], list[int]]]]:
    """The server, its address, and the reference continuation of every (task, input)."""
    with torch_threads(1), running_server(tiny_base, tmp_path_factory.mktemp("store"), max_batch_size=MAX_BATCH,
                                          max_queued_requests=MAX_QUEUED, max_new_tokens=MAX_NEW,
                                          default_max_new_tokens=4, batch_wait_ms=1) as (app, address):
        prompts: dict[str, torch.Tensor | None] = {"": None}
        with grpc.insecure_channel(address) as channel:
            registry = pb_grpc.RegistryStub(channel)
            for i, name in enumerate(["alpha", "beta"]):
                t = torch.randn(2 + 3 * i, tiny_base.spec.hidden_size, generator=torch.Generator().manual_seed(i)) * 0.5
                raw = pb.RawTensor(shape=list(t.shape), dtype="float32", data=t.numpy().tobytes())
                registry.RegisterPrompt(pb.RegisterPromptRequest(name=name, tensor=raw), timeout=60)
                prompts[name] = t
            registry.SetAlias(pb.SetAliasRequest(name="beta", alias="prod", version=1), timeout=60)
        reference = {(task, text): expected_ids(tiny_base, prompts[task.partition("@")[0]], text, MAX_NEW)
                     for task in TASKS for text in INPUTS}
        yield app, address, reference


def _client(stub: pb_grpc.InferenceStub, reference: dict[tuple[str, str], list[int]], tally: Tally,
            rng: random.Random, until: float) -> None:
    """One client: requests of a random kind back to back until `until`."""
    while time.monotonic() < until:
        task, text = rng.choice(TASKS), rng.choice(INPUTS)
        n = rng.randint(1, MAX_NEW)
        expected = reference[(task, text)][:n]
        request = pb.GenerateRequest(task=task, input=text, params=pb.DecodingParameters(max_new_tokens=n))
        kind = rng.choices(["stream", "cancel", "deadline", "unary"], weights=[4, 2, 2, 1])[0]
        timeout = rng.uniform(0.005, 0.3) if kind == "deadline" else 120.0
        received: list[int] = []
        status = "OK"
        try:
            if kind == "unary":
                received = list(stub.Generate(request, timeout=timeout).token_ids)
            else:
                call = stub.GenerateStream(request, timeout=timeout)
                stop_after = rng.randint(0, max(0, len(expected) - 1)) if kind == "cancel" else None
                for chunk in call:
                    received.extend(chunk.token_ids)
                    if stop_after is not None and len(received) > stop_after:
                        call.cancel()  # the client walks away mid-stream
                        status = "CANCELLED"
                        break
        except grpc.RpcError as e:
            status = e.code().name
        problem = None
        if status not in EXPECTED or (status == "CANCELLED" and kind != "cancel"):
            problem = f"{kind} request for {task!r} got {status}"
        elif received != expected[: len(received)]:
            problem = f"{kind} request for ({task!r}, {text!r}) received {received}, reference {expected}"
        elif status == "OK" and received != expected:
            problem = f"{kind} request for ({task!r}, {text!r}, {n}) completed with {received}, reference {expected}"
        tally.add(kind, status, problem)
        if status == "RESOURCE_EXHAUSTED":
            time.sleep(rng.uniform(0.05, 0.25))  # back off as a real client would, so requests also get in


def _threads() -> tuple[int, int]:
    """(gRPC server pool threads, all other threads) alive now.

    The pool starts threads on demand up to its fixed size, so it may still grow in a later round
    without leaking; it is checked against its bound, everything else must not grow at all.
    """
    names = [t.name for t in threading.enumerate()]
    pool = sum(1 for n in names if n.startswith("softprompt-rpc"))
    return pool, len(names) - pool


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_many_streaming_clients_cancellations_and_deadlines(served) -> None:
    app, address, reference = served
    scheduler = app.scheduler
    tally = Tally()
    rng = random.Random(SEED)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.InferenceStub(channel)
    pool = ThreadPoolExecutor(CLIENTS, thread_name_prefix="load-client")
    # (pool threads, other threads, gc objects, RSS kB) once the server is idle again
    after_round: list[tuple[int, int, int, int]] = []
    monitor = Monitor(scheduler)
    monitor.start()
    try:
        for _ in range(ROUNDS):
            until = time.monotonic() + ROUND_S
            seeds = [rng.randrange(2**32) for _ in range(CLIENTS)]
            for f in [pool.submit(_client, stub, reference, tally, random.Random(s), until) for s in seeds]:
                f.result()
            # Every cancelled or expired request must give its slot back once the load stops.
            wait_until(lambda: scheduler.snapshot().idle,
                       "the scheduler to let go of every request", timeout_s=60)
            gc.collect()
            after_round.append((*_threads(), len(gc.get_objects()), _rss_kb()))
    finally:
        monitor.stop.set()
        monitor.join()
        pool.shutdown()
        channel.close()

    total = sum(tally.kinds.values())
    print(f"\nload: {CLIENTS} clients x {ROUNDS} rounds of {ROUND_S:.0f} s: {total} requests, kinds {dict(tally.kinds)}, "
          f"statuses {dict(tally.statuses)}; max queue {monitor.max_queue}/{MAX_QUEUED}, max batch "
          f"{monitor.max_running}/{MAX_BATCH} over {monitor.samples} samples; after each round "
          f"(gRPC pool threads, other threads, objects, RSS kB): {after_round}")
    assert not tally.problems, "\n".join(tally.problems)
    assert set(tally.statuses) <= EXPECTED
    # The load really exercised what it claims to: completions, cancellations, deadlines and back-pressure.
    assert all(tally.statuses[s] > 0 for s in EXPECTED), tally.statuses
    assert monitor.max_queue <= MAX_QUEUED and monitor.max_running <= MAX_BATCH
    (_, others1, objects1, rss1), *later = after_round
    for pool, others, objects, rss in later:
        assert pool <= app.config.rpc_workers, f"{pool} gRPC threads for a pool of {app.config.rpc_workers}"
        assert others <= others1, f"threads outside the gRPC pool grew from {others1} to {others}"
        assert objects - objects1 <= OBJECT_GROWTH_LIMIT, f"gc-tracked objects grew from {objects1} to {objects}"
        assert rss - rss1 <= RSS_GROWTH_LIMIT_KB, f"RSS grew from {rss1} kB to {rss} kB"
    # The server still answers correctly after the storm.
    with grpc.insecure_channel(address) as channel:
        out = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            task="alpha", input=INPUTS[0], params=pb.DecodingParameters(max_new_tokens=MAX_NEW)), timeout=120)
    assert list(out.token_ids) == reference[("alpha", INPUTS[0])]
