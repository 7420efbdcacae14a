"""Training: the trainer on a tiny model, PEFT round trip, data errors, quality gate, local CLI.

Tests make their own small synthetic task: the input ends with a cue word and the target is the
label that cue stands for, so a prompt can learn it and a held-out set measures that it did.
"""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.prompts import inject
from softprompt.prompts.data import Example, labels_of, load_jsonl, parse_jsonl, split
from softprompt.prompts.errors import TrainingDataError
from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.pipeline import execute, plan
from softprompt.prompts.registry import Registry
from softprompt.prompts.train import PromptTrainer, TrainingCancelled

from helpers import FAST, synthetic, to_jsonl

def test_training_lowers_held_out_loss_and_raises_accuracy(tiny_base):
    options = TrainingOptions(epochs=12, eval_every=8, **FAST)
    trainer = PromptTrainer(tiny_base.model, tiny_base.tokenizer, options)
    result = trainer.fit(synthetic(64, 1), synthetic(16, 2), trainer.initial_prompt())
    assert result.before is not None and result.after is not None
    assert result.after.loss < result.before.loss * 0.7
    assert result.after.accuracy is not None and result.after.accuracy > result.before.accuracy
    assert result.steps == 96 and result.stop_reason == "completed"
    held = [p.eval_loss for p in result.curve if p.eval_loss is not None]
    assert len(held) == 13 and held[0] == result.before.loss  # step 0, then every 8 steps
    assert min(held) == pytest.approx(result.after.loss, rel=1e-4)
    # The base model stays frozen.
    assert all(not p.requires_grad for p in tiny_base.model.parameters())


def test_trained_prompt_serves_exactly_as_it_trained(tiny_base):
    """The loss the trainer optimises is the serving path's: same logits with left padding in a batch."""
    torch.manual_seed(0)
    prompt = torch.randn(5, tiny_base.model.config.hidden_size) * 0.5
    ids = [tiny_base.tokenizer("the quick brown fox").input_ids, tiny_base.tokenizer("hello").input_ids]
    target = tiny_base.tokenizer(" jumps", add_special_tokens=False).input_ids
    with torch.no_grad():
        scored = inject.score_continuations(tiny_base.model, [prompt, None], ids, [target, target])
        lp, mask = scored.logprobs, scored.mask
        x = inject.build_inputs(tiny_base.model.get_input_embeddings(), [prompt, None], [i + target for i in ids])
        logits = tiny_base.model(inputs_embeds=x.embeds, attention_mask=x.attention_mask,
                                 position_ids=x.position_ids).logits.float()
        alone = tiny_base.model(inputs_embeds=torch.cat(
            [prompt[None], tiny_base.model.get_input_embeddings()(torch.tensor([ids[0] + target]))], 1)).logits.float()
    # Left-padded batch (serving) vs right-padded scoring (training): row 0 alone is the reference.
    width = x.embeds.shape[1]
    for j, token in enumerate(target):
        col = width - len(target) - 1 + j
        expected = alone[0, 5 + len(ids[0]) - 1 + j].log_softmax(-1)[token]
        assert logits[0, col].log_softmax(-1)[token] == pytest.approx(float(expected), abs=1e-4)
        assert float(lp[0, j]) == pytest.approx(float(expected), abs=1e-4)
    assert mask.sum() == 2 * len(target)


def test_exact_match_is_what_greedy_generation_produces(tiny_base):
    """A teacher-forced row counts as an exact match exactly when greedy decoding reproduces it."""
    from helpers import reference_greedy

    torch.manual_seed(1)
    prompt = torch.randn(3, tiny_base.model.config.hidden_size) * 0.5
    eos = tiny_base.tokenizer.eos_token_id
    inputs = [tiny_base.tokenizer(t).input_ids for t in ("the quick brown fox", "hello", "a soft prompt")]
    # Targets: the greedy output itself and a copy with one token changed.
    targets = [reference_greedy(tiny_base.model, prompt, ids, 4, {eos}) for ids in inputs]
    perturbed = [[*t[:-1], (t[-1] + 1) % 50] for t in targets]
    with torch.no_grad():
        scored = inject.score_continuations(tiny_base.model, [prompt] * 6, inputs * 2, targets + perturbed)
    expected = [reference_greedy(tiny_base.model, prompt, ids, len(t), {eos}) == t
                for ids, t in zip(inputs * 2, targets + perturbed)]
    assert scored.greedy_rows().tolist() == expected
    assert any(expected) and not all(expected)


def test_trained_version_loads_in_peft_with_the_same_logits(tiny_base, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    registry = Registry(tmp_path / "store")
    options = TrainingOptions(epochs=2, **FAST)
    trainer = PromptTrainer(tiny_base.model, tiny_base.tokenizer, options)
    p = plan(registry, tiny_base.spec, "sent", synthetic(32, 3), synthetic(8, 4), options)
    outcome = execute(p, trainer, registry, tiny_base.spec)
    version_dir = registry.export(outcome.version, tmp_path / "exported")
    assert (version_dir / "training.json").exists() and (version_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((version_dir / "training.json").read_text())
    assert report["options"]["num_virtual_tokens"] == 4 and report["data"]["train_examples"] == 32
    assert outcome.version.metrics["eval_loss"] == pytest.approx(outcome.result.after.loss)

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(version_dir))
    ids = torch.tensor([tiny_base.tokenizer("the lazy dog great").input_ids])
    prompt = registry.load_embeddings(outcome.version)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits[0, -1]
        x = inject.build_inputs(tiny_base.model.get_input_embeddings(), [prompt], ids.tolist())
        ours = tiny_base.model(inputs_embeds=x.embeds, attention_mask=x.attention_mask,
                               position_ids=x.position_ids).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    # The serving engine (cached prefix KV, decode steps) generates what PEFT's own forward picks greedily.
    from softprompt.server.core.engine import Engine, Sequence
    from softprompt.prompts.options import DecodingOptions

    engine = Engine(tiny_base, prefix_cache_bytes=1 << 20)
    seq = Sequence(request_id=1, input_ids=ids[0].tolist(), params=DecodingOptions(max_new_tokens=5), prompt=prompt,
                   prompt_key=("sent", 1, outcome.version.sha256))
    engine.start(seq)
    batch, _ = engine.prefill([seq])
    while seq.finish_reason is None:
        engine.decode(batch)
    expected: list[int] = []
    with torch.no_grad():
        while len(expected) < len(seq.generated):
            logits = peft_model(input_ids=torch.tensor([ids[0].tolist() + expected])).logits[0, -1]
            expected.append(int(logits.argmax()))
    assert seq.generated == expected


def test_initialisations(tiny_base, tmp_path):
    weight = tiny_base.model.get_input_embeddings().weight.detach()
    norm = weight.norm(dim=-1).mean()

    def init(spec: str, source: torch.Tensor | None = None) -> torch.Tensor:
        options = TrainingOptions(num_virtual_tokens=6, init=spec)
        return PromptTrainer(tiny_base.model, tiny_base.tokenizer, options).initial_prompt(source)

    random_init = init("random")
    assert random_init.norm(dim=-1).mean() == pytest.approx(float(norm), rel=1e-3)
    text_ids = tiny_base.tokenizer("the", add_special_tokens=False).input_ids
    assert len(text_ids) < 6  # so the text repeats to fill the prompt
    assert torch.equal(init("text:the"), weight[(text_ids * 6)[:6]])
    vocab = init("vocab")
    assert all(any(torch.equal(row, w) for w in weight) for row in vocab)
    source = torch.randn(6, weight.shape[1])
    assert torch.equal(init("from:sent@1", source), source)
    with pytest.raises(Exception, match="set num_virtual_tokens to 3"):
        init("from:sent@1", torch.randn(3, weight.shape[1]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"input": "a", "target": "b"}\n{"input": "a"\n', "line 2: not valid JSON"),
        (b'{"input": "a", "target": ""}\n', 'line 1: "target" is empty'),
        (b'{"input": 3, "target": "b"}\n', 'line 1: "input" must be a string'),
        (b'["input", "target"]\n', "line 1: expected a JSON object"),
        (b'{"text": "a"}\n', 'line 1: no "input"/"target" keys'),
        (b'{"input": "a", "target": "b", "input_text": "c", "target_text": "d"}\n', "not both pairs"),
        (b"\n\n", "holds no examples"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_data_names_the_line(data, message):
    with pytest.raises(TrainingDataError, match=message):
        parse_jsonl(data, source="train.jsonl")


def test_data_helpers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input_text": "x", "target_text": "y"}\n\n{"input": "", "target": "z"}\n')
    assert load_jsonl(path) == [Example("x", "y"), Example("", "z")]
    with pytest.raises(TrainingDataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")
    examples = synthetic(20, 5)
    train, held = split(examples, 0.25, seed=1)
    assert len(held) == 5 and sorted(map(str, train + held)) == sorted(map(str, examples))
    assert split(examples, 0.25, seed=1) == (train, held)
    assert labels_of(examples) == ("negative", "positive")
    assert labels_of([Example(str(i), str(i)) for i in range(10)]) is None


def test_plan_refuses_bad_requests_before_compute(tiny_base, tmp_path):
    registry = Registry(tmp_path)
    options = TrainingOptions(**FAST)
    with pytest.raises(TrainingDataError, match="never uses"):
        plan(registry, tiny_base.spec, "t", synthetic(20, 1), [Example("x", "neutral")], options)
    with pytest.raises(TrainingDataError, match="no held-out data"):
        plan(registry, tiny_base.spec, "t", synthetic(20, 1), [], options, promote_alias="prod")
    with pytest.raises(Exception, match="no task"):
        plan(registry, tiny_base.spec, "t", synthetic(20, 1), None, TrainingOptions(init="from:missing"))
    with pytest.raises(Exception, match="name"):
        plan(registry, tiny_base.spec, "../t", synthetic(20, 1), None, options)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainingOptions(learning_rate=-1)
    with pytest.raises(ValueError, match="init must be"):
        TrainingOptions(init="zeros")
    trainer = PromptTrainer(tiny_base.model, tiny_base.tokenizer, TrainingOptions(max_length=3, **{
        k: v for k, v in FAST.items()}))
    with pytest.raises(TrainingDataError, match="raise --max-length"):
        trainer.encode([Example("x", "a long target that needs many tokens")])


def test_stop_keeps_best_and_cancel_raises(tiny_base):
    options = TrainingOptions(epochs=50, eval_every=2, **FAST)
    calls = []

    def on_progress(p):
        calls.append(p)
        if p.step == 6:
            trainer.stop.set()

    trainer = PromptTrainer(tiny_base.model, tiny_base.tokenizer, options, on_progress=on_progress)
    result = trainer.fit(synthetic(32, 1), synthetic(8, 2), trainer.initial_prompt())
    assert result.stop_reason == "interrupted" and result.steps == 6 and result.after is not None
    assert result.best_step in (2, 4, 6)

    cancelling = PromptTrainer(tiny_base.model, tiny_base.tokenizer, options)
    cancelling.cancel.set()
    with pytest.raises(TrainingCancelled):
        cancelling.fit(synthetic(32, 1), synthetic(8, 2), cancelling.initial_prompt())


def test_quality_gate_never_promotes_a_worse_prompt(tiny_base, tmp_path):
    registry = Registry(tmp_path)
    train, held = synthetic(48, 1), synthetic(16, 2)

    def run(**kw):
        options = TrainingOptions(**{**FAST, **kw})
        trainer = PromptTrainer(tiny_base.model, tiny_base.tokenizer, options)
        return execute(plan(registry, tiny_base.spec, "sent", train, held, options, promote_alias="prod"),
                       trainer, registry, tiny_base.spec)

    good = run(epochs=10)
    assert good.promotion.promoted and registry.resolve("sent@prod").version == good.version.version
    worse = run(epochs=1, max_steps=1, learning_rate=1e-4)
    assert not worse.promotion.promoted and "does not beat" in worse.promotion.message
    assert registry.resolve("sent@prod").version == good.version.version
    assert worse.version.version == good.version.version + 1  # registered, just not promoted


def test_local_cli_trains_and_registers(tiny_model_dir, tmp_path, capsys):
    from softprompt.client.cli import main

    (tmp_path / "train.jsonl").write_text(to_jsonl(synthetic(24, 1)))
    (tmp_path / "eval.jsonl").write_text(to_jsonl(synthetic(8, 2)))
    out = tmp_path / "run"
    status = main([
        "train", "--task", "sent", "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
        "--store", str(tmp_path / "store"), "--model", str(tiny_model_dir), "--device", "cpu",
        "--num-virtual-tokens", "4", "--max-steps", "5", "--output-dir", str(out), "--promote", "prod", "--json",
    ])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == "sent@1" and summary["steps"] == 5 and summary["promoted"]
    assert (out / "loss.png").exists() and json.loads((out / "training.json").read_text())["steps"] == 5
    assert Registry(tmp_path / "store").resolve("sent@prod").version == 1

    (tmp_path / "bad.jsonl").write_text('{"input": "x"}\n')
    status = main(["train", "--task", "sent", "--data", str(tmp_path / "bad.jsonl"),
                   "--store", str(tmp_path / "store"), "--model", str(tiny_model_dir)])
    assert status == 1 and 'line 1: "target" is missing' in capsys.readouterr().err


def test_train_prompt_in_one_call(tiny_base, tmp_path):
    from softprompt.prompts.pipeline import train_prompt

    seen = []
    outcome = train_prompt(tiny_base.model, tiny_base.tokenizer, Registry(tmp_path), "sent", synthetic(24, 1),
                           options=TrainingOptions(epochs=1, **FAST), on_progress=seen.append)
    assert outcome.version.ref == "sent@1" and outcome.result.eval_examples == 2
    assert outcome.version.base_model_fingerprint == tiny_base.spec.fingerprint
    assert seen and seen[-1].step == outcome.result.steps == 3


def test_ctrl_c_stops_and_registers_the_best_prompt_so_far(tiny_model_dir, tmp_path):
    import signal
    import subprocess
    import sys

    (tmp_path / "train.jsonl").write_text(to_jsonl(synthetic(32, 1)))
    command = [sys.executable, "-c", "import sys; from softprompt.client.cli import main; sys.exit(main())",
               "--json", "train", "--task", "sent", "--data", str(tmp_path / "train.jsonl"), "--store",
               str(tmp_path / "store"), "--model", str(tiny_model_dir), "--device", "cpu", "--num-virtual-tokens",
               "4", "--epochs", "100000", "--eval-every", "2", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "training: step" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["stop_reason"] == "interrupted" and summary["version"] == "sent@1"
    assert summary["after"] is not None and 1 <= summary["steps"] < 1000


def test_splitting_batches_into_units_changes_nothing(tiny_base):
    """The server hands the worker small units; gradients add up to the same step."""
    options = TrainingOptions(epochs=1, **FAST)
    results = []
    for unit_rows in (0, 3):
        trainer = PromptTrainer(tiny_base.model, tiny_base.tokenizer, options, max_unit_rows=unit_rows)
        results.append(trainer.fit(synthetic(24, 1), [], trainer.initial_prompt()))
    assert results[0].steps == results[1].steps == 3
    torch.testing.assert_close(results[0].embeddings, results[1].embeddings, atol=1e-5, rtol=1e-5)
