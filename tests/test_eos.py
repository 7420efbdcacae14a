"""How outputs end: every end id of the generation config, and the chat template's end of turn.

The model here is the tiny one with two changes real chat models have: its generation config lists
several end ids (the tokenizer's eos, `<|endoftext|>`, first), and its chat template ends a turn
with another token (`<|im_end|>`), so only a Classify or a training run that follows the template
scores what the model writes at the end of an answer.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import FAST, TINY_CHAT_TEMPLATE, reference_greedy, running_server
from softprompt.client import Client
from softprompt.prompts.data import Example
from softprompt.prompts.errors import ChatTemplateError
from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.tokens import end_of_turn_id, eos_token_ids, target_end_id
from softprompt.prompts.train import PromptTrainer
from softprompt.server.core.engine import Engine, Sequence
from softprompt.prompts.options import DecodingOptions

TEXT = "the quick brown fox"
NEW = 12


@pytest.fixture(scope="module")
def ending(tiny_base, tiny_model_dir, tmp_path_factory):
    """(base, second end id, its step): the tiny model whose generation config ends at [<|endoftext|>, a token
    it writes a few steps into TEXT], with <|endoftext|> as the tokenizer's eos."""
    from transformers import AutoTokenizer

    from softprompt.server.app.loading import load_base_model

    tok = tiny_base.tokenizer
    free = reference_greedy(tiny_base.model, None, tok(TEXT).input_ids, NEW, set())
    step = next(k for k in range(2, NEW) if free[k] not in free[:k] and free[k] not in tok.all_special_ids)
    path = tmp_path_factory.mktemp("ending")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    AutoTokenizer.from_pretrained(tiny_model_dir, eos_token="<|endoftext|>").save_pretrained(path)
    config = json.loads((path / "generation_config.json").read_text())
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    config["eos_token_id"] = [end, free[step]]
    (path / "generation_config.json").write_text(json.dumps(config))
    base = load_base_model(str(path), device="cpu")
    assert eos_token_ids(base.model, base.tokenizer) == (end, free[step])
    return base, free[step], step


@pytest.fixture(scope="module")
def served(ending, tmp_path_factory):
    with running_server(ending[0], tmp_path_factory.mktemp("store"), batch_wait_ms=5) as (app, address):
        with Client(address, timeout=60) as client:
            yield app, client


def test_every_end_id_of_the_generation_config_ends_a_row(ending, served):
    base, second, step = ending
    engine = Engine(base)
    assert engine.eos_ids == {base.tokenizer.eos_token_id, second}
    input_ids = base.tokenizer(TEXT).input_ids
    expected = reference_greedy(base.model, None, input_ids, NEW, engine.eos_ids)
    assert expected[-1] == second and len(expected) == step + 1
    # The test can fail: with only the first end id the row would run on.
    assert len(reference_greedy(base.model, None, input_ids, NEW, {base.tokenizer.eos_token_id})) == NEW
    seq = Sequence(request_id=0, input_ids=input_ids, params=DecodingOptions(max_new_tokens=NEW))
    engine.start(seq)
    batch, _ = engine.prefill([seq])
    while seq.finish_reason is None:
        engine.decode(batch)
    assert (seq.generated, seq.finish_reason) == (expected, "eos")
    client = served[1]
    result = client.generate("", TEXT, max_new_tokens=NEW)
    assert (list(result.token_ids), result.finish_reason) == (expected, "eos")
    chunks = list(client.stream("", TEXT, max_new_tokens=NEW))
    assert [t for c in chunks for t in c.token_ids] == expected and chunks[-1].finish_reason == "eos"


def _reference_logprob(model, input_ids: list[int], continuation: list[int]) -> float:
    """log p(continuation | input) by one plain forward over the whole sequence."""
    ids = torch.tensor([input_ids + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(input_ids) - 1 + k, t]) for k, t in enumerate(continuation))


def test_classify_with_the_chat_template_scores_labels_ended_by_the_end_of_turn(ending, served):
    base, tok = ending[0], ending[0].tokenizer
    eos, turn = tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == turn != eos
    labels = ["great", "awful film"]
    client = served[1]
    chat_input = tok(tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False).input_ids
    for chat, input_ids, end in ((True, chat_input, turn), (False, tok("hello").input_ids, eos)):
        result = client.classify("", "hello", labels, chat=chat)
        for label, score in zip(labels, result.scores):
            label_ids = tok(label, add_special_tokens=False).input_ids
            assert score.num_tokens == len(label_ids) + 1
            assert score.logprob == pytest.approx(_reference_logprob(base.model, input_ids, [*label_ids, end]), abs=1e-4)
            if chat:  # the test can fail: ended by eos, the score is another
                other = _reference_logprob(base.model, input_ids, [*label_ids, eos])
                assert abs(score.logprob - other) > 1e-2


def test_chat_training_ends_targets_as_classify_scores_labels(ending, served):
    """A target trained in chat mode costs exactly what Classify with the chat template scores for it."""
    base = ending[0]
    client = served[1]
    for chat in (True, False):
        trainer = PromptTrainer(base.model, base.tokenizer, TrainingOptions(apply_chat_template=chat, **FAST))
        assert trainer.target_end == served[0].admission.label_end(chat=chat)
        [encoded] = trainer.encode([Example("hello", "great")])
        loss = trainer.evaluate(None, [encoded], None).loss * len(encoded.target_ids)
        score = client.classify("", "hello", ["great", "awful"], chat=chat).scores[0]
        assert score.num_tokens == len(encoded.target_ids)
        assert -loss == pytest.approx(score.logprob, abs=1e-4)


@pytest.mark.parametrize(("template", "expected"), [
    (TINY_CHAT_TEMPLATE, "<|im_end|>"),
    # Llama 2 style: a space, then the tokenizer's eos, ends an answer.
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>{{ m['content'] }}"
     "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}", "<|endoftext|>"),
    # Turns end with plain text: the model ends its answer with end-of-sequence.
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}", None),
])
def test_end_of_turn_is_the_first_special_token_after_the_content(ending, template, expected):
    base = ending[0]
    tok = base.tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = template
        turn = end_of_turn_id(tok)
        assert turn == (None if expected is None else tok.convert_tokens_to_ids(expected))
        assert target_end_id(base.model, tok, chat=True) == (tok.eos_token_id if turn is None else turn)
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize(("template", "message"), [
    (None, "has no chat template"),
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ raise_exception('no answers') }}{% endif %}"
     "{% endfor %}", "cannot render an assistant turn (no answers)"),
    ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}",
     "drops an assistant turn's content"),
])
def test_a_template_without_a_known_end_of_turn_is_refused(ending, template, message):
    tok = ending[0].tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = template
        with pytest.raises(ChatTemplateError, match=message.replace("(", r"\(").replace(")", r"\)")):
            end_of_turn_id(tok)
    finally:
        tok.chat_template = saved
