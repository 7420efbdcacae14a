"""Graceful shutdown: health goes NOT_SERVING, new requests get UNAVAILABLE, in-flight streams finish.

In process, the scheduler's worker is parked inside a side job (`Scheduler.call`) while streams are
mid-way and a training job runs, so "in flight at shutdown" is certain rather than a matter of timing.
Then `shutdown` runs in a thread: health and admission must flip while the streams wait, the streams
must then finish with the reference output, and the training job must stop and leave nothing in the
store. Past the grace period, held requests fail with UNAVAILABLE instead of hanging. As a process,
`softprompt serve` sent SIGTERM mid-stream must finish the stream and exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import expected_ids, torch_threads, wait_until
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from helpers import synthetic, to_jsonl

TIMEOUT_S = 300.0  # only a hang reaches it
LONG = 100  # tokens per in-flight stream: far more than the few steps that run before the worker parks
TEXTS = ["the quick brown fox", "one frozen model serves many"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


class ParkedWorker:
    """The scheduler's worker thread held inside a side job until `release()` (see `parked_worker`).

    While parked no request advances, so whatever is running stays in flight; the side job records
    how many requests were running when the worker parked.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.entered = threading.Event()
        self.released = threading.Event()
        self.running_at_park = -1

    def hold(self) -> None:
        """The side job: runs on the worker thread and keeps it until released."""
        self.running_at_park = len(self.scheduler.snapshot().running)
        self.entered.set()
        self.released.wait(TIMEOUT_S)

    def release(self) -> None:
        self.released.set()


@contextmanager
def parked_worker(scheduler: Any) -> Iterator[ParkedWorker]:
    """Parks the worker for the block (it may be released earlier) and waits for the side job to end."""
    parked = ParkedWorker(scheduler)
    caller = threading.Thread(target=scheduler.call, args=(parked.hold,), name="park-worker", daemon=True)
    caller.start()
    try:
        wait_until(parked.entered.is_set, "the worker to park", timeout_s=TIMEOUT_S)
        yield parked
    finally:
        parked.release()
        caller.join(TIMEOUT_S)


class Stream(threading.Thread):
    """A GenerateStream read to its end in a thread; `started` is set at its first chunk."""

    def __init__(self, stub: pb_grpc.InferenceStub, task: str, text: str, max_new_tokens: int) -> None:
        super().__init__(daemon=True)
        self.request = pb.GenerateRequest(task=task, input=text, params=pb.DecodingParameters(
            max_new_tokens=max_new_tokens))
        self.stub = stub
        self.started = threading.Event()
        self.tokens: list[int] = []
        self.finish = pb.FINISH_REASON_UNSPECIFIED
        self.error: grpc.RpcError | None = None

    def run(self) -> None:
        try:
            for chunk in self.stub.GenerateStream(self.request, timeout=TIMEOUT_S):
                self.tokens.extend(chunk.token_ids)
                self.finish = chunk.finish_reason
                self.started.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.started.set()


def _health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                      timeout=TIMEOUT_S).status


def _probe(stub: pb_grpc.InferenceStub) -> grpc.StatusCode:
    """A new request's status; the short deadline only matters if it were (wrongly) queued."""
    try:
        stub.Generate(pb.GenerateRequest(input="hello", params=pb.DecodingParameters(max_new_tokens=1)), timeout=5)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _start_server(base: Any, store: Path, **settings: Any) -> tuple[Any, Any, Any, str]:
    from softprompt.server.app.server import build_app, start
    from softprompt.server.config import ServerConfig

    settings.setdefault("http_port", None)
    app = build_app(ServerConfig(port=0, store=store, **settings), base=base)
    server, port, health = start(app)
    return app, server, health, f"127.0.0.1:{port}"


def _register(channel: grpc.Channel, name: str, hidden: int, seed: int) -> torch.Tensor:
    t = torch.randn(3, hidden, generator=torch.Generator().manual_seed(seed)) * 0.5
    raw = pb.RawTensor(shape=[3, hidden], dtype="float32", data=t.numpy().tobytes())
    pb_grpc.RegistryStub(channel).RegisterPrompt(pb.RegisterPromptRequest(name=name, tensor=raw), timeout=TIMEOUT_S)
    return t


def _start_training(channel: grpc.Channel, task: str) -> str:
    options = pb.TrainingOptions(num_virtual_tokens=4, learning_rate=0.1, batch_size=8, epochs=10_000)
    options.patience = 0
    job = pb_grpc.TrainingStub(channel).TrainPrompt(pb.TrainPromptRequest(
        task=task, train_jsonl=to_jsonl(synthetic(32, 3)).encode(), eval_jsonl=to_jsonl(synthetic(8, 4)).encode(),
        options=options), timeout=TIMEOUT_S)
    return job.job_id


def test_shutdown_drains_in_flight_streams_and_stops_training(tiny_base, tmp_path) -> None:
    from softprompt.server.app.server import shutdown

    store = tmp_path / "store"
    app, server, health, address = _start_server(tiny_base, store, max_batch_size=4, max_new_tokens=LONG,
                                                 train_share=1.0, batch_wait_ms=0)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.InferenceStub(channel)
    prompt = _register(channel, "drain", tiny_base.spec.hidden_size, seed=3)
    expected = {("drain", t): expected_ids(tiny_base, prompt, t, LONG) for t in TEXTS}
    expected.update({("", t): expected_ids(tiny_base, None, t, LONG) for t in TEXTS})
    assert all(len(ids) == LONG for ids in expected.values()), "the reference should not stop early"

    job_id = _start_training(channel, "trained")

    def training() -> bool:
        job = app.jobs.get(job_id)
        assert not job.done, f"the training job ended before the shutdown: {job.state} {job.error}"
        return job.progress is not None and job.progress.step >= 1

    wait_until(training, "the training job to take a step", timeout_s=TIMEOUT_S)
    streams = [Stream(stub, task, text, LONG) for task, text in expected]
    for s in streams:
        s.start()
    for s in streams:
        wait_until(s.started.is_set, "every stream's first chunk", timeout_s=TIMEOUT_S)
    assert all(s.error is None for s in streams), [s.error for s in streams]

    drained = threading.Thread(target=shutdown, args=(app, server, health, 120.0), name="shutdown")
    with parked_worker(app.scheduler) as parked:
        assert parked.running_at_park == len(streams), "every stream is mid-way while the worker is parked"
        drained.start()
        wait_until(lambda: _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING, "health NOT_SERVING")
        assert _health(channel, "softprompt.v1.Inference") == health_pb2.HealthCheckResponse.NOT_SERVING
        # Once health says NOT_SERVING, new requests are refused, not queued behind the held streams (the
        # 5 s deadline of the probe would turn a queued one into DEADLINE_EXCEEDED).
        assert [_probe(stub) for _ in range(3)] == [grpc.StatusCode.UNAVAILABLE] * 3
        assert all(s.is_alive() for s in streams)
    drained.join(TIMEOUT_S)
    assert not drained.is_alive(), "shutdown did not return"
    for s in streams:
        s.join(TIMEOUT_S)
        task, text = s.request.task, s.request.input
        assert s.error is None, f"in-flight stream {task!r} failed: {s.error}"
        assert s.tokens == expected[(task, text)] and s.finish == pb.FINISH_REASON_LENGTH

    job = app.jobs.get(job_id)
    assert job.state == "cancelled" and job.version is None
    # Nothing half-written: the registered task alone, and no staging leftovers.
    assert sorted(p.name for p in store.iterdir()) == [".tmp", "drain"]
    assert list((store / ".tmp").iterdir()) == []
    assert sorted(p.name for p in (store / "drain").iterdir() if p.name.isdigit()) == ["1"]
    channel.close()


def test_requests_still_held_after_the_grace_period_get_unavailable(tiny_base, tmp_path) -> None:
    from softprompt.server.app.server import shutdown

    app, server, health, address = _start_server(tiny_base, tmp_path / "store", max_batch_size=4,
                                                 max_new_tokens=LONG, batch_wait_ms=0)
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.InferenceStub(channel)
    expected = expected_ids(tiny_base, None, TEXTS[0], LONG)
    with parked_worker(app.scheduler) as parked:
        # Queued behind the parked worker: in flight, but they cannot finish within a zero grace period.
        streams = [Stream(stub, "", TEXTS[0], LONG) for _ in range(3)]
        for s in streams:
            s.start()
        wait_until(lambda: app.scheduler.queue_depth() == len(streams), "the streams to queue")
        drained = threading.Thread(target=shutdown, args=(app, server, health, 0.0), name="shutdown")
        drained.start()
        wait_until(lambda: _probe(stub) == grpc.StatusCode.UNAVAILABLE, "new requests to get UNAVAILABLE")
        parked.release()
        drained.join(TIMEOUT_S)
        assert not drained.is_alive() and parked.running_at_park == 0
    for s in streams:
        s.join(TIMEOUT_S)
        assert s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE, s.error
        assert s.tokens == expected[: len(s.tokens)]
    channel.close()


class ServeProcess:
    """`softprompt serve` on the tiny model in a child process, its log in a file."""

    def __init__(self, model_dir: Path, tmp_path: Path, *flags: str) -> None:
        self.log_path = tmp_path / "serve.log"
        command = [sys.executable, "-m", "softprompt.client.cli", "serve", "--model", str(model_dir), "--port", "0",
                   "--store", str(tmp_path / "store"), "--device", "cpu", "--grace", "120", *flags]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str) -> re.Match[str]:
        """Waits for a log line matching `pattern` while the process lives; returns the match."""
        found: list[re.Match[str]] = []

        def logged() -> bool:
            match = re.search(pattern, self.log())
            if match:
                found.append(match)
                return True
            assert self.proc.poll() is None, f"softprompt serve exited early:\n{self.log()}"
            return False

        wait_until(logged, f"softprompt serve to log {pattern!r}", timeout_s=TIMEOUT_S, poll_s=0.05)
        return found[0]

    def exit_code(self) -> int:
        """The exit status; a process still running 120 s after SIGTERM counts as a hang."""
        try:
            return self.proc.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"softprompt serve still runs {EXIT_S:.0f} s after SIGTERM:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


EXIT_S = 120.0


def test_softprompt_serve_finishes_the_stream_on_sigterm_and_exits_0(tiny_model_dir, tiny_base, tmp_path) -> None:
    serve = ServeProcess(tiny_model_dir, tmp_path, "--max-new-tokens", "200")
    try:
        port = int(serve.wait_for_log(r"serving .* on 127\.0\.0\.1:([1-9][0-9]*)").group(1))
        expected = expected_ids(tiny_base, None, TEXTS[1], 200)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.InferenceStub(channel).GenerateStream(pb.GenerateRequest(
                input=TEXTS[1], params=pb.DecodingParameters(max_new_tokens=200)), timeout=TIMEOUT_S)
            chunks = iter(call)
            tokens = list(next(chunks).token_ids)
            serve.proc.send_signal(signal.SIGTERM)
            before_signal = len(tokens)
            finish = pb.FINISH_REASON_UNSPECIFIED
            for chunk in chunks:
                tokens.extend(chunk.token_ids)
                finish = chunk.finish_reason
        assert tokens == expected and finish in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        assert serve.exit_code() == 0, serve.log()
        assert "shutting down" in serve.log()
        print(f"\nSIGTERM sent after {before_signal} of {len(tokens)} streamed tokens had been read")
    finally:
        serve.close()


def test_softprompt_serve_drains_a_sigterm_that_arrives_while_loading(tiny_model_dir, tmp_path) -> None:
    # The first log line comes from loading the model, before the port opens: the signal must still
    # lead to an orderly shutdown and exit status 0, not the default action (killed by SIGTERM).
    serve = ServeProcess(tiny_model_dir, tmp_path)
    try:
        serve.wait_for_log(r"logger=softprompt\.server\.app\.loading loading")
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.exit_code() == 0, serve.log()
        assert "shutting down" in serve.log()
    finally:
        serve.close()


def test_softprompt_serve_rereads_its_task_policy_on_sighup(tiny_model_dir, tmp_path) -> None:
    """Issue 20: SIGHUP re-reads --task-policy. The edit keeps the file's size and modification time, so the
    server's own change check cannot see it: only the signal can make the new rate limit bite."""
    policy = tmp_path / "policy.toml"
    loose = '[[tasks]]\nmatch = "-"\ntokens_per_second = 100000\n'
    tight = '[[tasks]]\nmatch = "-"\ntokens_per_second =    1.0\n'
    assert len(loose) == len(tight)
    policy.write_text(loose)
    stamp = policy.stat().st_mtime_ns
    serve = ServeProcess(tiny_model_dir, tmp_path, "--task-policy", str(policy))
    request = pb.GenerateRequest(input=TEXTS[0], params=pb.DecodingParameters(max_new_tokens=4))
    try:
        port = int(serve.wait_for_log(r"serving .* on 127\.0\.0\.1:([1-9][0-9]*)").group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert len(stub.Generate(request, timeout=TIMEOUT_S).token_ids) == 4
            policy.write_text(tight)
            os.utime(policy, ns=(stamp, stamp))
            serve.proc.send_signal(signal.SIGHUP)
            serve.wait_for_log(r"task policy reloaded from .*policy\.toml: 1 rules")
            # A full bucket (1 token now) lets one request through, however large; the next one waits for it.
            assert len(stub.Generate(request, timeout=TIMEOUT_S).token_ids) == 4
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(request, timeout=TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over its token rate (1 tokens/s" in (refused.value.details() or "")
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.exit_code() == 0, serve.log()
    finally:
        serve.close()
