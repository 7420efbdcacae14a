"""Issue 21: every PEFT prompt-learning method is registered, served in one batch, exported and trained.

PREFIX_TUNING (with and without PEFT's reparameterization MLP) and CARTRIDGE adapters are keys and values
written straight into a row's KV blocks; MULTITASK_PROMPT_TUNING (one task) and CPT are materialized at
registration into the prompt PEFT prepends. Each row's greedy tokens must be what PEFT's own `PeftModel`
forward gives for the same adapter (a no-cache loop: `PeftModel.generate` is broken for prompt learning on
these transformers releases), batched with every other method and alone; exports load back in PEFT with
the same logits; bad adapters are refused naming the field and leave nothing registered. The PEFT models
wrap fresh copies of the tiny model, which the engine (packing its weights) never touches. The families of
the test matrix are covered by tests/test_families.py::test_prefix_tuned_rows_match_peft.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import (FAST, TEXTS, make_cpt_adapter, make_multitask_adapter, make_peft_adapter, make_prefix_adapter,
                     peft_greedy, realistic_prefix, reference_greedy, run_to_end, running_server, synthetic,
                     to_jsonl, torch_threads)
from softprompt.prompts.errors import InvalidPromptError, TrainingDataError
from softprompt.prompts.format.layout import PEFT_CONFIG, PEFT_WEIGHTS
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.format.uploads import parse_peft_adapter
from softprompt.prompts.options import DecodingOptions, TrainingOptions
from softprompt.prompts.registry import Registry
from softprompt.server.config import ServerConfig
from softprompt.server.core.admission import Admission
from softprompt.server.core.engine import Engine, PartialPrefill, ScoreRow, Sequence
from softprompt.server.core.prompt_cache import PromptCache
from softprompt.server.core.virtual import KvPrefix

MPT_TASK = 2
# name -> (peft_type, served as, PeftModel.forward keywords the adapter needs)
METHODS = {
    "prefix": ("PREFIX_TUNING", "prefix", {}),
    "projected": ("PREFIX_TUNING", "prefix", {}),
    "cartridge": ("CARTRIDGE", "prefix", {}),
    "multitask": ("MULTITASK_PROMPT_TUNING", "prompt", {"task_ids": torch.tensor([MPT_TASK])}),
    "cpt": ("CPT", "prompt", {}),
    "prompt": ("PROMPT_TUNING", "prompt", {}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def fresh(tiny_model_dir):
    """A new, untouched copy of the tiny model (PEFT wraps the model it is given)."""
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def adapters(fresh, tmp_path_factory) -> dict[str, Path]:
    """One real PEFT adapter per method, saved by PEFT's save_pretrained."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "prefix": make_prefix_adapter(fresh(), root / "prefix", num_virtual_tokens=6, seed=1),
        "projected": make_prefix_adapter(fresh(), root / "projected", num_virtual_tokens=5, seed=2, projection=True),
        "cartridge": make_prefix_adapter(fresh(), root / "cartridge", num_virtual_tokens=7, seed=3,
                                         peft_type="CARTRIDGE"),
        "multitask": make_multitask_adapter(fresh(), root / "multitask", num_virtual_tokens=4, num_tasks=3, seed=4),
        "cpt": make_cpt_adapter(fresh(), root / "cpt", token_ids=[5, 17, 40, 41, 90, 100], seed=5),
        "prompt": make_peft_adapter(fresh(), root / "prompt", num_virtual_tokens=5, seed=6),
    }


@pytest.fixture(scope="module")
def references(fresh, adapters):
    """PEFT's own PeftModel of each adapter."""
    from peft import PeftModel

    return {name: PeftModel.from_pretrained(fresh(), folder).eval() for name, folder in adapters.items()}


def _parse(folder: Path, base, **kw) -> PromptTensor:
    kw.setdefault("max_virtual_tokens", 32)
    return parse_peft_adapter((folder / PEFT_CONFIG).read_text(), (folder / PEFT_WEIGHTS).read_bytes(), base.spec, **kw)


@pytest.fixture(scope="module")
def store(tiny_base, adapters, tmp_path_factory) -> tuple[Registry, dict[str, str]]:
    """Every adapter registered as its own task: (registry, name -> ref)."""
    registry = Registry(tmp_path_factory.mktemp("store"))
    refs = {}
    for name, folder in adapters.items():
        prompt = _parse(folder, tiny_base, task_id=MPT_TASK if name == "multitask" else None)
        refs[name] = registry.register(name, prompt, tiny_base.spec).ref
    return registry, refs


def _admission(tiny_base, registry: Registry) -> tuple[Engine, Admission]:
    engine = Engine(tiny_base, prefix_cache_bytes=1 << 20)
    cache = PromptCache(1 << 24, tiny_base.device, tiny_base.dtype)
    return engine, Admission(engine, registry, cache, ServerConfig())


def _row(engine: Engine, admission: Admission, i: int, ref: str, text: str, max_new: int) -> Sequence:
    prompt, _, key = admission.resolve(ref)
    seq = Sequence(request_id=i, input_ids=engine.tokenizer(text).input_ids, params=DecodingOptions(max_new_tokens=max_new),
                   prompt=prompt, prompt_key=key)
    engine.start(seq)
    return seq


# ---------------------------------------------------------------- registration


def test_each_method_is_registered_as_it_is_served(store, tiny_base):
    registry, refs = store
    layout = tiny_base.spec.kv_layout
    for name, (peft_type, method, _) in METHODS.items():
        version = registry.resolve(refs[name])
        assert (version.source_type, version.method) == (peft_type, method), name
        assert version.hidden_size == tiny_base.spec.hidden_size
        if method == "prefix":
            assert version.kv_shape == (layout.num_layers, layout.kv_heads, layout.head_dim)
            assert version.size_bytes == version.num_virtual_tokens * layout.width * 4
        else:
            assert version.kv_shape == (0, 0, 0)
            assert version.size_bytes == version.num_virtual_tokens * tiny_base.spec.hidden_size * 4
    assert registry.resolve(refs["multitask"]).peft_task_id == MPT_TASK


def test_materialized_prompts_are_what_peft_prepends(store, references):
    registry, refs = store
    for name in ("multitask", "cpt", "prompt"):
        expected = references[name].get_prompt(1, **({"task_ids": METHODS[name][2]["task_ids"]}
                                                      if name == "multitask" else {}))[0]
        got = registry.load_embeddings(registry.resolve(refs[name]))
        assert torch.allclose(got, expected.float(), atol=1e-6), name


def test_a_prefix_with_its_projection_not_materialized_is_materialized(tiny_base, adapters, fresh):
    """The parameters of PEFT's prefix encoder (embedding + MLP), as a training checkpoint holds them, register as
    the prefix the MLP computes: what PEFT's save_pretrained would have written."""
    from peft import PrefixTuningConfig, get_peft_model
    from safetensors.torch import save

    from helpers import peft_ready

    config = json.loads((adapters["projected"] / PEFT_CONFIG).read_text())
    peft_model = get_peft_model(peft_ready(fresh()), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, num_layers=config["num_layers"],
        num_attention_heads=config["num_attention_heads"], token_dim=config["token_dim"], prefix_projection=True,
        encoder_hidden_size=24))
    encoder = peft_model.prompt_encoder["default"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.5)
    weights = save({f"prompt_encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()})
    prompt = parse_peft_adapter(json.dumps(config), weights, tiny_base.spec, max_virtual_tokens=32)
    assert prompt.method == "prefix"
    assert torch.allclose(prompt.embeddings, peft_model.get_prompt_embedding_to_save("default"), atol=1e-6)


# ---------------------------------------------------------------- serving, exact against PEFT


def test_every_method_in_one_batch_gives_peft_s_tokens_batched_and_alone(store, tiny_base, references):
    """Rows of all six methods, a bare row and a second prefix row share a batch, join and leave; each row's
    tokens are PEFT's own (the bare row's: the no-cache reference), and the same as the row run alone."""
    registry, refs = store
    engine, admission = _admission(tiny_base, registry)
    plan = [(name, TEXTS[i % 4]) for i, name in enumerate(METHODS)] + [("", TEXTS[1]), ("prefix", TEXTS[3] * 2)]
    rows = [_row(engine, admission, i, refs.get(name, ""), text, 9 + i) for i, (name, text) in enumerate(plan)]
    batch, _ = engine.prefill(rows[:4])
    engine.decode(batch)
    batch = engine.concatenate([batch, engine.prefill(rows[4:])[0]])
    engine.decode(batch)
    batch = engine.filter(batch, [i for i in range(len(rows)) if i != 2])
    run_to_end(engine, batch)
    for (name, _), seq in zip(plan, rows):
        if name:
            expected = peft_greedy(references[name], seq.input_ids, len(seq.generated), **METHODS[name][2])
        else:
            expected = reference_greedy(tiny_base.model, None, seq.input_ids, len(seq.generated), ())
        if seq is not rows[2]:  # left the batch early: its first tokens are checked alone below
            assert seq.generated == expected, f"{name or 'bare'} row differs from PEFT"
        alone = _row(engine, admission, 100, refs.get(name, ""), engine.tokenizer.decode(seq.input_ids), len(expected))
        alone.input_ids = list(seq.input_ids)
        run_to_end(engine, engine.prefill([alone])[0])
        assert alone.generated == expected, f"{name or 'bare'} row alone differs from PEFT"
    assert engine.kv.usage().used_blocks == 0


def test_a_prefix_row_holds_its_prefix_positions_and_runs_only_its_tokens(store, tiny_base):
    registry, refs = store
    engine, admission = _admission(tiny_base, registry)
    seq = _row(engine, admission, 0, refs["cartridge"], TEXTS[0], 4)
    assert isinstance(seq.prompt, KvPrefix) and seq.num_virtual_tokens == 7
    assert seq.kv_tokens == 7 + len(seq.input_ids) + 1
    assert engine.fresh_positions(seq.prompt, seq.prompt_key, len(seq.tokens)) == len(seq.input_ids)
    batch, _ = engine.prefill([seq])
    assert seq.kv.length == 7 + len(seq.input_ids)
    engine.decode(batch)
    assert seq.kv.length == 7 + len(seq.input_ids) + 1
    assert engine.warm([(seq.prompt, seq.prompt_key)]) == 1  # nothing to compute for keys and values
    engine.release([seq])


def test_a_preempted_prefix_row_resumes_with_peft_s_tokens(store, tiny_base, references):
    """Preemption by recompute: a prefix row dropped mid-decode (its blocks given back) and resumed by prefill
    writes its keys and values again and continues with PEFT's tokens, as do the rows around it."""
    registry, refs = store
    engine, admission = _admission(tiny_base, registry)
    names = ("prompt", "cartridge", "projected")
    rows = [_row(engine, admission, i, refs[name], TEXTS[i], 10) for i, name in enumerate(names)]
    batch, _ = engine.prefill(rows)
    for _ in range(3):
        engine.decode(batch)
    batch = engine.filter(batch, [0, 2])
    engine.decode(batch)
    assert len(rows[1].generated) == 4 and rows[1].finish_reason is None
    batch = engine.concatenate([batch, engine.prefill([rows[1]])[0]])
    run_to_end(engine, batch)
    for name, seq in zip(names, rows):
        assert seq.generated == peft_greedy(references[name], seq.input_ids, len(seq.generated)), name
    assert engine.kv.usage().used_blocks == 0


def test_chunked_prefill_of_a_prefix_row_gives_peft_s_tokens(store, tiny_base, references):
    registry, refs = store
    engine, admission = _admission(tiny_base, registry)
    seq = _row(engine, admission, 0, refs["prefix"], TEXTS[2] * 3, 8)
    partial, done = PartialPrefill(seq), None
    while done is None:
        done = engine.prefill_chunk(partial, 5)
    run_to_end(engine, done[0])
    assert seq.generated == peft_greedy(references["prefix"], seq.input_ids, 8)


def test_classify_behind_a_prefix_scores_as_peft(store, tiny_base, references):
    registry, refs = store
    engine, admission = _admission(tiny_base, registry)
    prompt, _, key = admission.resolve(refs["prefix"])
    tok = tiny_base.tokenizer
    context, labels = tok(TEXTS[0]).input_ids, [tok(" great film").input_ids, tok(" awful").input_ids]
    got = engine.score([ScoreRow(prompt, key, context, label) for label in labels])
    for label, value in zip(labels, got):
        ids = torch.tensor([context + label])
        with torch.no_grad():
            logits = references["prefix"](input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        logprobs = logits.log_softmax(-1)
        expected = sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(label))
        assert value == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="needs a prompt or context"):
        engine.score([ScoreRow(prompt, key, [], labels[0])])


def test_export_round_trip_loads_in_peft_with_identical_outputs(store, fresh, references, tmp_path):
    """A registered version exports a folder PeftModel.from_pretrained loads as its own type (PREFIX_TUNING and
    CARTRIDGE as such, multitask and CPT as the PROMPT_TUNING prompt they materialize to), same logits."""
    from peft import PeftModel

    registry, refs = store
    ids = torch.tensor([[*range(3, 12)]])
    for name, (peft_type, method, kwargs) in METHODS.items():
        folder = registry.export(refs[name], tmp_path / name)
        config = json.loads((folder / PEFT_CONFIG).read_text())
        assert config["peft_type"] == (peft_type if method == "prefix" else "PROMPT_TUNING")
        loaded = PeftModel.from_pretrained(fresh(), folder).eval()
        with torch.no_grad():
            ours = loaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            theirs = references[name](input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits
        assert torch.allclose(ours, theirs, atol=1e-5), name


def test_a_prefix_version_in_the_object_store_serves_the_same(store, tiny_base, tmp_path, s3_bucket, s3_endpoint_url):
    from softprompt.prompts.registry.s3 import S3Store

    registry, refs = store
    s3 = Registry(store=S3Store(s3_bucket, "prompts", endpoint_url=s3_endpoint_url, cache_dir=tmp_path / "cache"))
    local = registry.resolve(refs["projected"])
    prompt = PromptTensor(registry.load_embeddings(local), "PREFIX_TUNING", layout=tiny_base.spec.kv_layout)
    version = s3.register("projected", prompt, tiny_base.spec)
    assert (version.method, version.kv_shape, version.sha256) == (local.method, local.kv_shape, local.sha256)
    assert torch.equal(s3.load_embeddings(s3.resolve("projected")), registry.load_embeddings(local))


# ---------------------------------------------------------------- bad adapters


def _edited(folder: Path, tmp_path: Path, *, config: dict | None = None, drop: tuple[str, ...] = (),
            tensors: dict[str, torch.Tensor] | None = None) -> tuple[str, bytes]:
    from safetensors.torch import save

    text = json.loads((folder / PEFT_CONFIG).read_text())
    text.update(config or {})
    for key in drop:
        text.pop(key, None)
    weights = (folder / PEFT_WEIGHTS).read_bytes() if tensors is None else save(tensors)
    return json.dumps(text), weights


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load((folder / PEFT_WEIGHTS).read_bytes())


def _bad_cases(adapters, tiny_base):
    layout = tiny_base.spec.kv_layout
    nan = realistic_prefix(tiny_base.model, 6, 9)
    nan[2, 5] = float("nan")
    prefix = adapters["prefix"]
    return [
        (prefix, dict(config={"num_layers": 3}), None, ["num_layers is 3", f"{layout.num_layers} layers"]),
        (prefix, dict(config={"num_attention_heads": 4, "token_dim": 64}), None,
         ["num_attention_heads is 4", f"{layout.kv_heads} KV heads"]),
        (prefix, dict(config={"token_dim": 64}), None, ["token_dim is 64", f"head size {layout.head_dim}"]),
        (prefix, dict(drop=("num_layers", "num_attention_heads", "token_dim"),
                      tensors={"prompt_embeddings": torch.randn(6, layout.width + 2)}), None,
         [f"{layout.width + 2} wide", str(layout.width)]),
        (prefix, dict(tensors={"prompt_embeddings": torch.randn(6, 2, layout.width // 2)}), None, ["shape [6, 2"]),
        (prefix, dict(tensors={"prompt_embeddings": nan}), None, ["NaN", "virtual token 2"]),
        (prefix, dict(config={"num_virtual_tokens": 5}), None, ["num_virtual_tokens=5", "6 rows"]),
        (prefix, dict(config={"task_type": "SEQ_2_SEQ_LM"}), None, ["task_type", "CAUSAL_LM"]),
        (prefix, {}, 1, ["task_id 1", "MULTITASK_PROMPT_TUNING adapters only"]),
        (prefix, dict(config={"peft_type": "ADAPTION_PROMPT"}), None, ["ADAPTION_PROMPT", "gate", "PREFIX_TUNING"]),
        (prefix, dict(config={"peft_type": "LORA"}), None, ["LORA", "not a soft prompt"]),
        (adapters["multitask"], {}, None, ["holds 3 tasks", "task_id", "0 to 2"]),
        (adapters["multitask"], {}, 3, ["task_id 3 is out of range", "0 to 2"]),
        (adapters["multitask"], dict(config={"num_tasks": 4}), 0, ["num_tasks=4", "3 tasks"]),
        (adapters["multitask"], dict(tensors={k: v.double() if k == "prefix_task_rows" else v
                                              for k, v in _tensors(adapters["multitask"]).items()}), 0,
         ["prefix_task_rows", "float64", "float32, float16 or bfloat16"]),
        (adapters["cpt"], dict(config={"cpt_token_ids": [1, 2]}), None, ["2 cpt_token_ids", "6 rows"]),
    ]


def test_bad_adapters_are_refused_naming_the_field(adapters, tiny_base, tmp_path):
    for folder, edit, task_id, fragments in _bad_cases(adapters, tiny_base):
        config, weights = _edited(folder, tmp_path, **edit)
        with pytest.raises(InvalidPromptError) as e:
            parse_peft_adapter(config, weights, tiny_base.spec, max_virtual_tokens=32, task_id=task_id)
        for fragment in fragments:
            assert fragment.lower() in str(e.value).lower(), (fragment, str(e.value))


def test_a_prefix_longer_than_the_limit_is_refused(adapters, tiny_base):
    with pytest.raises(InvalidPromptError, match="at most 4"):
        _parse(adapters["cartridge"], tiny_base, max_virtual_tokens=4)


# ---------------------------------------------------------------- the server: gRPC, HTTP, CLI


@pytest.fixture(scope="module")
def server(tiny_base, adapters, tmp_path_factory):
    with running_server(tiny_base, tmp_path_factory.mktemp("served"), http_port=0) as (app, address):
        yield app, address


def test_the_server_registers_serves_and_describes_every_method(server, adapters, references, tiny_base, tmp_path):
    from softprompt.client import Client
    from softprompt.client.errors import InvalidArgumentError, NotFoundError

    app, address = server
    with Client(address, timeout=60) as client:
        infos = {name: client.register(f"m-{name}", str(folder), task_id=MPT_TASK if name == "multitask" else None)
                 for name, folder in adapters.items()}
        for name, (peft_type, method, kwargs) in METHODS.items():
            info = infos[name]
            assert (info.peft_type, info.method) == (peft_type, method)
            if method == "prefix":
                layout = tiny_base.spec.kv_layout
                assert (info.num_layers, info.kv_heads, info.head_dim) == (layout.num_layers, layout.kv_heads,
                                                                          layout.head_dim)
            assert info.size_bytes > 0
            result = client.generate(f"m-{name}", TEXTS[0], max_new_tokens=6)
            ids = tiny_base.tokenizer(TEXTS[0]).input_ids
            assert list(result.token_ids) == peft_greedy(references[name], ids, len(result.token_ids), **kwargs)[
                :len(result.token_ids)]
            assert result.usage.virtual_tokens == info.num_virtual_tokens
        assert infos["multitask"].peft_task_id == MPT_TASK and infos["prefix"].peft_task_id is None
        listed = {p.ref: p for p in client.list_prompts()}
        assert listed[infos["cartridge"].ref].method == "prefix"
        scored = client.classify("m-prefix", TEXTS[0], ["great", "awful"])
        assert math.isclose(sum(s.probability for s in scored.scores), 1.0, rel_tol=1e-6)

        with pytest.raises(InvalidArgumentError, match="prefix-tuned"):
            client.generate("m-prefix", "", max_new_tokens=3)
        with pytest.raises(InvalidArgumentError, match="prefix-tuned"):
            client.classify("m-cartridge", "", ["a", "b"])
        for folder, edit, task_id, fragments in _bad_cases(adapters, tiny_base)[:3]:
            bad = tmp_path / f"bad-{len(fragments)}-{task_id}"
            bad.mkdir(exist_ok=True)
            config, weights = _edited(folder, tmp_path, **edit)
            (bad / PEFT_CONFIG).write_text(config)
            (bad / PEFT_WEIGHTS).write_bytes(weights)
            with pytest.raises(InvalidArgumentError, match=fragments[0]):
                client.register("half", str(bad), task_id=task_id)
        with pytest.raises(NotFoundError):
            client.get_prompt("half")  # nothing half-registered


def test_http_completions_serve_a_prefix_task_as_peft(server, adapters, references, tiny_base):
    import httpx

    app, address = server
    from softprompt.client import Client

    with Client(address, timeout=60) as client:
        client.register("http-prefix", str(adapters["prefix"]))
    url = f"http://127.0.0.1:{app.http_port}/v1/completions"
    response = httpx.post(url, json={"model": "http-prefix", "prompt": TEXTS[1], "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    ids = tiny_base.tokenizer(TEXTS[1]).input_ids
    expected = tiny_base.tokenizer.decode(peft_greedy(references["prefix"], ids, 5))
    assert response.json()["choices"][0]["text"] == expected
    assert response.json()["usage"]["virtual_tokens"] == 6
    # An empty prompt is refused before the task is looked at (the prefix-specific message is gRPC's, above).
    empty = httpx.post(url, json={"model": "http-prefix", "prompt": "", "max_tokens": 5})
    assert empty.status_code == 400 and "prompt" in empty.json()["error"]["message"]


def test_show_prints_the_method_layers_and_bytes(server, adapters, capsys):
    from softprompt.client.cli.app import main

    app, address = server
    assert main(["--server", address, "register", "shown", str(adapters["cartridge"])]) == 0
    capsys.readouterr()
    assert main(["--server", address, "show", "shown"]) == 0
    out = capsys.readouterr().out
    assert "CARTRIDGE" in out and "prefix: keys and values, 2 layers x 2 KV heads x head size 16" in out
    assert f"{7 * 2 * 2 * 2 * 16 * 4:,}" in out


# ---------------------------------------------------------------- training


def test_prefix_training_learns_and_serves_as_peft(tiny_base, fresh, tmp_path):
    """`method="prefix"` (with and without PEFT's reparameterization MLP) learns the synthetic task, registers a
    PREFIX_TUNING version whose export PEFT loads, and the server's rows give PEFT's tokens for it."""
    from peft import PeftModel

    from softprompt.prompts.pipeline import train_prompt

    registry = Registry(tmp_path / "store")
    for projection in (False, True):
        options = TrainingOptions(**{**FAST, "epochs": 3}, method="prefix", prefix_projection=projection)
        outcome = train_prompt(fresh(), tiny_base.tokenizer, registry, "learned", synthetic(64, 1), synthetic(16, 2),
                               options=options)
        result, version = outcome.result, outcome.version
        assert result.after.accuracy > result.before.accuracy and result.after.loss < result.before.loss
        assert (version.method, version.source_type) == ("prefix", "PREFIX_TUNING")
        folder = registry.export(version, tmp_path / f"export-{projection}")
        reference = PeftModel.from_pretrained(fresh(), folder).eval()
        engine, admission = _admission(tiny_base, registry)
        seq = _row(engine, admission, 0, version.ref, "the quick brown fox great", 4)
        run_to_end(engine, engine.prefill([seq])[0])
        assert seq.generated == peft_greedy(reference, seq.input_ids, 4)


def test_initial_prefix_behaves_as_its_tokens_in_front(tiny_base, fresh):
    """"vocab"/"text:" start a prefix from the keys and values of tokens: before training it scores exactly as
    prompt tuning initialised from the same tokens."""
    from softprompt.prompts.train import PromptTrainer

    held = synthetic(8, 3)
    results = []
    for method in ("prompt", "prefix"):
        trainer = PromptTrainer(fresh(), tiny_base.tokenizer, TrainingOptions(**FAST, method=method, init="text:movie"))
        results.append(trainer.evaluate(trainer.initial_prompt(), trainer.encode(held), ("negative", "positive")))
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-4)
    assert results[0].accuracy == results[1].accuracy


def test_a_prefix_trainer_runs_every_forward_through_its_runner(tiny_base, fresh):
    """On a server the runner is the worker that serves: reading the KV layout and computing the initial prefix
    (forwards of the model) must go through it too, never run on the caller's thread beside serving."""
    from softprompt.prompts.train import PromptTrainer

    model, inside, outside = fresh(), [False], []

    def runner(fn):
        inside[0] = True
        try:
            return fn()
        finally:
            inside[0] = False

    model.register_forward_pre_hook(lambda module, args: None if inside[0] else outside.append(module))
    trainer = PromptTrainer(model, tiny_base.tokenizer, TrainingOptions(**FAST, method="prefix", init="text:movie"),
                            runner=runner)
    result = trainer.fit(synthetic(8, 1), synthetic(4, 2), trainer.initial_prompt())
    assert result.steps > 0 and outside == []


def test_prefix_training_refuses_empty_inputs_and_a_warm_start_of_another_method(tiny_base, fresh, tmp_path):
    from softprompt.prompts.data import Example
    from softprompt.prompts.pipeline import plan
    from softprompt.prompts.train import PromptTrainer

    trainer = PromptTrainer(fresh(), tiny_base.tokenizer, TrainingOptions(**FAST, method="prefix"))
    with pytest.raises(TrainingDataError, match="example 2: the input is empty"):
        trainer.encode([Example("a b", "positive"), Example("", "negative")])
    registry = Registry(tmp_path)
    registry.register("pt", PromptTensor(torch.randn(4, tiny_base.spec.hidden_size), "RAW"), tiny_base.spec)
    with pytest.raises(InvalidPromptError, match="prompt-tuned prompt but method 'prefix'"):
        plan(registry, tiny_base.spec, "new", synthetic(8, 1), None,
             TrainingOptions(**FAST, method="prefix", init="from:pt"))
    with pytest.raises(ValueError, match="prefix_projection and encoder_hidden_size apply to method 'prefix'"):
        TrainingOptions(prefix_projection=True)


def test_the_quality_gate_judges_versions_of_either_method(tiny_base, fresh, tmp_path):
    from softprompt.prompts.pipeline import train_prompt

    registry = Registry(tmp_path)
    train, held = synthetic(48, 1), synthetic(16, 2)
    first = train_prompt(fresh(), tiny_base.tokenizer, registry, "gated", train, held, promote_alias="prod",
                         options=TrainingOptions(**{**FAST, "epochs": 1}, method="prompt"))
    assert first.promotion.promoted
    second = train_prompt(fresh(), tiny_base.tokenizer, registry, "gated", train, held, promote_alias="prod",
                          options=TrainingOptions(**{**FAST, "epochs": 2}, method="prefix"))
    # The incumbent (prompt-tuned) was scored as a prompt on the same held-out data.
    assert "gated@1" in second.promotion.message
    assert registry.resolve("gated@prod").version in (1, 2)


def test_a_server_job_trains_a_prefix_while_serving(server, tiny_base):
    from softprompt.client import Client

    app, address = server
    data = to_jsonl(synthetic(32, 1))
    with Client(address, timeout=120) as client:
        job = client.train("served-prefix", data.encode(), to_jsonl(synthetic(8, 2)).encode(),
                           options=TrainingOptions(**{**FAST, "epochs": 1}, method="prefix", prefix_projection=True))
        done = client.wait_for_training_job(job.job_id, timeout=300)
        assert done.state == "succeeded", done
        assert (done.version.method, done.version.peft_type) == ("prefix", "PREFIX_TUNING")
        assert client.generate("served-prefix", "the quick brown fox great", max_new_tokens=3).usage.virtual_tokens \
            == FAST["num_virtual_tokens"]


def test_a_bad_training_method_is_refused_naming_the_field(server):
    import grpc

    from softprompt.protos import softprompt_pb2 as pb
    from softprompt.protos import softprompt_pb2_grpc as pb_grpc

    app, address = server
    data = to_jsonl(synthetic(8, 1)).encode()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TrainingStub(channel)
        for options, fragment in ((pb.TrainingOptions(method="lora"), "method must be 'prompt' or 'prefix'"),
                                  (pb.TrainingOptions(prefix_projection=True), "apply to method 'prefix' only")):
            with pytest.raises(grpc.RpcError) as info:
                stub.TrainPrompt(pb.TrainPromptRequest(task="t", train_jsonl=data, options=options))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in info.value.details()
