"""Training results within reach: `softprompt export TASK@N DIR` and `Client.export_prompt` fetch every file of a
version from the server (the adapter, softprompt.json, training.json, loss.png); progress is a bar on a terminal
and a few lines when redirected; `softprompt train --s3-endpoint-url` reaches an S3-compatible store.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
import torch

from helpers import running_server, synthetic, to_jsonl
from softprompt.client import AsyncClient, Client, NotFoundError
from softprompt.client import convert
from softprompt.client.cli import main
from softprompt.client.cli.render import ProgressLine
from softprompt.prompts.format.layout import LOSS_PLOT, METADATA, PEFT_CONFIG, PEFT_WEIGHTS, TRAINING_REPORT
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry
from softprompt.prompts.results import Progress
from softprompt.protos import softprompt_pb2 as pb

REPORT = b'{"steps": 5}\n'
PLOT = b"\x89PNG\r\n\x1a\nnot really a plot"


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    """A server over a store holding `trained@1` (with a report and a loss plot) and `uploaded@1`."""
    store = tmp_path_factory.mktemp("store")
    registry = Registry(store)
    hidden = tiny_base.spec.hidden_size
    registry.register("trained", PromptTensor(torch.randn(4, hidden), "PROMPT_TUNING"), tiny_base.spec,
                      attachments={TRAINING_REPORT: REPORT, LOSS_PLOT: PLOT})
    registry.register("uploaded", PromptTensor(torch.randn(3, hidden), "RAW"), tiny_base.spec)
    with running_server(tiny_base, store) as (app, address):
        yield app, address


def test_the_client_fetches_every_file_of_a_version(served, tmp_path):
    app, address = served
    with Client(address, timeout=60) as client:
        exported = client.export_prompt("trained@1", tmp_path / "out")
    assert exported.prompt.ref == "trained@1" and exported.directory == tmp_path / "out"
    assert set(exported.files) == {PEFT_CONFIG, PEFT_WEIGHTS, METADATA, TRAINING_REPORT, LOSS_PLOT}
    stored = app.registry.files(app.registry.resolve("trained@1"))
    for name in exported.files:
        assert (tmp_path / "out" / name).read_bytes() == stored[name]
    assert (tmp_path / "out" / LOSS_PLOT).read_bytes() == PLOT


def test_the_exported_folder_loads_with_peft(served, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    app, address = served
    with Client(address, timeout=60) as client:
        client.export_prompt("uploaded", tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    weights = model.prompt_encoder["default"].embedding.weight
    assert torch.equal(weights, app.registry.load_embeddings(app.registry.resolve("uploaded@1")))


def test_the_async_client_exports_too(served, tmp_path):
    async def run():
        async with AsyncClient(served[1], timeout=60) as client:
            return await client.export_prompt("uploaded@1", tmp_path / "a")

    assert set(asyncio.run(run()).files) == {PEFT_CONFIG, PEFT_WEIGHTS, METADATA}


def test_the_cli_exports(served, tmp_path, capsys):
    address = served[1]
    assert main(["--server", address, "export", "trained@1", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"exported trained@1 to {tmp_path / 'cli'}: ") and "loss.png" in out
    assert (tmp_path / "cli" / TRAINING_REPORT).read_bytes() == REPORT
    assert main(["--server", address, "--json", "export", "trained", str(tmp_path / "j")]) == 0
    assert json.loads(capsys.readouterr().out)["ref"] == "trained@1"
    assert main(["--server", address, "export", "nosuch@1", str(tmp_path / "x")]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with Client(address, timeout=60) as client, pytest.raises(NotFoundError):
        client.export_prompt("trained@9", tmp_path / "y")


def test_a_file_name_reaching_outside_the_folder_is_refused(tmp_path):
    for name in ("../escape.txt", "a/b", ".hidden", "", "a\\b"):
        message = pb.ExportPromptResponse(prompt=pb.PromptInfo(name="t", version=1, ref="t@1"),
                                          files=[pb.PromptFile(name="ok.json", data=b"{}"),
                                                 pb.PromptFile(name=name, data=b"x")])
        with pytest.raises(ValueError, match="not a plain file name"):
            convert.exported_prompt(message, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.txt").exists()


# ---------------------------------------------------------------- progress when redirected


def _progress(step: int, phase: str) -> Progress:
    return Progress(phase, step, 100, step / 10, 1.0, 0.5 if phase == "evaluating" else None, 0.5, 2.0, step)


def test_a_redirected_local_run_logs_a_few_lines(caplog):
    from softprompt.server.app.train_local import _ProgressView

    caplog.set_level(logging.INFO, logger="softprompt.train")
    view = _ProgressView(interactive=False)
    for step in range(1, 101):  # 100 steps, a held-out evaluation every 10
        view.update(_progress(step, "training"))
        if step % 10 == 0:
            view.update(_progress(step, "evaluating"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("training: step 1/100") and lines[1].startswith("evaluating")


def _job(step: int, phase: str, state: int = pb.TRAINING_STATE_RUNNING):
    return convert.training_job(pb.TrainingJob(
        job_id="j", task="t", state=state, phase=phase,
        progress=pb.TrainingProgress(step=step, total_steps=100, train_loss=1.0, steps_per_second=2.0)))


def test_a_redirected_watch_prints_a_few_lines():
    stream = io.StringIO()
    with ProgressLine(stream) as progress:
        progress.update(_job(0, "", pb.TRAINING_STATE_QUEUED))
        for step in range(1, 101):
            progress.update(_job(step, "training"))
            if step % 10 == 0:
                progress.update(_job(step, "evaluating"))
        progress.update(_job(100, "registering"))
        progress.update(_job(100, "", pb.TRAINING_STATE_SUCCEEDED))
    assert [line.split("  ")[0] for line in stream.getvalue().splitlines()] == [
        "queued", "training", "evaluating", "registering", "succeeded"]


# ---------------------------------------------------------------- train --store s3:// --s3-endpoint-url


def test_local_training_into_an_s3_compatible_store(tiny_model_dir, s3_endpoint_url, s3_bucket, tmp_path, capsys):
    from softprompt.prompts.registry.s3 import S3Store

    (tmp_path / "train.jsonl").write_text(to_jsonl(synthetic(16, 1)))
    status = main(["train", "--task", "sent", "--data", str(tmp_path / "train.jsonl"),
                   "--store", f"s3://{s3_bucket}/prompts", "--s3-endpoint-url", s3_endpoint_url,
                   "--model", str(tiny_model_dir), "--device", "cpu", "--num-virtual-tokens", "4",
                   "--max-steps", "2", "--output-dir", str(tmp_path / "run"), "--json"])
    assert status == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["version"] == "sent@1"
    store = S3Store(s3_bucket, "prompts", endpoint_url=s3_endpoint_url, cache_dir=tmp_path / "cache")
    assert Registry(store=store).resolve("sent").version == 1


def test_the_s3_endpoint_applies_to_local_training_only(capsys):
    assert main(["train", "--task", "t", "--data", "d.jsonl", "--s3-endpoint-url", "http://minio:9000"]) == 2
    assert "--s3-endpoint-url only apply to local training" in capsys.readouterr().err
