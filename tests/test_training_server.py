"""Server-side training and Classify over a real port, through the Python client.

The server trains on its own in-memory model (interleaved with serving) and registers the result,
which the next request serves. Classify's scores are checked against a full forward without cache.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from helpers import make_peft_adapter, reference_greedy, running_server
from softprompt.client import Client, TrainingOptions
from softprompt.client import errors as client_errors
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from helpers import synthetic as _synthetic
from helpers import to_jsonl



def synthetic(n: int, seed: int) -> list[dict[str, str]]:
    return [{"input": e.input, "target": e.target} for e in _synthetic(n, seed)]


FAST = TrainingOptions(num_virtual_tokens=4, learning_rate=0.1, batch_size=8, patience=0, epochs=4)
ENDLESS = TrainingOptions(num_virtual_tokens=4, learning_rate=0.1, batch_size=8, patience=0, epochs=10_000)


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    with running_server(tiny_base, tmp_path_factory.mktemp("store"), max_batch_size=8, max_new_tokens=64,
                          default_max_new_tokens=8, max_virtual_tokens=32, batch_wait_ms=2, train_share=0.5) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    with Client(server[1], timeout=120) as c:
        yield c


def _wait_running(client: Client, job_id: str):
    for job in client.watch_training_job(job_id, timeout=120):
        if job.state == "running" and job.progress is not None and job.progress.step >= 1:
            return job
        assert not job.done, job
    raise AssertionError("the job never started")


def test_server_side_job_registers_a_version_that_serves(client, server, tiny_base):
    app = server[0]
    job = client.train("sent", synthetic(48, 1), synthetic(16, 2), options=FAST, description="cue words",
                       tags={"team": "qa"}, promote_alias="prod")
    assert job.state in ("queued", "running") and job.train_examples == 48 and job.eval_examples == 16
    done = client.wait_for_training_job(job.job_id, timeout=300)
    assert done.state == "succeeded", done.error
    assert done.after.loss < done.before.loss and done.promoted
    assert done.version.ref == "sent@1" and done.version.metrics["eval_loss"] == pytest.approx(done.after.loss)
    # Warmed like an upload: the version's tensor and prefix are cached before the job reports success.
    key = (done.version.name, done.version.version, done.version.sha256)
    assert key in app.prompts.lru._items and key in app.admission.engine.prefixes._items
    info = client.get_prompt("sent@prod")
    assert info.version == 1 and info.description == "cue words" and info.tags == {"team": "qa"}
    assert any(j.job_id == job.job_id for j in client.list_training_jobs())

    # The next request serves the new version, exactly like the reference over its stored prompt.
    prompt = app.registry.load_embeddings(app.registry.resolve("sent@1"))
    text = "the lazy dog great"
    ids = tiny_base.tokenizer(text).input_ids
    expected = reference_greedy(tiny_base.model, prompt, ids, 8, {tiny_base.tokenizer.eos_token_id})
    result = client.generate("sent@prod", text, max_new_tokens=8)
    assert result.token_ids == expected and result.prompt_version == "sent@1"


def test_cancel_stops_a_running_job_and_registers_nothing(client):
    job = client.train("endless", synthetic(32, 3), synthetic(8, 4), options=ENDLESS)
    _wait_running(client, job.job_id)
    client.cancel_training_job(job.job_id)
    final = client.wait_for_training_job(job.job_id, timeout=120)
    assert final.state == "cancelled" and final.version is None
    with pytest.raises(client_errors.NotFoundError):
        client.get_prompt("endless")


def test_serving_continues_while_a_job_runs(client, tiny_base):
    job = client.train("busy", synthetic(32, 5), None, options=ENDLESS)
    _wait_running(client, job.job_id)
    eos = {tiny_base.tokenizer.eos_token_id}
    texts = ["the quick brown fox", "hello", "one frozen model"]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda t: client.generate("", t, max_new_tokens=6), texts))
    for text, result in zip(texts, results):
        assert result.token_ids == reference_greedy(tiny_base.model, None, tiny_base.tokenizer(text).input_ids, 6, eos)
    assert client.get_training_job(job.job_id).state == "running"
    client.cancel_training_job(job.job_id)
    assert client.wait_for_training_job(job.job_id, timeout=120).state == "cancelled"


def test_bad_training_requests_get_precise_statuses(client, server):
    good = to_jsonl(_synthetic(8, 1)).encode()
    with pytest.raises(client_errors.InvalidArgumentError, match="line 2: not valid JSON"):
        client.train("t", good[:40] + b"\n{oops\n")
    with pytest.raises(client_errors.InvalidArgumentError, match="holds no examples"):
        client.train("t", b"")
    with pytest.raises(client_errors.NotFoundError, match="no-such-task"):
        client.train("t", good, options=TrainingOptions(init="from:no-such-task"))
    with pytest.raises(client_errors.InvalidArgumentError, match="never uses"):
        client.train("t", synthetic(20, 1), [{"input": "x", "target": "neutral"}])
    with pytest.raises(client_errors.InvalidArgumentError, match="exceeds this server's limit 32"):
        client.train("t", good, options=TrainingOptions(num_virtual_tokens=33))
    with pytest.raises(client_errors.InvalidArgumentError):
        client.train("bad/name", good)
    with pytest.raises(client_errors.NotFoundError, match="no training job"):
        client.get_training_job("nope")
    with grpc.insecure_channel(server[1]) as channel:
        stub = pb_grpc.TrainingStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.TrainPrompt(pb.TrainPromptRequest(task="t", train_jsonl=good,
                                                   options=pb.TrainingOptions(learning_rate=-1)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "learning_rate" in info.value.details()
    # Still serving.
    assert client.generate("", "hello", max_new_tokens=2).usage.generated_tokens == 2


def _reference_logprob(model, prompt, input_ids, label_ids) -> float:
    embed = model.get_input_embeddings()
    with torch.no_grad():
        x = embed(torch.tensor([input_ids + label_ids]))
        if prompt is not None:
            x = torch.cat([prompt[None], x], 1)
        logp = model(inputs_embeds=x, use_cache=False).logits[0].float().log_softmax(-1)
    start = (0 if prompt is None else prompt.shape[0]) + len(input_ids) - 1
    return float(sum(logp[start + j, t] for j, t in enumerate(label_ids)))


def test_classify_matches_the_reference_in_mixed_batches(client, server, tiny_base, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = make_peft_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "a",
                                num_virtual_tokens=6, seed=5)
    client.register("scorer", str(adapter))
    app = server[0]
    prompt = app.registry.load_embeddings(app.registry.resolve("scorer"))
    tok, eos = tiny_base.tokenizer, tiny_base.tokenizer.eos_token_id
    labels = ["great", "awful", "boring film"]
    cases = [("scorer", "the movie was"), ("", "the movie was"), ("scorer", "a soft prompt"), ("", "one frozen model")]
    barrier = threading.Barrier(len(cases))

    def classify(case):
        barrier.wait()
        return client.classify(case[0], case[1], labels)

    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(classify, cases))
    for (task, text), result in zip(cases, together):
        p = prompt if task else None
        ids = tok(text).input_ids
        for label, score in zip(labels, result.scores):
            label_ids = [*tok(label, add_special_tokens=False).input_ids, eos]
            assert score.label == label and score.num_tokens == len(label_ids)
            assert score.logprob == pytest.approx(_reference_logprob(tiny_base.model, p, ids, label_ids), abs=1e-3)
        assert result.label == max(result.scores, key=lambda s: s.logprob).label
        assert sum(s.probability for s in result.scores) == pytest.approx(1.0)
        assert result.virtual_tokens == (6 if task else 0) and result.input_tokens == len(ids)
        alone = client.classify(task, text, labels)
        assert [s.logprob for s in alone.scores] == pytest.approx([s.logprob for s in result.scores], abs=1e-4)


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        (["only"], client_errors.InvalidArgumentError, "at least two"),
        (["a", "a"], client_errors.InvalidArgumentError, "distinct"),
        (["a", " "], client_errors.InvalidArgumentError, "empty"),
    ],
)
def test_classify_refuses_bad_labels(client, labels, error, message):
    with pytest.raises(error, match=message):
        client.classify("", "hello", labels)


def test_classify_unknown_task_is_not_found(client):
    with pytest.raises(client_errors.NotFoundError):
        client.classify("nobody", "hello", ["a", "b"])


def test_cli_trains_on_the_server_and_classifies(server, tmp_path, capsys):
    from softprompt.client.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text(to_jsonl(_synthetic(24, 7)))
    status = main(["--server", server[1], "train", "--task", "cli-task", "--data", str(data), "--epochs", "1",
                   "--num-virtual-tokens", "4", "--lr", "0.1"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "cli-task@1" in captured.out
    status = main(["--server", server[1], "--json", "classify", "cli-task", "the dog great", "--labels",
                   "positive,negative"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert [s["label"] for s in result["scores"]] == ["positive", "negative"] and result["prompt_version"] == "cli-task@1"
    status = main(["--server", server[1], "jobs", "list"])
    assert status == 0 and "cli-task" in capsys.readouterr().out
