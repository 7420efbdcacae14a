"""Unit tests of the client's Classify and Training support: requests, conversions, the CLI.

Everything runs without a model: request building and conversion are pure functions, and the
client and CLI talk to an in-process gRPC server whose fake servicers replay canned jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sys
import time
import types
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from softprompt.client import (
    AsyncClient,
    ClassifyResult,
    Client,
    DeadlineExceededError,
    EvalMetrics,
    InvalidArgumentError,
    LabelScore,
    NotFoundError,
    PromptInfo,
    TrainingJob,
    TrainingOptions,
    TrainingProgress,
)
from softprompt.client import calls, convert, requests
from softprompt.client.cli import build_parser, main
from softprompt.client.cli.render import ProgressLine
from softprompt.prompts import options as options_module
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos.options import options_to_pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc

EXAMPLES = [
    {"input": "I loved it", "target": "positive"},
    {"input": "Très décevant", "target": "négatif"},
]
EXAMPLES_JSONL = (
    '{"input": "I loved it", "target": "positive"}\n'
    '{"input": "Très décevant", "target": "négatif"}\n'
).encode("utf-8")

# Every field differs from its default, so a field the CLI or the request forgets shows up.
CUSTOM_OPTIONS = TrainingOptions(
    num_virtual_tokens=8,
    init="text:Classify the sentiment",
    learning_rate=0.1,
    epochs=5,
    max_steps=100,
    batch_size=4,
    grad_accum=2,
    max_length=128,
    seed=7,
    eval_fraction=0.25,
    eval_every=10,
    patience=2,
    apply_chat_template=True,
    warmup_steps=5,
    method="prefix",
    prefix_projection=True,
    encoder_hidden_size=16,
)
CUSTOM_FLAGS = [
    "--num-virtual-tokens", "8", "--init", "text:Classify the sentiment", "--lr", "0.1",
    "--epochs", "5", "--max-steps", "100", "--batch-size", "4", "--grad-accum", "2",
    "--max-length", "128", "--seed", "7", "--eval-fraction", "0.25", "--eval-every", "10",
    "--patience", "2", "--chat", "--warmup-steps", "5",
    "--method", "prefix", "--prefix-projection", "--encoder-hidden-size", "16",
]


def test_custom_options_change_every_field() -> None:
    defaults = TrainingOptions()
    same = [f.name for f in dataclasses.fields(TrainingOptions)
            if getattr(CUSTOM_OPTIONS, f.name) == getattr(defaults, f.name)]
    assert same == []


# ---------------------------------------------------------------------- requests


@pytest.mark.parametrize("as_path", [str, Path])
def test_training_data_from_a_path_is_sent_as_is(tmp_path: Path, as_path: Any) -> None:
    raw = b'{"input": "a", "target": "b"}\r\n\n'  # unusual bytes survive untouched
    path = tmp_path / "train.jsonl"
    path.write_bytes(raw)
    assert requests.training_jsonl(as_path(path)) == raw


def test_training_data_from_bytes_and_dicts() -> None:
    assert requests.training_jsonl(EXAMPLES_JSONL) == EXAMPLES_JSONL
    assert requests.training_jsonl(bytearray(b"x\n")) == b"x\n"
    assert requests.training_jsonl(EXAMPLES) == EXAMPLES_JSONL
    assert requests.training_jsonl(dict(e) for e in EXAMPLES) == EXAMPLES_JSONL  # any iterable
    assert requests.training_jsonl([]) == b""


def test_bad_training_data_fails_locally(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="training example 1 is a str"):
        requests.training_jsonl([EXAMPLES[0], "input,target"])
    with pytest.raises(FileNotFoundError):
        requests.training_jsonl(tmp_path / "missing.jsonl")


def test_training_options_copy_every_field() -> None:
    message = options_to_pb(CUSTOM_OPTIONS)
    for field in dataclasses.fields(TrainingOptions):
        assert getattr(message, field.name) == pytest.approx(getattr(CUSTOM_OPTIONS, field.name))


def test_optional_training_options_are_sent_even_at_zero() -> None:
    message = options_to_pb(TrainingOptions(seed=0, eval_fraction=0.0))
    assert message.HasField("seed") and message.seed == 0
    assert message.HasField("eval_fraction") and message.eval_fraction == 0.0


def test_train_request(tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_bytes(b"EVAL\n")
    request = calls.train(
        "sentiment",
        EXAMPLES,
        tmp_path / "eval.jsonl",
        options=CUSTOM_OPTIONS,
        description="first try",
        tags={"lang": "en"},
        promote_alias="prod",
    ).request
    assert (request.task, request.train_jsonl, request.eval_jsonl) == ("sentiment", EXAMPLES_JSONL, b"EVAL\n")
    assert request.options == options_to_pb(CUSTOM_OPTIONS)
    assert (request.description, dict(request.tags), request.promote_alias) == ("first try", {"lang": "en"}, "prod")

    defaults = calls.train("t", b"x\n").request
    assert defaults.eval_jsonl == b"" and defaults.options == options_to_pb(TrainingOptions())


def test_classify_request() -> None:
    request = calls.classify("s@prod", "great", ("positive", "negative"), chat=True).request
    assert list(request.labels) == ["positive", "negative"] and request.apply_chat_template
    assert list(calls.classify("s", "x", "positive").request.labels) == ["positive"]


def test_training_options_are_reexported_without_torch() -> None:
    assert TrainingOptions is options_module.TrainingOptions


# ---------------------------------------------------------------------- conversions


def _version_pb(**extra: Any) -> pb.PromptInfo:
    return pb.PromptInfo(
        name="sentiment", version=4, ref="sentiment@4", num_virtual_tokens=8, hidden_size=64,
        peft_type="PROMPT_TUNING", metrics={"eval_loss": 0.25, "accuracy": 0.9}, **extra,
    )


def _progress_pb(step: int, total: int = 4, **extra: Any) -> pb.TrainingProgress:
    return pb.TrainingProgress(step=step, total_steps=total, epoch=step / 2, train_loss=1.0 / (step or 1),
                               steps_per_second=2.5, elapsed_seconds=3.0 * step, **extra)


FULL_JOB = pb.TrainingJob(
    job_id="job-1",
    task="sentiment",
    state=pb.TRAINING_STATE_SUCCEEDED,
    phase="done",
    progress=_progress_pb(4, eval_loss=0.5, best_eval_loss=0.4),
    before=pb.EvalMetrics(examples=10, loss=2.0, exact_match=0.1, accuracy=0.5),
    after=pb.EvalMetrics(examples=10, loss=0.5, exact_match=0.8),
    version=_version_pb(),
    promoted=True,
    promotion="accuracy 0.9 > 0.7",
    error="",
    created_at="2025-01-02T03:04:05Z",
    finished_at="2025-01-02T03:09:05Z",
    train_examples=90,
    eval_examples=10,
)


def test_training_job_converts_every_field() -> None:
    job = convert.training_job(FULL_JOB)
    assert job == TrainingJob(
        job_id="job-1",
        task="sentiment",
        state="succeeded",
        phase="done",
        progress=TrainingProgress(
            step=4, total_steps=4, epoch=2.0, train_loss=0.25, eval_loss=0.5, best_eval_loss=0.4,
            steps_per_second=2.5, elapsed_seconds=12.0,
        ),
        before=EvalMetrics(examples=10, loss=2.0, exact_match=0.1, accuracy=0.5),
        after=EvalMetrics(examples=10, loss=0.5, exact_match=0.8, accuracy=None),
        version=PromptInfo(
            name="sentiment", version=4, ref="sentiment@4", num_virtual_tokens=8, hidden_size=64,
            sha256="", base_model_fingerprint="", created_at="", description="",
            peft_type="PROMPT_TUNING", metrics={"eval_loss": 0.25, "accuracy": 0.9},
        ),
        promoted=True,
        promotion="accuracy 0.9 > 0.7",
        error="",
        created_at="2025-01-02T03:04:05Z",
        finished_at="2025-01-02T03:09:05Z",
        train_examples=90,
        eval_examples=10,
    )
    assert job.done
    json.dumps(dataclasses.asdict(job))  # plain data all the way down


def test_unset_job_parts_are_none() -> None:
    job = convert.training_job(pb.TrainingJob(job_id="j", state=pb.TRAINING_STATE_RUNNING))
    assert (job.before, job.after, job.version, job.progress.eval_loss) == (None, None, None, None)
    assert job.state == "running" and not job.done
    assert convert.training_job(pb.TrainingJob()).state == ""


@pytest.mark.parametrize(
    "state, name, done",
    [
        (pb.TRAINING_STATE_QUEUED, "queued", False),
        (pb.TRAINING_STATE_RUNNING, "running", False),
        (pb.TRAINING_STATE_SUCCEEDED, "succeeded", True),
        (pb.TRAINING_STATE_FAILED, "failed", True),
        (pb.TRAINING_STATE_CANCELLED, "cancelled", True),
    ],
)
def test_training_states(state: int, name: str, done: bool) -> None:
    job = convert.training_job(pb.TrainingJob(state=state))
    assert (job.state, job.done) == (name, done)


def test_classify_result_and_prompt_metrics() -> None:
    result = convert.classify_result(pb.ClassifyResponse(
        scores=[pb.LabelScore(label="positive", logprob=-0.1, probability=0.9, num_tokens=2),
                pb.LabelScore(label="negative", logprob=-2.3, probability=0.1, num_tokens=3)],
        label="positive", prompt_version="s@2", input_tokens=5, virtual_tokens=8,
    ))
    assert result == ClassifyResult(
        scores=[LabelScore("positive", -0.1, 0.9, 2), LabelScore("negative", -2.3, 0.1, 3)],
        label="positive", prompt_version="s@2", input_tokens=5, virtual_tokens=8,
    )
    assert convert.prompt_info(pb.PromptInfo(name="x")).metrics == {}
    # Positional construction from before the metrics field still works.
    assert PromptInfo("n", 1, "n@1", 2, 3, "", "", "", "").metrics == {}


# ---------------------------------------------------------------------- fake server


def _job_pb(job_id: str, state: int, phase: str = "", step: int = 0, **extra: Any) -> pb.TrainingJob:
    """A job at `step` (no progress at all at step 0); `extra` sets or overrides fields."""
    fields: dict[str, Any] = dict(task="sentiment", created_at="2025-01-02T03:04:05Z")
    if step:
        fields["progress"] = _progress_pb(step)
    return pb.TrainingJob(job_id=job_id, state=state, phase=phase, **{**fields, **extra})


def _history(job_id: str) -> list[pb.TrainingJob]:
    """The changes WatchTrainingJob streams for a job; the id picks the story."""
    start = [
        _job_pb(job_id, pb.TRAINING_STATE_QUEUED),
        _job_pb(job_id, pb.TRAINING_STATE_RUNNING, "training", 1),
        _job_pb(job_id, pb.TRAINING_STATE_RUNNING, "training", 2),
        _job_pb(job_id, pb.TRAINING_STATE_RUNNING, "evaluating", 2,
                progress=_progress_pb(2, eval_loss=0.75, best_eval_loss=0.75)),
    ]
    if job_id == "fails":
        return [*start, _job_pb(job_id, pb.TRAINING_STATE_FAILED, error="out of memory")]
    if job_id == "ends-early":  # the stream stops before the final state; GetTrainingJob has it
        return start[:2]
    final = pb.TrainingJob()
    final.CopyFrom(FULL_JOB)
    final.job_id = job_id
    return [*start, final]


class FakeTraining(pb_grpc.TrainingServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.watch_deadlines: list[float] = []

    def TrainPrompt(self, request: pb.TrainPromptRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        if request.task.startswith("abort:"):
            _, code, message = request.task.split(":", 2)
            context.abort(grpc.StatusCode[code], message)
        return _job_pb("job-1", pb.TRAINING_STATE_QUEUED)

    def GetTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> Any:
        if request.job_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no training job 'missing'")
        history = _history(request.job_id)
        return FULL_JOB if request.job_id == "ends-early" else history[-1]

    def WatchTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> Any:
        self.watch_deadlines.append(context.time_remaining())
        if request.job_id == "sleep":
            deadline = time.monotonic() + 5
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return
        yield from _history(request.job_id)

    def CancelTrainingJob(self, request: pb.TrainingJobRequest, context: grpc.ServicerContext) -> Any:
        return _job_pb(request.job_id, pb.TRAINING_STATE_CANCELLED)

    def ListTrainingJobs(self, request: pb.ListTrainingJobsRequest, context: grpc.ServicerContext) -> Any:
        return pb.ListTrainingJobsResponse(
            jobs=[_job_pb("job-2", pb.TRAINING_STATE_RUNNING, "training", 2), FULL_JOB]
        )


class FakeInference(pb_grpc.InferenceServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> Any:
        self.requests.append(request)
        probabilities = [0.2, 0.7, 0.1][: len(request.labels)]
        return pb.ClassifyResponse(
            scores=[pb.LabelScore(label=label, logprob=-1.0 - i, probability=p, num_tokens=2)
                    for i, (label, p) in enumerate(zip(request.labels, probabilities))],
            label=request.labels[1],
            prompt_version=f"{request.task}@2" if request.task else "",
            input_tokens=5,
            virtual_tokens=8 if request.task else 0,
        )


class FakeRegistry(pb_grpc.RegistryServicer):
    def GetPrompt(self, request: pb.GetPromptRequest, context: grpc.ServicerContext) -> Any:
        return _version_pb()


class FakeServer:
    def __init__(self) -> None:
        self.training = FakeTraining()
        self.inference = FakeInference()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_TrainingServicer_to_server(self.training, self.server)
        pb_grpc.add_InferenceServicer_to_server(self.inference, self.server)
        pb_grpc.add_RegistryServicer_to_server(FakeRegistry(), self.server)
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture(scope="module")
def _server() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.server.stop(None)


@pytest.fixture
def fake(_server: FakeServer) -> FakeServer:
    _server.training.requests.clear()
    _server.training.watch_deadlines.clear()
    _server.inference.requests.clear()
    return _server


@pytest.fixture
def client(fake: FakeServer) -> Iterator[Client]:
    with Client(fake.target, timeout=10) as c:
        yield c


# ---------------------------------------------------------------------- client


def test_classify(client: Client, fake: FakeServer) -> None:
    result = client.classify("sentiment", "great", ["negative", "positive"], chat=True)
    assert result.label == "positive" and result.prompt_version == "sentiment@2"
    assert [s.label for s in result.scores] == ["negative", "positive"]
    request = fake.inference.requests[-1]
    assert list(request.labels) == ["negative", "positive"] and request.apply_chat_template


def test_train_and_wait(client: Client, fake: FakeServer) -> None:
    job = client.train("sentiment", EXAMPLES, options=CUSTOM_OPTIONS, tags={"a": "b"}, promote_alias="prod")
    assert (job.job_id, job.state) == ("job-1", "queued")
    request = fake.training.requests[-1]
    assert request.train_jsonl == EXAMPLES_JSONL and request.options.seed == 7
    assert request.promote_alias == "prod" and dict(request.tags) == {"a": "b"}

    states = [(j.state, j.phase) for j in client.watch_training_job("job-1")]
    assert states == [("queued", ""), ("running", "training"), ("running", "training"),
                      ("running", "evaluating"), ("succeeded", "done")]
    final = client.wait_for_training_job("job-1")
    assert final.done and final.version is not None and final.version.ref == "sentiment@4"
    assert client.wait_for_training_job("fails").error == "out of memory"
    assert client.wait_for_training_job("ends-early").state == "succeeded"  # asked after the watch


def test_watch_ignores_the_default_timeout(client: Client, fake: FakeServer) -> None:
    list(client.watch_training_job("job-1"))  # the client's 10 s default is not applied
    [remaining] = fake.training.watch_deadlines
    assert remaining > 3600  # gRPC reports "no deadline" as a huge time remaining
    with pytest.raises(DeadlineExceededError):
        client.wait_for_training_job("sleep", timeout=0.2)


def test_job_management(client: Client) -> None:
    assert client.get_training_job("job-1").state == "succeeded"
    assert client.cancel_training_job("job-2").state == "cancelled"
    assert [j.job_id for j in client.list_training_jobs()] == ["job-2", "job-1"]
    with pytest.raises(NotFoundError, match="no training job"):
        client.get_training_job("missing")
    with pytest.raises(InvalidArgumentError, match="bad data"):
        client.train("abort:INVALID_ARGUMENT:bad data", b"x\n")


def test_async_client(fake: FakeServer) -> None:
    async def scenario() -> None:
        async with AsyncClient(fake.target, timeout=10) as c:
            assert (await c.classify("s", "x", ["a", "b"])).label == "b"
            job = await c.train("sentiment", EXAMPLES, b"EVAL\n", options=CUSTOM_OPTIONS)
            assert job.state == "queued" and fake.training.requests[-1].eval_jsonl == b"EVAL\n"
            assert len([j async for j in c.watch_training_job("job-1")]) == 5
            assert (await c.wait_for_training_job("job-1")).state == "succeeded"
            assert (await c.wait_for_training_job("ends-early")).state == "succeeded"
            assert (await c.get_training_job("fails")).state == "failed"
            assert (await c.cancel_training_job("x")).state == "cancelled"
            assert len(await c.list_training_jobs()) == 2
            with pytest.raises(NotFoundError):
                await c.get_training_job("missing")

    asyncio.run(scenario())


# ---------------------------------------------------------------------- CLI: parsing


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def local_trainer(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Stands in for softprompt.server.app.train_local; returns the keyword arguments of each call."""
    calls: list[dict[str, Any]] = []

    def run_local_training(**kwargs: Any) -> int:
        calls.append(kwargs)
        return 0

    module = types.ModuleType("softprompt.server.app.train_local")
    module.run_local_training = run_local_training  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "softprompt.server.app.train_local", module)
    return calls


def test_train_flags_build_the_options(
    capsys: pytest.CaptureFixture[str], local_trainer: list[dict[str, Any]]
) -> None:
    code, _, err = run_cli(
        capsys, "train", "--task", "sentiment", "--data", "train.jsonl", "--store", "store",
        *CUSTOM_FLAGS,
    )
    assert code == 0, err
    assert local_trainer[-1]["options"] == CUSTOM_OPTIONS


def test_train_defaults_and_local_arguments(
    capsys: pytest.CaptureFixture[str], local_trainer: list[dict[str, Any]]
) -> None:
    code, _, err = run_cli(
        capsys, "--json", "train", "--task", "t", "--data", "d.jsonl", "--eval", "e.jsonl",
        "--store", "store", "--description", "hi", "--tag", "k=v", "--promote", "prod",
        "--output-dir", "out", "--model", "m", "--device", "cpu", "--dtype", "float32",
    )
    assert code == 0, err
    assert local_trainer[-1] == dict(
        task="t", train_path=Path("d.jsonl"), eval_path=Path("e.jsonl"), options=TrainingOptions(),
        store="store", description="hi", tags={"k": "v"}, promote_alias="prod",
        output_dir=Path("out"), model="m", device="cpu", dtype="float32", json_output=True,
    )
    run_cli(capsys, "train", "--task", "t", "--data", "d.jsonl", "--store", "s")
    assert local_trainer[-1]["eval_path"] is None and local_trainer[-1]["output_dir"] is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "argument --lr: learning_rate must be"),
        (["--eval-fraction", "1.5"], "argument --eval-fraction: eval_fraction must be"),
        (["--init", "zeros"], "argument --init: init must be"),
        (["--batch-size", "0"], "argument --batch-size: batch_size must be"),
        (["--epochs", "two"], "invalid int value"),
        (["--model", "m"], "--model only apply to local training"),
        (["--store", "s", "--no-wait"], "--no-wait only applies"),
    ],
)
def test_train_usage_errors(
    capsys: pytest.CaptureFixture[str], local_trainer: list[dict[str, Any]], flags: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, "train", "--task", "t", "--data", "d.jsonl", *flags)
    assert code == 2 and message in err and "usage: softprompt train" in err
    assert local_trainer == []


def test_local_training_without_server_extras(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = types.ModuleType("softprompt.server.app.train_local")

    def run_local_training(**kwargs: Any) -> int:
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    module.run_local_training = run_local_training  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "softprompt.server.app.train_local", module)
    code, _, err = run_cli(capsys, "train", "--task", "t", "--data", "d.jsonl", "--store", "s")
    assert code == 1 and "softprompt train --store" in err and "softprompt[server]" in err


def test_classify_labels_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["classify", "s", "x", "--labels", "positive, negative ,neutral"])
    assert args.labels == ["positive", "negative", "neutral"]
    for bad in ("positive", "a,a", "a,,b", "a,"):
        code, _, err = run_cli(capsys, "classify", "s", "x", "--labels", bad)
        assert code == 2 and "two or more distinct" in err
    code, _, err = run_cli(capsys, "classify", "s", "x")
    assert code == 2 and "--labels" in err


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "softprompt train --task" in out and "softprompt classify" in out
    for command in (["train"], ["classify"], ["jobs"], ["jobs", "watch"]):
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and "examples:" in out
    code, out, _ = run_cli(capsys, "train", "--help")
    assert "(default: 0.03)" in out and "with --store" in out
    assert run_cli(capsys, "jobs")[0] == 2


# ---------------------------------------------------------------------- CLI: against the fake


def test_cli_classify(fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(capsys, "--server", fake.target, "classify", "s", "nice", "--labels", "neg,pos,meh")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["LABEL", "PROBABILITY", "LOGPROB", "TOKENS"]
    assert lines[1].split() == ["*", "pos", "0.7000", "-2.0000", "2"]  # most likely first, marked
    assert [line.split()[0] for line in lines[2:]] == ["neg", "meh"]
    assert "s@2" in err and "5 input + 8 virtual" in err

    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    code, out, _ = run_cli(capsys, "--server", fake.target, "classify", "-", "-", "--labels", "a,b", "--json", "--chat")
    assert json.loads(out)["label"] == "b"
    request = fake.inference.requests[-1]
    assert (request.task, request.input, request.apply_chat_template) == ("", "from stdin", True)


def test_cli_train_on_the_server(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(EXAMPLES_JSONL)
    code, out, err = run_cli(
        capsys, "--server", fake.target, "train", "--task", "sentiment", "--data", str(data),
        "--promote", "prod", "--seed", "3",
    )
    assert code == 0, err
    request = fake.training.requests[-1]
    assert request.train_jsonl == EXAMPLES_JSONL and request.eval_jsonl == b""
    assert request.options.seed == 3 and request.promote_alias == "prod"
    # Not a terminal: one line per phase here (the same phase is throttled to one line per 2 s).
    progress = err.splitlines()
    assert progress[0] == "started training job job-1"
    assert progress[1:] == [
        "queued",
        "training  step 1/4  loss 1.0000  2.50 steps/s  3s",
        "evaluating  step 2/4  loss 0.5000  eval loss 0.7500  2.50 steps/s  6s",
        "done  step 4/4  loss 0.2500  eval loss 0.5000  2.50 steps/s  12s",
    ]
    assert "sentiment@4" in out and "promoted: accuracy 0.9 > 0.7" in out
    metrics = [line.split() for line in out.splitlines() if line.startswith(("before", "after"))]
    assert metrics == [["before", "10", "2.0000", "0.1000", "0.5000"], ["after", "10", "0.5000", "0.8000", "-"]]

    code, out, _ = run_cli(capsys, "--server", fake.target, "--json", "train", "--task", "t", "--data", str(data))
    assert code == 0 and json.loads(out)["version"]["ref"] == "sentiment@4"

    code, out, _ = run_cli(capsys, "--server", fake.target, "train", "--task", "t", "--data", str(data), "--no-wait")
    assert code == 0
    assert out.splitlines() == [
        "started training job job-1 (queued)",
        f"follow it with `softprompt --server {fake.target} jobs watch job-1`",
    ]

    code, _, err = run_cli(capsys, "--server", fake.target, "train", "--task", "t", "--data", str(tmp_path / "nope"))
    assert code == 1 and err.startswith("error:") and "nope" in err


def test_cli_watch_failed_job_and_json_lines(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "--server", fake.target, "jobs", "watch", "fails")
    assert code == 1 and "error: training job fails failed: out of memory" in err
    assert "out of memory" in out  # the job's fields, error included

    code, out, _ = run_cli(capsys, "--server", fake.target, "jobs", "watch", "job-1", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["state"] for line in lines] == ["queued", "running", "running", "running", "succeeded"]
    assert code == 0


def test_cli_ctrl_c_leaves_the_job_running(
    fake: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: Client, job_id: str, *, timeout: float | None = None) -> Iterator[TrainingJob]:
        yield convert.training_job(_job_pb(job_id, pb.TRAINING_STATE_RUNNING, "training", 1))
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "watch_training_job", interrupted)
    code, _, err = run_cli(capsys, "jobs", "watch", "job-9")
    assert code == 130
    assert "job-9 goes on on the server" in err and "`softprompt jobs cancel job-9`" in err


def test_cli_jobs_list_show_cancel(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--server", fake.target, "jobs", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["JOB", "TASK", "STATE"]
    assert lines[1].split()[:4] == ["job-2", "sentiment", "running", "2/4"]
    assert lines[2].split()[:6] == ["job-1", "sentiment", "succeeded", "4/4", "0.5000", "sentiment@4"]
    code, out, _ = run_cli(capsys, "--server", fake.target, "jobs", "list", "--json")
    assert [j["job_id"] for j in json.loads(out)] == ["job-2", "job-1"]

    code, out, _ = run_cli(capsys, "--server", fake.target, "jobs", "show", "job-1")
    assert code == 0 and "sentiment@4" in out and "90 training, 10 held-out" in out
    code, out, _ = run_cli(capsys, "--server", fake.target, "--json", "jobs", "show", "job-1")
    assert json.loads(out)["after"]["accuracy"] is None
    code, _, err = run_cli(capsys, "--server", fake.target, "jobs", "show", "missing")
    assert code == 1 and "NOT_FOUND" in err

    code, out, _ = run_cli(capsys, "--server", fake.target, "jobs", "cancel", "job-2")
    assert code == 0 and out.strip() == "training job job-2: cancelled"


def test_cli_show_prints_metrics(fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--server", fake.target, "show", "sentiment")
    assert code == 0 and "accuracy=0.9, eval_loss=0.25" in out


def test_cli_unimplemented_training_hint(capsys: pytest.CaptureFixture[str]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))  # serves nothing at all
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        code, _, err = run_cli(capsys, "--server", target, "jobs", "list")
    finally:
        server.stop(None)
    # A training call is what an endpoint without training (Ray Serve's) refuses: the hint says so, and what to
    # do, rather than blaming the server's age (tests/test_cli_hints.py has the other calls).
    assert code == 1 and "UNIMPLEMENTED" in err and "does not serve training" in err


# ---------------------------------------------------------------------- progress display


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _running(step: int, phase: str = "training") -> TrainingJob:
    return convert.training_job(_job_pb("j", pb.TRAINING_STATE_RUNNING, phase, step))


def test_progress_line_on_a_terminal_rewrites_one_line() -> None:
    screen = _Terminal()
    with ProgressLine(screen) as progress:
        progress.update(_running(1))
        progress.update(convert.training_job(_job_pb("j", pb.TRAINING_STATE_QUEUED)))
    first = "training  step 1/4  loss 1.0000  2.50 steps/s  3s"
    assert screen.getvalue() == f"\r{first}\r{'queued'.ljust(len(first))}\n"


def test_progress_lines_without_a_terminal_are_throttled() -> None:
    now = [0.0]
    stream = io.StringIO()
    with ProgressLine(stream, interval=2.0, clock=lambda: now[0]) as progress:
        for t, job in [(0.0, _running(1)), (1.0, _running(2)), (2.5, _running(3)),
                       (2.6, _running(3, "evaluating")), (2.7, _running(3, "evaluating"))]:
            now[0] = t
            progress.update(job)
    assert [line.split("  ")[:2] for line in stream.getvalue().splitlines()] == [
        ["training", "step 1/4"], ["training", "step 3/4"], ["evaluating", "step 3/4"],
    ]
