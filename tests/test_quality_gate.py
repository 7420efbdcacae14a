"""The quality gate and the bare name: a version the gate turns down is a candidate the bare name never serves.

A team sends production traffic to `sent` (or `sent@prod`) and gates its training runs with `--promote prod`.
A run that does not beat `sent@prod` must change nothing that traffic sees: it is registered (named, listed,
exportable) as a candidate, and `sent` keeps meaning the version it meant. A run that wins, an ungated run
and a plain registration move the bare name as before.
"""

from __future__ import annotations

import pytest
import torch

from helpers import FAST, running_server, synthetic
from softprompt.client import Client
from softprompt.client.cli import main
from softprompt.prompts.errors import PromptNotFoundError
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.pipeline import execute, plan
from softprompt.prompts.registry import Registry
from softprompt.prompts.train import PromptTrainer

TRAIN, HELD = synthetic(48, 1), synthetic(16, 2)


def _run(tiny_base, registry: Registry, promote: str = "prod", **kw):
    options = TrainingOptions(**{**FAST, **kw})
    trainer = PromptTrainer(tiny_base.model, tiny_base.tokenizer, options)
    return execute(plan(registry, tiny_base.spec, "sent", TRAIN, HELD, options, promote_alias=promote),
                   trainer, registry, tiny_base.spec)


@pytest.fixture(scope="module")
def gated(tiny_base, tmp_path_factory):
    """sent@1 won the gate (sent@prod); sent@2, far worse, lost it."""
    registry = Registry(tmp_path_factory.mktemp("store"))
    good = _run(tiny_base, registry, epochs=10)
    worse = _run(tiny_base, registry, epochs=1, max_steps=1, learning_rate=1e-4)
    return registry, good, worse


def test_a_rejected_version_is_a_candidate_the_bare_name_does_not_serve(gated):
    registry, good, worse = gated
    assert good.promotion.promoted and not good.version.candidate
    assert not worse.promotion.promoted and worse.version.candidate
    message = worse.promotion.message
    assert "does not beat sent@1" in message and "@prod stays on sent@1" in message and "candidate" in message
    assert registry.resolve("sent").ref == "sent@1"  # not the newer, rejected sent@2
    assert registry.resolve("sent@2").candidate and registry.resolve("sent@prod").ref == "sent@1"
    assert [v.ref for v in registry.list_page("sent")[0]] == ["sent@2", "sent@1"]  # listed all the same


def test_the_gate_is_recorded_in_the_report(gated):
    import json

    from softprompt.prompts.format.layout import TRAINING_REPORT

    registry, good, worse = gated
    report = json.loads(registry.attachments(worse.version)[TRAINING_REPORT])
    assert report["quality_gate"]["alias"] == "prod" and report["quality_gate"]["passed"] is False
    assert json.loads(registry.attachments(good.version)[TRAINING_REPORT])["quality_gate"]["passed"] is True


def test_registering_and_ungated_runs_still_move_the_bare_name(tiny_base, tmp_path):
    registry = Registry(tmp_path)
    _run(tiny_base, registry, epochs=10)
    rejected = _run(tiny_base, registry, epochs=1, max_steps=1, learning_rate=1e-4)
    assert rejected.version.candidate and registry.resolve("sent").version == 1
    ungated = _run(tiny_base, registry, promote="", epochs=1, max_steps=1)
    assert ungated.promotion is None and not ungated.version.candidate
    assert registry.resolve("sent").version == ungated.version.version == 3
    upload = registry.register("sent", PromptTensor(torch.zeros(4, tiny_base.spec.hidden_size), "RAW"),
                               tiny_base.spec)
    assert registry.resolve("sent").version == upload.version == 4


def test_only_candidates_left_names_them(tiny_base, tmp_path):
    registry = Registry(tmp_path)
    _run(tiny_base, registry, epochs=10)
    _run(tiny_base, registry, epochs=1, max_steps=1, learning_rate=1e-4)
    registry.delete("sent@1", force=True)
    with pytest.raises(PromptNotFoundError, match=r"only candidate versions \(sent@2\).*'sent@2'"):
        registry.resolve("sent")
    assert registry.resolve("sent@2").candidate


def test_the_server_serves_and_shows_candidates_so(gated, tiny_base, tmp_path, capsys):
    registry, _, _ = gated
    with running_server(tiny_base, registry.store.root, http_port=0) as (app, address), Client(address, timeout=60) as client:
        assert client.generate("sent", "the quick brown fox great", max_new_tokens=2).prompt_version == "sent@1"
        assert client.get_prompt("sent@2").candidate and not client.get_prompt("sent").candidate
        assert client.classify("sent", "lazy dog awful", ["positive", "negative"]).prompt_version == "sent@1"
        import httpx

        ids = {m["id"]: m["root"] for m in httpx.get(f"http://127.0.0.1:{app.http_port}/v1/models").json()["data"]}
        assert ids["sent"] == "sent@1" and ids["sent@2"] == "sent@2"
        assert main(["--server", address, "show", "sent@2"]) == 0
        assert "candidate" in capsys.readouterr().out
        assert main(["--server", address, "list", "sent"]) == 0
        out = capsys.readouterr().out
        assert "sent@2" in out and "candidate" in out
