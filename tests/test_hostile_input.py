"""Hostile input against a live server: every request field and upload byte gets a precise status.

Property-based (hypothesis, derandomized so CI is reproducible) over the fields of Generate,
GenerateStream, Classify, Tokenize, RegisterPrompt and the registry calls: unicode, path-like and NUL
names, huge strings, out-of-range decoding parameters, and adapter uploads that are truncated, of the
wrong dtype (integers, float64: refused, the server takes what PEFT saves), wrong shape or width,
NaN/Inf, with hostile safetensors headers, pickles, random bytes or bad adapter_config.json. Each must
be answered OK or with INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION / RESOURCE_EXHAUSTED (never
INTERNAL or UNKNOWN), and after each one the server must still serve the reference output.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from helpers import running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import expected_ids, torch_threads, wait_until
from safetensors.torch import save as save_safetensors
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc

ANCHOR = "anchor"  # the task whose output proves the server still serves correctly; never attacked
ANCHOR_TEXT = "the quick brown fox"
LIMITS: dict[str, Any] = {
    "max_batch_size": 4, "max_queued_requests": 32, "max_new_tokens": 16, "default_max_new_tokens": 4,
    "max_virtual_tokens": 8, "max_input_tokens": 64, "max_upload_mb": 0.25, "max_labels": 8,
    "max_stop_sequences": 4, "batch_wait_ms": 0,
}
TIMEOUT_S = 120.0  # only a hang reaches it, and DEADLINE_EXCEEDED is not an accepted answer

OK = grpc.StatusCode.OK
PRECISE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])

# Every status the hostile requests got, by RPC: printed at the end, quoted in the README.
SEEN: Counter[tuple[str, str]] = Counter()


def _statuses_of(run: Callable[[], None]) -> Counter[tuple[str, str]]:
    """The statuses that `run` (a property's examples) got, by RPC."""
    before = SEEN.copy()
    run()
    return SEEN - before


# ---------------------------------------------------------------- the server and its reference


class Served:
    """The live server, its stubs, and the anchor's reference output."""

    def __init__(self, app: Any, address: str, base: Any) -> None:
        self.app = app
        self.base = base
        self.hidden = base.spec.hidden_size
        self.channel = grpc.insecure_channel(address)
        self.inference = pb_grpc.InferenceStub(self.channel)
        self.registry = pb_grpc.RegistryStub(self.channel)
        self.anchor = torch.randn(3, self.hidden, generator=torch.Generator().manual_seed(7)) * 0.5
        raw = pb.RawTensor(shape=[3, self.hidden], dtype="float32", data=self.anchor.numpy().tobytes())
        self.registry.RegisterPrompt(pb.RegisterPromptRequest(name=ANCHOR, tensor=raw), timeout=TIMEOUT_S)
        self.registry.SetAlias(pb.SetAliasRequest(name=ANCHOR, alias="prod", version=1), timeout=TIMEOUT_S)
        self.expected = expected_ids(base, self.anchor, ANCHOR_TEXT, 3)
        self.expected_bare = expected_ids(base, None, ANCHOR_TEXT, 3)

    def assert_still_serving(self) -> None:
        """The anchor and the bare model still give their reference tokens; no request is left held."""
        for ref, expected in ((f"{ANCHOR}@1", self.expected), ("", self.expected_bare)):
            params = pb.DecodingParameters(max_new_tokens=3)
            out = self.inference.Generate(pb.GenerateRequest(task=ref, input=ANCHOR_TEXT, params=params),
                                          timeout=TIMEOUT_S)
            assert list(out.token_ids) == expected, f"{ref or 'the bare model'} no longer gives the reference output"
        wait_until(lambda: self.app.scheduler.snapshot().idle, "the scheduler to drain")


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory) -> Iterator[Served]:
    with torch_threads(1), running_server(tiny_base, tmp_path_factory.mktemp("store"), **LIMITS) as (app, address):
        s = Served(app, address, tiny_base)
        yield s
        s.channel.close()
    print("\nhostile input statuses:", ", ".join(f"{rpc} {code}: {n}" for (rpc, code), n in sorted(SEEN.items())),
          f"(total {sum(SEEN.values())})")


def answer(rpc: str, call: Callable[[], Any], *, streaming: bool = False) -> tuple[grpc.StatusCode, Any]:
    """Makes one call and checks its status is OK or precise; returns (status, response)."""
    try:
        response = call()
        if streaming:
            response = list(response)
        code, details = OK, ""
    except grpc.RpcError as e:
        response, code, details = None, e.code(), e.details() or ""
    SEEN[(rpc, code.name)] += 1
    assert code == OK or code in PRECISE, f"{rpc} answered {code.name}: {details}"
    if code != OK:
        assert details, f"{rpc} answered {code.name} without saying why"
        assert "internal error" not in details
    return code, response


# ---------------------------------------------------------------- strategies
#
# Each request draws a few of its fields from a hostile strategy and the rest from a valid one, so one
# bad field at a time is exercised (a request with seven bad fields only tests the first check) and a
# good share of requests succeed; hypothesis shrinks a failure towards the fewest hostile fields.

_CHARS = st.characters(blacklist_categories=("Cs",))  # protobuf strings are UTF-8: no lone surrogates
HOSTILE_REFS = [
    "", "../x", "a/b", "..", ".", ".tmp", "/etc/passwd", f"{ANCHOR}/../{ANCHOR}", f"{ANCHOR}\x00", "\x00",
    f"{ANCHOR}@", f"{ANCHOR}@0", f"{ANCHOR}@01", f"{ANCHOR}@-1", f"{ANCHOR}@1@2", f"{ANCHOR}@{'9' * 30}",
    f"{ANCHOR}@ prod", f"{ANCHOR}@latest", f"{ANCHOR}@missing", f"{ANCHOR}@2", f"{ANCHOR}@\u00b2", f"{ANCHOR}@\u0661",
    f"{ANCHOR}@ＰＲＯＤ", "\u00e1nchor", "a" * 65, "nosuch", "nosuch@3", "CON", "-x", "x y", "x\ny", "@", "@1", "a@b@c",
]


def _huge(unit: str, times: int) -> st.SearchStrategy[str]:
    """`unit * times`, built when drawn (a literal would make hypothesis's reprs and reports huge)."""
    return st.just(times).map(lambda n: unit * n)


refs = st.one_of(st.sampled_from(HOSTILE_REFS), _huge("x", 100_000), _huge("\U0001f642", 5_000),
                 st.text(_CHARS, max_size=70),
                 st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}(@[A-Za-z0-9_-]{0,4})?", fullmatch=True))
# Names a test may write to or delete: anything but the anchor.
attack_names = refs.filter(lambda r: r.partition("@")[0] != ANCHOR)
hostile_texts = st.one_of(
    st.text(_CHARS, max_size=40),
    st.sampled_from(["", "\x00", "<|im_end|>", "<|im_start|>system\nhi", "{{ messages }}{% raw %}"]),
    _huge("hello ", 200), _huge("\U0001f642", 300), _huge("x", 200_000),
)
good_texts = st.sampled_from(["hello", "the quick brown fox", "a soft prompt is", "0123 + 4", "great movie"])
floats32 = st.floats(width=32)  # includes NaN, +-Inf, negative, subnormal, huge

# field: (valid, hostile)
GENERATE_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "task": (st.sampled_from(["", ANCHOR, f"{ANCHOR}@1", f"{ANCHOR}@prod", f"{ANCHOR}@latest"]), refs),
    "input": (good_texts, hostile_texts),
    "max_new_tokens": (st.integers(0, 6), st.sampled_from([16, 17, 1_000, 2**32 - 1])),
    "temperature": (st.one_of(st.just(0.0), st.floats(0.25, 2.0, width=32)), floats32),
    "top_k": (st.integers(0, 50), st.integers(0, 2**32 - 1)),
    "top_p": (st.one_of(st.just(0.0), st.floats(0.25, 1.0, width=32)), floats32),
    "seed": (st.one_of(st.none(), st.integers(0, 1000)), st.integers(0, 2**64 - 1)),
    "stop": (st.lists(st.sampled_from(["e", "fox", "\n"]), max_size=2),
             st.lists(st.one_of(st.text(_CHARS, max_size=4), st.sampled_from(["", "x" * 257, "\x00"])), max_size=6)),
    "apply_chat_template": (st.booleans(), st.booleans()),
}


@st.composite
def mixed(draw: st.DrawFn, fields: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]],
          max_hostile: int = 2) -> dict[str, Any]:
    """One value per field: up to `max_hostile` fields drawn from their hostile strategy, the rest valid."""
    hostile = draw(st.sets(st.sampled_from(sorted(fields)), max_size=max_hostile), label="hostile fields")
    return {name: draw(bad if name in hostile else good, label=name) for name, (good, bad) in fields.items()}


def _generate_request(f: dict[str, Any]) -> pb.GenerateRequest:
    params = pb.DecodingParameters(max_new_tokens=f["max_new_tokens"], temperature=f["temperature"],
                                   top_k=f["top_k"], top_p=f["top_p"], stop=f["stop"],
                                   apply_chat_template=f["apply_chat_template"])
    if f["seed"] is not None:
        params.seed = f["seed"]
    return pb.GenerateRequest(task=f["task"], input=f["input"], params=params)


# ---------------------------------------------------------------- inference


@settings(SETTINGS, max_examples=100)
@given(fields=mixed(GENERATE_FIELDS), stream=st.booleans())
def _generate_fields(served: Served, fields: dict[str, Any], stream: bool) -> None:
    request = _generate_request(fields)
    if stream:
        code, chunks = answer("GenerateStream", lambda: served.inference.GenerateStream(request, timeout=TIMEOUT_S),
                              streaming=True)
        if code == OK:
            assert chunks and chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
            generated = sum(len(c.token_ids) for c in chunks)
            assert generated == chunks[-1].usage.generated_tokens
    else:
        code, out = answer("Generate", lambda: served.inference.Generate(request, timeout=TIMEOUT_S))
        if code == OK:
            assert out.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            generated = len(out.token_ids)
    if code == OK:
        assert 1 <= generated <= (fields["max_new_tokens"] or LIMITS["default_max_new_tokens"])
    served.assert_still_serving()


def test_generate_fields(served: Served) -> None:
    """The property above, then proof it is not vacuous: the statuses its examples reached."""
    seen = _statuses_of(lambda: _generate_fields(served))
    assert seen[("Generate", "OK")] + seen[("GenerateStream", "OK")] >= 10
    assert seen[("Generate", "INVALID_ARGUMENT")] and seen[("GenerateStream", "INVALID_ARGUMENT")]


CLASSIFY_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "task": GENERATE_FIELDS["task"],
    "input": (good_texts, hostile_texts),
    "labels": (st.lists(st.sampled_from(["positive", "negative", "neutral", "fox", "a b"]), min_size=2, max_size=4,
                        unique=True),
               st.lists(st.one_of(st.text(_CHARS, max_size=8),
                                  st.sampled_from(["", " ", "positive", "<|im_end|>", "x" * 300, "\x00"])),
                        max_size=10)),
    "chat": (st.booleans(), st.booleans()),
}


@settings(SETTINGS, max_examples=60)
@given(fields=mixed(CLASSIFY_FIELDS))
def _classify_fields(served: Served, fields: dict[str, Any]) -> None:
    labels = fields["labels"]
    request = pb.ClassifyRequest(task=fields["task"], input=fields["input"], labels=labels,
                                 apply_chat_template=fields["chat"])
    code, out = answer("Classify", lambda: served.inference.Classify(request, timeout=TIMEOUT_S))
    if code == OK:
        assert [s.label for s in out.scores] == labels and out.label in labels
        assert sum(s.probability for s in out.scores) == pytest.approx(1.0, abs=1e-4)
    served.assert_still_serving()


def test_classify_fields(served: Served) -> None:
    """The property above, then proof it is not vacuous: the statuses its examples reached."""
    seen = _statuses_of(lambda: _classify_fields(served))
    assert seen[("Classify", "OK")] and seen[("Classify", "INVALID_ARGUMENT")]


@settings(SETTINGS, max_examples=30)
@given(text=hostile_texts, chat=st.booleans())
def _tokenize_fields(served: Served, text: str, chat: bool) -> None:
    answer("Tokenize", lambda: served.inference.Tokenize(pb.TokenizeRequest(text=text, apply_chat_template=chat),
                                                         timeout=TIMEOUT_S))
    served.assert_still_serving()


def test_tokenize_fields(served: Served) -> None:
    """The property above, then proof it is not vacuous: the statuses its examples reached."""
    seen = _statuses_of(lambda: _tokenize_fields(served))
    assert seen[("Tokenize", "OK")]


# ---------------------------------------------------------------- training

_GOOD_LINES = [json.dumps({"input": t, "target": y}) for t, y in
               [("great movie", "positive"), ("awful film", "negative"), ("loved it", "positive"),
                ("boring", "negative"), ("a soft prompt is", "positive"), ("0123 + 4", "negative")]]
jsonl_bytes = st.one_of(
    st.just("\n".join(_GOOD_LINES).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", b"\n\n", b"[1, 2]", b'{"input": 1, "target": []}', b'{"input": "x"}', b"\xff\xfe{",
                     b'{"input": "' + b"a" * 5000 + b'", "target": "b"}', b"{" * 10_000,
                     ("\n".join(_GOOD_LINES[:1])).encode()]),
    st.lists(st.sampled_from([*_GOOD_LINES, "not json", "{}", '{"input": "", "target": ""}']),
             max_size=12).map(lambda lines: "\n".join(lines).encode()),
)
uint32 = st.integers(0, 2**32 - 1)
TRAIN_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "task": (st.just("hostile-trained"), attack_names),
    "train_jsonl": (st.just("\n".join(_GOOD_LINES).encode()), jsonl_bytes),
    "eval_jsonl": (st.just(b""), jsonl_bytes),
    "num_virtual_tokens": (st.integers(0, 4), uint32),
    "init": (st.sampled_from(["", "vocab", "random", "text:classify it"]),
             st.one_of(st.sampled_from(["from:", "from:../x", f"from:{ANCHOR}", "from:nope@9", "text:", "bogus",
                                        "text:" + "x" * 100_000]), st.text(_CHARS, max_size=12))),
    "learning_rate": (st.floats(0.001, 0.1), st.floats()),
    "epochs": (st.integers(0, 1), uint32),
    "max_steps": (st.just(1), uint32),
    "batch_size": (st.integers(0, 4), uint32),
    "grad_accum": (st.integers(0, 2), uint32),
    "max_length": (st.sampled_from([0, 64]), uint32),
    "eval_fraction": (st.sampled_from([None, 0.2]), st.floats()),
    "eval_every": (st.integers(0, 2), uint32),
    "patience": (st.sampled_from([None, 0, 2]), uint32),
    "warmup_steps": (st.integers(0, 2), uint32),
    "promote_alias": (st.just(""), st.sampled_from(["prod", "../x", "a b", "x" * 300, "\x00"])),
}
_OPTION_FIELDS = ("num_virtual_tokens", "init", "learning_rate", "epochs", "max_steps", "batch_size", "grad_accum",
                  "max_length", "eval_every", "warmup_steps")


@settings(SETTINGS, max_examples=60)
@given(fields=mixed(TRAIN_FIELDS, max_hostile=2))
def _train_prompt_fields(served: Served, fields: dict[str, Any]) -> None:
    """A job that is accepted is cancelled at once: only the answer to the request is under test here."""
    options = pb.TrainingOptions(**{name: fields[name] for name in _OPTION_FIELDS})
    for name in ("eval_fraction", "patience"):
        if fields[name] is not None:
            setattr(options, name, fields[name])
    request = pb.TrainPromptRequest(task=fields["task"], train_jsonl=fields["train_jsonl"],
                                    eval_jsonl=fields["eval_jsonl"], options=options,
                                    promote_alias=fields["promote_alias"])
    training = pb_grpc.TrainingStub(served.channel)
    code, job = answer("TrainPrompt", lambda: training.TrainPrompt(request, timeout=TIMEOUT_S))
    if code == OK:
        answer("CancelTrainingJob", lambda: training.CancelTrainingJob(pb.TrainingJobRequest(job_id=job.job_id),
                                                                       timeout=TIMEOUT_S))
        wait_until(lambda: served.app.jobs.get(job.job_id).state in ("succeeded", "failed", "cancelled"),
                   "the cancelled job to end")
        assert served.app.jobs.get(job.job_id).state != "failed", served.app.jobs.get(job.job_id).error
    served.assert_still_serving()


def test_train_prompt_fields(served: Served) -> None:
    """The property above, then proof it is not vacuous: the statuses its examples reached."""
    seen = _statuses_of(lambda: _train_prompt_fields(served))
    assert seen[("TrainPrompt", "OK")] and seen[("TrainPrompt", "INVALID_ARGUMENT")]


# ---------------------------------------------------------------- uploads

_FLOATS = [torch.float32, torch.float16, torch.bfloat16]
_OTHER_DTYPES = [torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]


def _seeded(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.5


@st.composite
def good_tensors(draw: st.DrawFn, hidden: int) -> torch.Tensor:
    """What PEFT saves: [1..8, hidden] float32/16/bf16, finite."""
    rows = draw(st.integers(1, LIMITS["max_virtual_tokens"]))
    return _seeded((rows, hidden), draw(st.integers(0, 1000))).to(draw(st.sampled_from(_FLOATS)))


@st.composite
def bad_tensors(draw: st.DrawFn, hidden: int) -> torch.Tensor:
    """Wrong dtype (integers, bool, float64), shape, width or row count, or NaN/Inf values."""
    rows = draw(st.sampled_from([0, 1, 3, LIMITS["max_virtual_tokens"] + 1]))
    width = draw(st.sampled_from([hidden, hidden + 1, 1, 0]))
    shape = draw(st.sampled_from([(rows, width), (width,), (1, rows, width), ()]))
    t = _seeded(shape, draw(st.integers(0, 1000)))
    poison = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
    if poison is not None and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = poison
    return t.to(draw(st.sampled_from(_FLOATS + _OTHER_DTYPES)))


def _safetensors(t: torch.Tensor) -> bytes:
    return save_safetensors({"prompt_embeddings": t.contiguous()}, metadata={"format": "pt"})


def _safetensors_header(header: dict[str, Any], body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


class _RunsCode:
    """A pickle that would create a file if anything ever unpickled it."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _pickles(marker: Path) -> list[bytes]:
    _RunsCode.marker = str(marker)
    buffer = io.BytesIO()
    torch.save({"prompt_embeddings": torch.randn(2, 4)}, buffer)  # what an adapter_model.bin holds
    return [pickle.dumps(_RunsCode()), pickle.dumps({"prompt_embeddings": [[0.0] * 4]}), buffer.getvalue()]


def bad_weights(hidden: int, marker: Path) -> st.SearchStrategy[bytes]:
    """Weight files that must be refused: bad tensors, truncations, hostile headers, pickles, random bytes."""
    valid = good_tensors(hidden).map(_safetensors)
    return st.one_of(
        bad_tensors(hidden).map(_safetensors),
        st.tuples(valid, st.floats(0, 0.99)).map(lambda p: p[0][: int(len(p[0]) * p[1])]),
        st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + b"{}"),
        st.sampled_from([
            _safetensors_header({"p": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, b"\0" * 16),
            _safetensors_header({"p": {"dtype": "F32", "shape": [2, hidden], "data_offsets": [0, 10**12]}}),
            _safetensors_header({"p": {"dtype": "F128", "shape": [1, hidden], "data_offsets": [0, 16 * hidden]}}),
            _safetensors_header({"p": {"dtype": "F32", "shape": [-1, hidden], "data_offsets": [0, 0]}}),
            _safetensors_header({"a": {"dtype": "F32", "shape": [1, hidden], "data_offsets": [0, 4 * hidden]},
                                 "b": {"dtype": "F32", "shape": [1, hidden], "data_offsets": [0, 4 * hidden]}},
                                b"\0" * 4 * hidden),
            _safetensors_header({}),
            _safetensors_header({"__metadata__": {"format": "pt"}}),
            b"", *_pickles(marker),
        ]),
        st.just(300_000).map(lambda n: b"\0" * n),  # over the 0.25 MB upload limit
        st.binary(max_size=256),
    )


def bad_configs(hidden: int, num_layers: int) -> st.SearchStrategy[str]:
    """adapter_config.json texts with hostile field values, or not JSON objects at all."""
    fields = st.dictionaries(
        st.sampled_from(["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers",
                         "num_transformer_submodules", "prompt_tuning_init", "num_attention_heads", "num_tasks",
                         "cpt_token_ids"]),
        st.one_of(st.none(), st.integers(-2, 2**40), st.text(_CHARS, max_size=8), st.floats(),
                  st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
                  st.sampled_from(["PROMPT_TUNING", "P_TUNING", "LORA", "PREFIX_TUNING", "CARTRIDGE", "CPT",
                                   "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CAUSAL_LM", "SEQ_2_SEQ_LM",
                                   hidden, num_layers, num_layers + 1])),
        min_size=1, max_size=3,
    )
    return st.one_of(
        fields.map(lambda f: json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", **f})),
        st.text(_CHARS, max_size=40),
        st.sampled_from(["", " ", "null", "[]", "1", '"x"', "{", '{"peft_type": "PROMPT_TUNING"}\x00',
                         '{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 1e999}', "\ufeff{}",
                         json.dumps({"peft_type": "PROMPT_TUNING", "num_layers": num_layers + 1})]),
        _huge("[", 100_000),  # nesting past the JSON parser's recursion limit
        _huge("9", 5_000).map(lambda digits: '{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": ' + digits + "}"),
    )


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pickle") / "unpickled"


def _good_config(t: torch.Tensor, num_layers: int, exact: bool) -> str:
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}
    if exact:  # what PEFT writes; without these fields the tensor alone decides
        config.update(num_virtual_tokens=t.shape[0], token_dim=t.shape[1], num_layers=num_layers)
    return json.dumps(config)


def register_fields(hidden: int, num_layers: int, marker: Path, name: str):
    """RegisterPrompt's fields, valid and hostile; "adapter" is a (config, weights) pair."""
    good_adapter = st.tuples(good_tensors(hidden), st.booleans()).map(
        lambda p: (_good_config(p[0], num_layers, p[1]), _safetensors(p[0])))
    bad_adapter = st.one_of(
        st.tuples(bad_configs(hidden, num_layers), good_tensors(hidden).map(_safetensors)),
        st.tuples(st.just(json.dumps({"peft_type": "PROMPT_TUNING"})), bad_weights(hidden, marker)),
    )
    return {
        "name": (st.just(name), attack_names),
        "adapter": (good_adapter, bad_adapter),
        "fingerprint": (st.just(""), st.sampled_from(["0123456789abcdef", "\x00", "x" * 300])),
        "force": (st.just(False), st.booleans()),
        "description": (st.text(_CHARS, max_size=20), st.one_of(_huge("d", 5_000), st.just("\x00" * 10))),
        "tags": (st.dictionaries(st.sampled_from(["team", "owner"]), st.text(_CHARS, max_size=5), max_size=2),
                 st.sampled_from([{f"k{i}": "v" for i in range(70)}, {"k": "v" * 300}, {"": "v"}, {"\x00": ""}])),
    }


@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def _register_peft_uploads(served: Served, marker: Path, data: st.DataObject) -> None:
    f = data.draw(mixed(register_fields(served.hidden, served.base.spec.num_layers, marker, "hostile")))
    config, blob = f["adapter"]
    request = pb.RegisterPromptRequest(
        name=f["name"], peft=pb.PeftAdapter(adapter_config_json=config, adapter_model_safetensors=blob),
        force=f["force"], base_model_fingerprint=f["fingerprint"], description=f["description"], tags=f["tags"])
    code, info = answer("RegisterPrompt", lambda: served.registry.RegisterPrompt(request, timeout=TIMEOUT_S))
    assert not os.path.exists(marker), "an uploaded pickle was unpickled"
    if code == OK:
        got = served.registry.GetPrompt(pb.GetPromptRequest(ref=info.ref), timeout=TIMEOUT_S)
        assert got.sha256 == info.sha256 and 1 <= got.num_virtual_tokens <= LIMITS["max_virtual_tokens"]
    served.assert_still_serving()


def test_register_peft_uploads(served: Served, marker: Path) -> None:
    """The property above, then proof it is not vacuous: the statuses its examples reached."""
    seen = _statuses_of(lambda: _register_peft_uploads(served, marker))
    assert seen[("RegisterPrompt", "OK")] >= 3 and seen[("RegisterPrompt", "INVALID_ARGUMENT")]


@st.composite
def raw_tensors(draw: st.DrawFn, hidden: int) -> pb.RawTensor:
    """RawTensor messages: a valid matrix, or a hostile shape, dtype name or byte count."""
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    hostile = draw(st.sets(st.sampled_from(["shape", "dtype", "data", "values"]), max_size=2))
    shape = [draw(st.integers(1, LIMITS["max_virtual_tokens"])), hidden]
    if "shape" in hostile:
        shape = draw(st.lists(st.one_of(st.integers(0, 10), st.sampled_from([hidden, hidden + 1, 2**32 - 1])),
                              max_size=4))
    dtype = draw(st.sampled_from(sorted(names)))
    if "dtype" in hostile:
        dtype = draw(st.sampled_from(["float64", "int8", "int64", "", "FLOAT32", "f32", "\x00", "float32\x00"]))
    count = 1
    for d in shape:
        count *= d
    if "data" in hostile or count > 4096:
        return pb.RawTensor(shape=shape, dtype=dtype, data=draw(st.binary(max_size=64)))
    values = _seeded((count,), draw(st.integers(0, 1000)))
    if "values" in hostile and count:
        values[draw(st.integers(0, count - 1))] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    typed = values.to(names.get(dtype, torch.float32))
    return pb.RawTensor(shape=shape, dtype=dtype, data=typed.view(torch.uint8).numpy().tobytes())


@settings(SETTINGS, max_examples=60)
@given(data=st.data(), name=st.one_of(st.just("hostile-raw"), attack_names))
def _register_raw_tensors(served: Served, data: st.DataObject, name: str) -> None:
    tensor = data.draw(raw_tensors(served.hidden), label="tensor")
    request = pb.RegisterPromptRequest(name=name, tensor=tensor)
    code, info = answer("RegisterPrompt", lambda: served.registry.RegisterPrompt(request, timeout=TIMEOUT_S))
    if code == OK:
        assert list(tensor.shape) == [info.num_virtual_tokens, served.hidden]
    served.assert_still_serving()


def test_register_raw_tensors(served: Served) -> None:
    """The property above, then proof it is not vacuous: the statuses its examples reached."""
    seen = _statuses_of(lambda: _register_raw_tensors(served))
    assert seen[("RegisterPrompt", "OK")] and seen[("RegisterPrompt", "INVALID_ARGUMENT")]


# ---------------------------------------------------------------- registry calls


@settings(SETTINGS, max_examples=60)
@given(call=st.sampled_from(["GetPrompt", "DeletePrompt", "SetAlias", "ListPrompts"]), ref=refs,
       target=attack_names, alias=refs, version=st.one_of(st.integers(0, 3), st.just(2**32 - 1)),
       every=st.booleans(), force=st.booleans(), page_size=st.one_of(st.integers(0, 3), st.just(2**32 - 1)),
       token=st.one_of(st.just(""), st.text(_CHARS, max_size=30), st.sampled_from(["eyJmIjoiIn0", "e30", "=" * 9])))
def _registry_calls(served: Served, call: str, ref: str, target: str, alias: str, version: int, every: bool,
                        force: bool, page_size: int, token: str) -> None:
    reg = served.registry
    if call == "GetPrompt":
        answer(call, lambda: reg.GetPrompt(pb.GetPromptRequest(ref=ref), timeout=TIMEOUT_S))
    elif call == "DeletePrompt":  # never the anchor: it proves the server still serves
        answer(call, lambda: reg.DeletePrompt(pb.DeletePromptRequest(ref=target, all_versions=every, force=force),
                                              timeout=TIMEOUT_S))
    elif call == "SetAlias":
        answer(call, lambda: reg.SetAlias(pb.SetAliasRequest(name=target, alias=alias, version=version),
                                          timeout=TIMEOUT_S))
    else:
        answer(call, lambda: reg.ListPrompts(pb.ListPromptsRequest(name=ref, page_size=page_size, page_token=token),
                                             timeout=TIMEOUT_S))
    served.assert_still_serving()


def test_registry_calls(served: Served) -> None:
    """The property above, then proof it is not vacuous: the statuses its examples reached."""
    seen = _statuses_of(lambda: _registry_calls(served))
    # Which refs exist depends on what other tests registered: found or not, some call got an answer.
    assert seen[("GetPrompt", "INVALID_ARGUMENT")] and seen[("SetAlias", "INVALID_ARGUMENT")]
    assert sum(n for (_, code), n in seen.items() if code in ("OK", "NOT_FOUND")) >= 1


# ---------------------------------------------------------------- the bugs these properties found


def _peft(config: str, rows: int = 2, hidden: int = 64) -> pb.PeftAdapter:
    return pb.PeftAdapter(adapter_config_json=config, adapter_model_safetensors=_safetensors(_seeded((rows, hidden), 0)))


REGRESSIONS: list[tuple[str, str, Callable[[Served], Callable[[], Any]], grpc.StatusCode]] = [
    # Temperature 1e-40 overflowed logits / T to inf, softmax gave NaN, and the whole batch's step failed.
    ("tiny-temperature", "Generate", lambda s: lambda: s.inference.Generate(pb.GenerateRequest(
        input="hello", params=pb.DecodingParameters(temperature=1e-40, max_new_tokens=3)), timeout=TIMEOUT_S), OK),
    ("tiny-temperature-top-p", "Generate", lambda s: lambda: s.inference.Generate(pb.GenerateRequest(
        input="hello", params=pb.DecodingParameters(temperature=1e-45, top_p=0.5, top_k=3, max_new_tokens=3)),
        timeout=TIMEOUT_S), OK),
    # A list or object as peft_type crashed the unsupported-type table lookup (unhashable).
    ("peft-type-list", "RegisterPrompt", lambda s: lambda: s.registry.RegisterPrompt(pb.RegisterPromptRequest(
        name="r", peft=_peft(json.dumps({"peft_type": [1]}), hidden=s.hidden)), timeout=TIMEOUT_S),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("peft-type-object", "RegisterPrompt", lambda s: lambda: s.registry.RegisterPrompt(pb.RegisterPromptRequest(
        name="r", peft=_peft(json.dumps({"peft_type": {"a": 1}}), hidden=s.hidden)), timeout=TIMEOUT_S),
     grpc.StatusCode.INVALID_ARGUMENT),
    # An integer past Python's 4300-digit limit raised a plain ValueError out of the JSON parser.
    ("config-huge-integer", "RegisterPrompt", lambda s: lambda: s.registry.RegisterPrompt(pb.RegisterPromptRequest(
        name="r", peft=_peft('{"peft_type": "PROMPT_TUNING", "token_dim": ' + "9" * 5_000 + "}", hidden=s.hidden)),
        timeout=TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT),
    # Messages quote the client's value: a 100 kB name overflowed gRPC's trailers (RESOURCE_EXHAUSTED
    # "received metadata size exceeds hard limit") instead of arriving as INVALID_ARGUMENT.
    ("huge-task-name", "Generate", lambda s: lambda: s.inference.Generate(pb.GenerateRequest(
        task="x" * 100_000, input="hello"), timeout=TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT),
    ("huge-emoji-alias", "GetPrompt", lambda s: lambda: s.registry.GetPrompt(pb.GetPromptRequest(
        ref=ANCHOR + "@" + "\U0001f642" * 5_000), timeout=TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT),
    ("huge-config-value", "RegisterPrompt", lambda s: lambda: s.registry.RegisterPrompt(pb.RegisterPromptRequest(
        name="r", peft=_peft(json.dumps({"peft_type": "PROMPT_TUNING", "num_layers": "y" * 100_000}),
                             hidden=s.hidden)), timeout=TIMEOUT_S), grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("rpc", "make", "expected"), [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS])
def test_found_bugs_stay_fixed(served: Served, rpc: str, make: Callable[[Served], Callable[[], Any]],
                               expected: grpc.StatusCode) -> None:
    code, _ = answer(rpc, make(served))
    assert code == expected
    served.assert_still_serving()


def test_other_base_model_is_failed_precondition(served: Served) -> None:
    """A prompt made for another base model is refused as FAILED_PRECONDITION unless forced."""
    layers = served.base.spec.num_layers
    cases = [
        (pb.RegisterPromptRequest(name="other-base", peft=_peft("{\"peft_type\": \"PROMPT_TUNING\"}", hidden=served.hidden),
                                  base_model_fingerprint="0123456789abcdef"), grpc.StatusCode.FAILED_PRECONDITION),
        (pb.RegisterPromptRequest(name="other-base", peft=_peft(json.dumps({"peft_type": "PROMPT_TUNING",
                                                                            "num_layers": layers + 1}),
                                                                hidden=served.hidden)),
         grpc.StatusCode.FAILED_PRECONDITION),
        (pb.RegisterPromptRequest(name="other-base", peft=_peft(json.dumps({"peft_type": "PROMPT_TUNING",
                                                                            "num_layers": layers + 1}),
                                                                hidden=served.hidden), force=True), OK),
    ]
    for request, expected in cases:
        code, _ = answer("RegisterPrompt", lambda r=request: served.registry.RegisterPrompt(r, timeout=TIMEOUT_S))
        assert code == expected
    served.assert_still_serving()


# ---------------------------------------------------------------- bytes that are not a request at all

UNDECODABLE = [b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff", b"\x0a\x80\x80\x80\x80\x10"]
UNDECODABLE_IDS = ["invalid-utf8-string", "bad-tag", "truncated-length"]
RAW_METHODS = ["/softprompt.v1.Inference/Generate", "/softprompt.v1.Inference/GenerateStream",
               "/softprompt.v1.Registry/RegisterPrompt", "/softprompt.v1.Inference/Classify"]


def _send_raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    def identity(raw: bytes) -> bytes:  # the bytes go on the wire as they are
        return raw

    rpc = method.rpartition("/")[2] + " (undecodable)"
    if method.endswith("Stream"):
        call = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
        return answer(rpc, lambda: call(payload, timeout=TIMEOUT_S), streaming=True)[0]
    call = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
    return answer(rpc, lambda: call(payload, timeout=TIMEOUT_S))[0]


@pytest.mark.parametrize("method", RAW_METHODS)
@pytest.mark.parametrize("payload", UNDECODABLE, ids=UNDECODABLE_IDS)
def test_undecodable_requests_are_invalid_argument(served: Served, method: str, payload: bytes) -> None:
    """gRPC itself would answer bytes that are not the method's message with INTERNAL."""
    assert _send_raw(served.channel, method, payload) == grpc.StatusCode.INVALID_ARGUMENT
    served.assert_still_serving()


def test_oversized_message_is_resource_exhausted(served: Served) -> None:
    # Past gRPC's own limit (4 MiB here) the transport refuses the message before any servicer runs.
    request = pb.RegisterPromptRequest(name="big", peft=pb.PeftAdapter(adapter_config_json="{}",
                                                                       adapter_model_safetensors=b"\0" * (5 << 20)))
    code, _ = answer("RegisterPrompt", lambda: served.registry.RegisterPrompt(request, timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    served.assert_still_serving()
