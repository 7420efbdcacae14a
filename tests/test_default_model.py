"""End to end on the real default model, SmolLM2-135M-Instruct from the embedded GGUF.

The first run converts the GGUF into a cached safetensors folder (about 30 s on two cores); later
runs load the cache.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import reference_greedy
from softprompt.client import Client
from softprompt.server.app.server import build_app, shutdown, start
from softprompt.server.config import ServerConfig
from softprompt.server.app.loading import load_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_base():
    return load_base_model(None, device="cpu")


@pytest.fixture(scope="module")
def served(default_base, tmp_path_factory):
    """(app, gRPC address) of a server on the default model, its HTTP API on a free port too."""
    app = build_app(ServerConfig(port=0, http_port=0, store=tmp_path_factory.mktemp("store"), batch_wait_ms=5),
                    base=default_base)
    server, port, health = start(app)
    yield app, f"127.0.0.1:{port}"
    shutdown(app, server, health, grace_s=1.0)


@pytest.fixture(scope="module")
def address(served):
    return served[1]


def _text_prompt(base, text: str) -> torch.Tensor:
    """PEFT's TEXT initialisation: the instruction's token embeddings."""
    ids = torch.tensor(base.tokenizer(text).input_ids)
    return base.model.get_input_embeddings()(ids).detach().clone()


def test_default_model_identity(default_base):
    spec = default_base.spec
    assert spec.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (spec.hidden_size, spec.num_layers, spec.vocab_size) == (576, 30, 49152)
    assert default_base.tokenizer.chat_template


def test_mixed_batch_on_default_model_matches_reference(default_base, address):
    prompts = {
        "pirate": _text_prompt(default_base, "Answer like a pirate:"),
        "french": _text_prompt(default_base, "Translate to French:"),
    }
    inputs = ["The weather today is", "My favourite food is", "Large language models are"]
    with Client(address, timeout=300) as client:
        for name, tensor in prompts.items():
            info = client.register(name, tensor, description=f"text init for {name}")
            assert info.num_virtual_tokens == tensor.shape[0]
            assert info.base_model_fingerprint == default_base.spec.fingerprint

        jobs = [(task, text) for task in ("pirate", "french", "") for text in inputs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(lambda j: client.generate(j[0], j[1], max_new_tokens=10), jobs))
        alone = [client.generate(task, text, max_new_tokens=10) for task, text in jobs]

    eos = {default_base.tokenizer.eos_token_id}
    for (task, text), a, b in zip(jobs, together, alone):
        ids = default_base.tokenizer(text).input_ids
        expected = reference_greedy(default_base.model, prompts.get(task), ids, 10, eos)
        assert list(a.token_ids) == expected, f"{task!r}/{text!r}: batched output differs from the reference"
        assert a.token_ids == b.token_ids
    assert together[0].text != together[len(inputs) * 2].text, "the prompt should change the output"


def test_chat_generation_on_default_model(default_base, address):
    with Client(address, timeout=300) as client:
        result = client.generate("", "What is the capital of France?", chat=True, max_new_tokens=24)
    tokenizer = default_base.tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    expected = reference_greedy(default_base.model, None, ids, 24, {tokenizer.eos_token_id})
    assert list(result.token_ids) == expected
    assert "Paris" in result.text


REVIEWS = [
    ("A moving, beautifully acted film.", "positive"), ("Dull, long and pointless.", "negative"),
    ("I loved every minute of it.", "positive"), ("The worst movie I have seen this year.", "negative"),
    ("Funny, warm and smart.", "positive"), ("A tedious mess with no story.", "negative"),
    ("The cast is wonderful.", "positive"), ("Badly written and badly directed.", "negative"),
    ("A delightful surprise.", "positive"), ("I walked out after an hour.", "negative"),
    ("Gripping from start to finish.", "positive"), ("Painfully boring.", "negative"),
    ("An instant classic.", "positive"), ("A waste of a good cast.", "negative"),
    ("Charming and heartfelt.", "positive"), ("Lazy, loud and forgettable.", "negative"),
]
HELD_OUT = [("A joy to watch.", "positive"), ("Awful in every way.", "negative"),
            ("Brilliant and touching.", "positive"), ("Clumsy and dull.", "negative")]


def test_training_on_default_model_registers_a_better_prompt_that_classifies(address):
    """A few steps of server-side training on the real model: held-out loss falls, and the version serves."""
    from softprompt.client import TrainingOptions

    rows = lambda pairs: [{"input": i, "target": t} for i, t in pairs]  # noqa: E731
    options = TrainingOptions(max_steps=6, batch_size=4, eval_every=3)
    with Client(address, timeout=600) as client:
        job = client.train("sentiment", rows(REVIEWS), rows(HELD_OUT), options=options, promote_alias="prod")
        done = client.wait_for_training_job(job.job_id, timeout=600)
        assert done.state == "succeeded", done.error
        assert done.after.loss < done.before.loss
        assert done.version.num_virtual_tokens == 20 and done.promoted
        result = client.classify("sentiment@prod", "What a lovely film.", ["positive", "negative"])
        assert result.prompt_version == done.version.ref and result.virtual_tokens == 20
        assert sum(s.probability for s in result.scores) == pytest.approx(1.0)


def test_the_openai_sdk_chats_with_the_default_model_as_grpc_does(served):
    """Issue 13's path on the real model: its chat template, through the official SDK, equals gRPC's chat."""
    import openai

    app, address = served
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key="-", max_retries=0)
    question = "What is the capital of France?"
    out = sdk.chat.completions.create(model=app.base.spec.model_id, messages=[{"role": "user", "content": question}],
                                      max_tokens=24, temperature=0)
    with Client(address, timeout=300) as client:
        expected = client.generate("", question, chat=True, max_new_tokens=24)
    assert out.choices[0].message.content == expected.text and "Paris" in expected.text


def test_the_tours_prompt_visibly_changes_the_answer(address):
    """README's tour registers examples/pirate-prompt (trained once on examples/pirate.jsonl) and compares it
    with the bare model: the newcomer must see the prompt at work, not the same text twice."""
    from pathlib import Path

    folder = Path(__file__).parent.parent / "examples" / "pirate-prompt"
    with Client(address, timeout=300) as client:
        client.register("tour-pirate", folder)
        for text in ("Tell me about the sea.", "Hello!"):
            pirate = client.generate("tour-pirate", text, chat=True, max_new_tokens=40).text
            bare = client.generate("", text, chat=True, max_new_tokens=40).text
            assert pirate != bare
            assert "arr" in pirate.lower() and "matey" in pirate.lower(), pirate
            assert "matey" not in bare.lower(), bare
