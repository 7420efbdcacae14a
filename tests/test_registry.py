"""Tests of softprompt.prompts.registry on real folders, with real PEFT loading and real processes, on S3 (a real
S3 HTTP endpoint on loopback: the `reg` tests run against both stores), and on a store in memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime

import pytest
import torch

from helpers import race
from hypothesis import given, settings
from hypothesis import strategies as st

from softprompt.prompts.base import BaseModelSpec, spec_of
from softprompt.prompts.errors import (
    CorruptPromptError,
    InvalidNameError,
    InvalidPromptError,
    PromptNotFoundError,
    RegistryConflictError,
)
from softprompt.prompts.format.layout import METADATA, PEFT_CONFIG, PEFT_WEIGHTS, TRAINING_REPORT
from softprompt.prompts.format.stored import parse_embeddings, parse_metadata
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.refs import PromptRef
from softprompt.prompts.registry import LocalStore, MissingVersionError, PromptStore, PromptVersion, Registry
from softprompt.prompts.registry.s3 import S3Store

HIDDEN = 32
# The base model facts without building a model: enough for everything but PEFT loading.
SPEC = BaseModelSpec(
    model_id="tiny-llama", hidden_size=HIDDEN, num_layers=2, num_attention_heads=4, vocab_size=128, fingerprint="f" * 16
)


def tiny_llama(seed: int = 0):
    """A fresh tiny LlamaForCausalLM; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def make_prompt(seed: int, rows: int = 4, source_type: str = "PROMPT_TUNING") -> PromptTensor:
    g = torch.Generator().manual_seed(seed)
    return PromptTensor(torch.randn(rows, HIDDEN, generator=g), source_type)


@pytest.fixture(params=["local", "s3"])
def reg(request, tmp_path) -> Registry:
    """A registry on an empty folder, and on an empty bucket of a real S3 endpoint."""
    if request.param == "local":
        return Registry(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint_url")
    bucket = request.getfixturevalue("s3_bucket")
    return Registry(store=S3Store(bucket, "prompts", endpoint_url=endpoint, cache_dir=tmp_path / "cache"))


def tamper(store: PromptStore, name: str, version: int, filename: str, change: Callable[[bytes], bytes | None]) -> None:
    """Replaces a stored file's bytes by `change(bytes)` (None: deletes it) behind the registry's back: on disk, or
    straight through boto3."""
    if isinstance(store, LocalStore):
        path = store.version_dir(name, version) / filename
        data = change(path.read_bytes())
        path.unlink() if data is None else path.write_bytes(data)
        return
    import boto3

    bucket, key = store.location(name, version, filename).removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=store.endpoint_url)
    data = change(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if data is None:
        client.delete_object(Bucket=bucket, Key=key)
    else:
        client.put_object(Bucket=bucket, Key=key, Body=data)


def flip_a_bit(data: bytes) -> bytes:
    return data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:]


def refs(versions: list[PromptVersion]) -> list[str]:
    return [v.ref for v in versions]


# ---------------------------------------------------------------- register and resolve


def test_register_and_resolve(reg):
    p1, p2 = make_prompt(1), make_prompt(2, rows=6)
    v1 = reg.register("sentiment", p1, SPEC, description="first", tags={"lr": "0.03"})
    v2 = reg.register("sentiment", p2, SPEC)
    assert (v1.version, v2.version) == (1, 2)
    assert v1.ref == "sentiment@1" and v2.ref == "sentiment@2"
    assert reg.resolve("sentiment") == v2
    assert reg.resolve("sentiment@latest") == v2
    assert reg.resolve("sentiment@1") == v1
    assert reg.resolve(PromptRef("sentiment", version=1)) == v1
    assert v1.description == "first" and v1.tags == {"lr": "0.03"}
    assert (v1.num_virtual_tokens, v1.hidden_size, v2.num_virtual_tokens) == (4, HIDDEN, 6)
    assert v1.base_model_fingerprint == SPEC.fingerprint and v1.base_model_id == "tiny-llama"
    assert v1.source_type == "PROMPT_TUNING" and v1.aliases == ()
    assert datetime.fromisoformat(v1.created_at.replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert v1.created_at.endswith("Z")
    assert torch.equal(reg.load_embeddings(v1), p1.embeddings)
    assert torch.equal(reg.load_embeddings(reg.resolve("sentiment")), p2.embeddings)
    # The checksum is the weights file's, so clients can verify downloads.
    assert v1.sha256 == hashlib.sha256(reg.store.read_file("sentiment", 1, PEFT_WEIGHTS)).hexdigest()
    assert reg.tasks() == ["sentiment"]


def test_metadata_survives_reopening(tmp_path):
    root = tmp_path / "store"
    v = Registry(root).register("t", make_prompt(0), SPEC, tags={"a": "b"}, base_model_fingerprint="abc")
    again = Registry(root).resolve("t@1")
    assert again == v
    assert again.base_model_fingerprint == "abc"
    on_disk = json.loads((root / "t" / "1" / METADATA).read_text())
    assert on_disk["name"] == "t" and on_disk["version"] == 1 and on_disk["sha256"] == v.sha256


def test_register_revalidates_the_tensor(reg):
    bad = PromptTensor(torch.full((2, HIDDEN), float("nan")), "RAW")
    with pytest.raises(InvalidPromptError):
        reg.register("t", bad, SPEC)
    with pytest.raises(InvalidPromptError):
        reg.register("t", PromptTensor(torch.randn(2, 7), "RAW"), SPEC)
    assert reg.tasks() == []
    # Nothing half-written is left behind.
    assert reg.store.clean_stale_temp(max_age_s=0) == []


def test_not_found_messages_list_what_exists(reg):
    with pytest.raises(PromptNotFoundError) as e:
        reg.resolve("x")
    assert "registry is empty" in str(e.value)
    reg.register("x", make_prompt(1), SPEC)
    reg.register("x", make_prompt(2), SPEC)
    reg.set_alias("x", "prod", 1)
    with pytest.raises(PromptNotFoundError) as e:
        reg.resolve("x@7")
    assert "task 'x' has versions 1 and 2 and alias prod" in str(e.value)
    with pytest.raises(PromptNotFoundError) as e:
        reg.resolve("x@staging")
    assert "no alias 'staging'" in str(e.value) and "alias prod" in str(e.value)
    with pytest.raises(PromptNotFoundError) as e:
        reg.resolve("y")
    assert "no task named 'y'" in str(e.value) and "registered tasks: x" in str(e.value)


# ---------------------------------------------------------------- names


BAD_NAMES = [
    "../x", "a/b", "", " x", "x ", "x@", "ünïcode", "..", ".", ".tmp", ".hidden", "a\\b", "x" * 65,
    "a\nb", "x\n", "-x", "_x", "a b", "a:b", "/abs",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(reg, name):
    with pytest.raises(InvalidNameError):
        reg.register(name, make_prompt(0), SPEC)
    with pytest.raises(InvalidNameError):
        reg.set_alias(name, "prod", 1)
    # Nothing was created anywhere, inside or outside the store.
    assert reg.store.task_names() == []
    if isinstance(reg.store, LocalStore):
        assert sorted(p.name for p in reg.store.root.iterdir()) == [".tmp"]
        assert sorted(p.name for p in reg.store.root.parent.iterdir()) == ["store"]


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("", "empty"),
        ("x@", "nothing after '@'"),
        ("x@@1", "more than one '@'"),
        ("x@1@2", "more than one '@'"),
        ("x@0", "starting at 1"),
        ("x@01", "leading zeros"),
        ("x@-1", "invalid alias"),
        ("x@1.5", "invalid version"),
        ("x@1a", "invalid version"),
        ("x@pr od", "invalid alias"),
        ("x@" + "a" * 33, "invalid alias"),
        ("../x@1", "invalid task name"),
        ("@prod", "empty"),
    ],
)
def test_bad_refs(ref, fragment):
    with pytest.raises(InvalidNameError) as e:
        PromptRef.parse(ref)
    assert fragment in str(e.value)


def test_ref_parsing():
    assert PromptRef.parse("a") == PromptRef("a")
    assert PromptRef.parse("a@3") == PromptRef("a", version=3)
    assert PromptRef.parse("a@prod") == PromptRef("a", alias="prod")
    assert PromptRef.parse("a@latest") == PromptRef("a")
    assert PromptRef.parse("123@4") == PromptRef("123", version=4)  # all-digit names are allowed
    assert PromptRef.parse("v1.2_x-y@P-1_a") == PromptRef("v1.2_x-y", alias="P-1_a")
    assert str(PromptRef("a", version=3)) == "a@3" and str(PromptRef("a", alias="prod")) == "a@prod"
    with pytest.raises(InvalidNameError):
        PromptRef("a", version=1, alias="prod")
    with pytest.raises(InvalidNameError):
        PromptRef("a", alias="latest")


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
_suffixes = st.one_of(
    st.none(),
    st.integers(min_value=1, max_value=10**9).map(str),
    st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,31}", fullmatch=True).filter(lambda a: a != "latest"),
)


@settings(max_examples=200, deadline=None)
@given(_names, _suffixes)
def test_ref_round_trip(name, suffix):
    text = name if suffix is None else f"{name}@{suffix}"
    ref = PromptRef.parse(text)
    assert str(ref) == text and PromptRef.parse(str(ref)) == ref
    assert ref.name == name


# ---------------------------------------------------------------- aliases


def test_aliases(tmp_path):
    reg = Registry(tmp_path / "s")
    for seed in range(3):
        reg.register("t", make_prompt(seed), SPEC)
    v = reg.set_alias("t", "prod", 2)
    assert v.version == 2 and v.aliases == ("prod",)
    reg.set_alias("t", "canary", 2)
    assert reg.resolve("t@prod").aliases == ("canary", "prod")
    assert reg.resolve("t@2").aliases == ("canary", "prod")
    assert reg.resolve("t").aliases == ()  # newest is 3
    # Moving an alias.
    reg.set_alias("t", "canary", 3)
    assert reg.resolve("t@canary").version == 3
    assert reg.resolve("t@2").aliases == ("prod",)
    # Aliases survive new versions and reopening.
    reg.register("t", make_prompt(9), SPEC)
    reopened = Registry(tmp_path / "s")
    assert reopened.resolve("t@prod").version == 2
    assert reopened.resolve("t@canary").version == 3
    assert reopened.resolve("t").version == 4
    assert torch.equal(reopened.load_embeddings(reopened.resolve("t@prod")), make_prompt(1).embeddings)


def test_alias_errors(reg):
    reg.register("t", make_prompt(0), SPEC)
    with pytest.raises(PromptNotFoundError) as e:
        reg.set_alias("t", "prod", 5)
    assert "task 't' has version 1" in str(e.value)
    with pytest.raises(PromptNotFoundError):
        reg.set_alias("nosuch", "prod", 1)
    assert reg.tasks() == ["t"] and reg.store.task_names() == ["t"]
    with pytest.raises(InvalidNameError) as e:
        reg.set_alias("t", "latest", 1)
    assert "reserved" in str(e.value)
    for bad in ("3", "1abc", "", "a@b", "a/b", "-a"):
        with pytest.raises(InvalidNameError):
            reg.set_alias("t", bad, 1)
    with pytest.raises(InvalidNameError):
        reg.set_alias("t", "prod", 0)


# ---------------------------------------------------------------- delete


def test_delete_version_and_numbers_never_reused(reg):
    for seed in range(3):
        reg.register("t", make_prompt(seed), SPEC)
    assert reg.delete("t@3") == ["t@3"]
    assert reg.resolve("t").version == 2
    with pytest.raises(PromptNotFoundError):
        reg.resolve("t@3")
    assert reg.register("t", make_prompt(5), SPEC).version == 4
    assert reg.delete("t@4") == ["t@4"]
    assert reg.delete("t@2") == ["t@2"]
    assert reg.resolve("t").version == 1
    assert reg.register("t", make_prompt(6), SPEC).version == 5
    with pytest.raises(PromptNotFoundError) as e:
        reg.delete("t@2")
    assert "versions 1 and 5" in str(e.value)


def test_delete_aliased_version_needs_force(reg):
    reg.register("t", make_prompt(0), SPEC)
    reg.register("t", make_prompt(1), SPEC)
    reg.set_alias("t", "prod", 1)
    reg.set_alias("t", "stable", 1)
    reg.set_alias("t", "canary", 2)
    with pytest.raises(RegistryConflictError) as e:
        reg.delete("t@1")
    assert "prod and stable" in str(e.value) and "force=True" in str(e.value)
    assert reg.resolve("t@prod").version == 1  # untouched
    assert reg.delete("t@1", force=True) == ["t@1"]
    with pytest.raises(PromptNotFoundError):
        reg.resolve("t@prod")
    assert reg.resolve("t@canary").version == 2
    assert reg.resolve("t@2").aliases == ("canary",)


def test_delete_whole_task(reg):
    reg.register("t", make_prompt(0), SPEC)
    reg.register("t", make_prompt(1), SPEC)
    reg.register("u", make_prompt(2), SPEC)
    reg.set_alias("t", "prod", 2)
    with pytest.raises(InvalidNameError) as e:
        reg.delete("t")
    assert "all_versions" in str(e.value)
    with pytest.raises(InvalidNameError) as e:
        reg.delete("t@2", all_versions=True)
    assert "bare task name" in str(e.value)
    with pytest.raises(InvalidNameError):
        reg.delete("t@prod")
    with pytest.raises(RegistryConflictError):  # t@prod points at t@2: as for one version, --force (issue 23)
        reg.delete("t", all_versions=True)
    assert reg.delete("t", all_versions=True, force=True) == ["t@1", "t@2"]
    assert reg.tasks() == ["u"]
    with pytest.raises(PromptNotFoundError) as e:
        reg.resolve("t")
    assert "registered tasks: u" in str(e.value)
    with pytest.raises(PromptNotFoundError):
        reg.delete("t", all_versions=True)
    with pytest.raises(PromptNotFoundError):
        reg.delete("nosuch@1")
    assert "nosuch" not in reg.store.task_names()
    # Re-creating the task continues the numbering; the old alias is gone.
    v = reg.register("t", make_prompt(3), SPEC)
    assert v.version == 3 and v.aliases == ()
    assert reg.list_page("t")[0] == [v]


def test_numbering_survives_a_lost_counter(tmp_path):
    reg = Registry(tmp_path / "store")
    for seed in range(3):
        reg.register("t", make_prompt(seed), SPEC)
    (reg.store.root / "t" / "counter").unlink()
    assert reg.register("t", make_prompt(7), SPEC).version == 4


# ---------------------------------------------------------------- listing


def _fill(reg: Registry) -> None:
    for name, count in (("b", 2), ("a", 3), ("c", 1)):
        for i in range(count):
            reg.register(name, make_prompt(i), SPEC)


def test_list_pages(reg):
    _fill(reg)
    everything, token = reg.list_page()
    assert refs(everything) == ["a@3", "a@2", "a@1", "b@2", "b@1", "c@1"] and token == ""
    for size in (1, 2, 4, 5, 6):
        seen, token = [], ""
        while True:
            page, token = reg.list_page(page_size=size, page_token=token)
            assert len(page) <= size
            seen += refs(page)
            if not token:
                break
        assert seen == refs(everything), size
    page, token = reg.list_page("a", page_size=2)
    assert refs(page) == ["a@3", "a@2"] and token
    page, token = reg.list_page("a", page_size=2, page_token=token)
    assert refs(page) == ["a@1"] and token == ""
    assert reg.list_page("nosuch") == ([], "")
    assert refs(reg.list_page(page_size=0)[0]) == refs(everything)


def test_list_shows_aliases(reg):
    _fill(reg)
    reg.set_alias("a", "prod", 2)
    listed = {v.ref: v for v in reg.list_page()[0]}
    assert listed["a@2"].aliases == ("prod",) and listed["a@3"].aliases == ()


def test_list_tokens_are_stable_under_changes(reg):
    _fill(reg)
    page, token = reg.list_page(page_size=2)
    assert refs(page) == ["a@3", "a@2"]
    reg.delete("a@2")  # the token's own key disappears
    reg.delete("b@2")  # an unseen item disappears
    reg.register("a", make_prompt(9), SPEC)  # a@4 sorts before the token: not in later pages
    reg.register("aa", make_prompt(9), SPEC)  # sorts after the token: appears
    rest = []
    while token:
        page, token = reg.list_page(page_size=2, page_token=token)
        rest += refs(page)
    assert rest == ["a@1", "aa@1", "b@1", "c@1"]


@pytest.mark.parametrize("token", ["garbage!", "eyJ4IjoxfQ", "bm90IGpzb24", "e30"])
def test_bad_page_token(reg, token):
    _fill(reg)
    with pytest.raises(InvalidNameError) as e:
        reg.list_page(page_token=token)
    assert "next_page_token" in str(e.value)


def test_page_token_from_another_listing(reg):
    _fill(reg)
    _, token = reg.list_page("a", page_size=1)
    with pytest.raises(InvalidNameError) as e:
        reg.list_page("b", page_token=token)
    assert "same name" in str(e.value)
    with pytest.raises(InvalidNameError):
        reg.list_page(page_token=token)
    with pytest.raises(InvalidNameError):
        reg.list_page(page_size=-1)


# ---------------------------------------------------------------- PEFT loading and integrity


@pytest.mark.parametrize("source_type", ["PROMPT_TUNING", "P_TUNING", "RAW"])
def test_version_folder_and_export_load_with_peft(tmp_path, source_type):
    from peft import PeftModel

    model = tiny_llama(0)
    base = spec_of(model, "tiny-llama")
    reg = Registry(tmp_path / "s")
    prompt = make_prompt(3, rows=5, source_type=source_type)
    v = reg.register("t", prompt, base)
    assert v.source_type == source_type
    # The local store's own version folder and an exported copy both load as-is.
    exported = reg.export("t@1", tmp_path / "exported")
    assert sorted(p.name for p in exported.iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS, METADATA])
    for folder in (reg.store.version_dir("t", v.version), exported):
        peft_model = PeftModel.from_pretrained(tiny_llama(0), folder)
        assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), prompt.embeddings)
        assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, prompt.embeddings)
    # The loaded adapter prepends exactly our tensor.
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        x = torch.cat([prompt.embeddings[None], model.get_input_embeddings()(ids)], dim=1)
        expected = model(inputs_embeds=x).logits[:, prompt.embeddings.shape[0]:]
        got = peft_model(input_ids=ids).logits[:, prompt.embeddings.shape[0]:]
    assert torch.allclose(got, expected, atol=1e-5)


def test_corrupt_weights_detected_on_load(reg, tmp_path):
    v = reg.register("t", make_prompt(0), SPEC)
    tamper(reg.store, "t", 1, PEFT_WEIGHTS, flip_a_bit)
    with pytest.raises(CorruptPromptError) as e:
        reg.load_embeddings(v)
    assert "sha256" in str(e.value) and "register the prompt again" in str(e.value)
    with pytest.raises(CorruptPromptError):
        reg.export(v, tmp_path / "exported")
    tamper(reg.store, "t", 1, PEFT_WEIGHTS, lambda _: None)
    with pytest.raises(CorruptPromptError, match="missing"):
        reg.load_embeddings(v)


def test_corrupt_metadata_detected_on_resolve_and_skipped_in_listing(reg):
    reg.register("t", make_prompt(0), SPEC)
    reg.register("t", make_prompt(1), SPEC)
    tamper(reg.store, "t", 2, METADATA, lambda _: b'{"name": "t"}')
    with pytest.raises(CorruptPromptError):
        reg.resolve("t@2")
    assert refs(reg.list_page()[0]) == ["t@1"]


def test_copied_version_folder_is_detected(tmp_path):
    import shutil

    reg = Registry(tmp_path / "store")
    reg.register("t", make_prompt(0), SPEC)
    shutil.copytree(reg.store.root / "t" / "1", reg.store.root / "t" / "7")
    with pytest.raises(CorruptPromptError) as e:
        reg.resolve("t@7")
    assert "moved or copied" in str(e.value)


def test_deleted_version_cannot_be_loaded(reg, tmp_path):
    v = reg.register("t", make_prompt(0), SPEC)
    reg.register("t", make_prompt(1), SPEC)
    reg.delete("t@1")
    with pytest.raises(PromptNotFoundError):
        reg.export(v, tmp_path / "exported")
    with pytest.raises(PromptNotFoundError):
        reg.load_embeddings(v)


def test_leftover_temp_dirs_are_ignored_and_old_ones_cleaned(tmp_path):
    root = tmp_path / "s"
    reg = Registry(root)
    reg.register("t", make_prompt(0), SPEC)
    # A writer that crashed mid-write left a half-written staging folder, a fresh and an old one.
    fresh = root / ".tmp" / "stage-crashed"
    fresh.mkdir()
    (fresh / PEFT_WEIGHTS).write_bytes(b"partial")
    old = root / ".tmp" / "stage-ancient"
    old.mkdir()
    (old / PEFT_CONFIG).write_text("{")
    an_hour_ago = time.time() - 2 * 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert reg.tasks() == ["t"]
    assert refs(reg.list_page()[0]) == ["t@1"]
    reopened = Registry(root)
    assert not old.exists() and fresh.exists()
    assert reopened.register("t", make_prompt(1), SPEC).version == 2
    assert reopened.tasks() == ["t"] and refs(reopened.list_page()[0]) == ["t@2", "t@1"]


def test_failed_publish_leaves_no_version(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "store")
    reg.register("t", make_prompt(0), SPEC)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # Fails after the number was allocated, where the staged version would be renamed into place.
    monkeypatch.setattr(LocalStore, "_move_into_place", crash)
    with pytest.raises(OSError):
        reg.register("t", make_prompt(1), SPEC)
    monkeypatch.undo()
    assert refs(reg.list_page()[0]) == ["t@1"]
    assert list((reg.store.root / ".tmp").iterdir()) == []
    # The number given to the failed write is not handed out again.
    assert reg.register("t", make_prompt(2), SPEC).version == 3


# ---------------------------------------------------------------- concurrency


def _register_many(root: str, worker: int, count: int, barrier, results) -> None:
    """Runs in a spawned process: registers `count` versions of the same task as fast as it can."""
    made: list[int] = []
    try:
        reg = Registry(root)
        barrier.wait(timeout=60)
        for i in range(count):
            seed = worker * 1000 + i
            made.append(reg.register("shared", make_prompt(seed), SPEC, tags={"seed": str(seed)}).version)
    except BaseException as e:  # reported to the parent, so the test fails fast with the cause
        results.put((worker, made, repr(e)))
        raise
    results.put((worker, made, None))


def test_two_processes_get_distinct_consecutive_versions(tmp_path):
    root = tmp_path / "s"
    Registry(root)
    got = race(_register_many, str(root), 10, timeout=120)
    assert sorted(got[1] + got[2]) == list(range(1, 21))
    # Each process saw its own versions in increasing order.
    assert got[1] == sorted(got[1]) and got[2] == sorted(got[2])
    reg = Registry(root)
    listed = reg.list_page("shared")[0]
    assert [v.version for v in listed] == list(range(20, 0, -1))
    for v in listed:
        assert torch.equal(reg.load_embeddings(v), make_prompt(int(v.tags["seed"])).embeddings)


def test_threads_share_a_registry(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    reg = Registry(tmp_path / "s")
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda i: reg.register("t", make_prompt(i), SPEC).version, range(24)))
    assert sorted(versions) == list(range(1, 25))


def test_aliases_never_point_at_deleted_versions(reg):
    """Alias moves racing forced deletes: every alias still points at a stored version afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    for seed in range(12):
        reg.register("t", make_prompt(seed), SPEC)

    def move() -> None:
        for v in range(1, 13):
            with contextlib.suppress(PromptNotFoundError):
                reg.set_alias("t", "prod", v)

    def delete() -> None:
        for v in range(1, 12):
            reg.delete(f"t@{v}", force=True)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(move), pool.submit(delete)]:
            future.result()
    assert reg.store.versions("t") == [12]
    assert set(reg.store.read_aliases("t").values()) <= {12}


# ---------------------------------------------------------------- any store


class MemoryStore(PromptStore):
    """A store in a dict, to show the registry needs nothing of a store but the `PromptStore` interface."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, int] = {}
        self.tasks: dict[str, dict[int, dict[str, bytes]]] = {}
        self.aliases: dict[str, dict[str, int]] = {}

    def task_names(self) -> list[str]:
        return sorted(self.tasks)

    def versions(self, name: str) -> list[int]:
        return sorted(self.tasks.get(name, {}))

    def _files(self, name: str, version: int) -> dict[str, bytes]:
        try:
            return self.tasks[name][version]
        except KeyError:
            raise MissingVersionError(f"{name}@{version}") from None

    def file_names(self, name: str, version: int) -> list[str]:
        return sorted(self._files(name, version))

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        return self._files(name, version)[filename]

    def read_aliases(self, name: str) -> dict[str, int]:
        return dict(self.aliases.get(name, {}))

    def location(self, name: str, version: int | None = None, filename: str | None = None) -> str:
        return "/".join(["memory:", name, *([str(version)] if version else []), *([filename] if filename else [])])

    def publish(self, name, files, numbered) -> int:
        with self.lock:
            version = self.counters[name] = self.counters.get(name, 0) + 1
            self.tasks.setdefault(name, {})[version] = {**files, **numbered(version)}
        return version

    def swap_aliases(self, name, expected, new) -> bool:
        with self.lock:
            stored = self.tasks.get(name, {})
            if self.read_aliases(name) != expected or any(v not in stored for v in new.values()):
                return False
            self.aliases[name] = dict(new)
        return True

    def delete_version(self, name: str, version: int) -> bool:
        with self.lock:
            self._files(name, version)
            if version in self.aliases.get(name, {}).values():
                return False
            del self.tasks[name][version]
        return True

    def clean_stale_temp(self, max_age_s: float = 0.0) -> list[str]:
        return []


def test_registry_on_another_store(tmp_path):
    reg = Registry(store=MemoryStore())
    v1 = reg.register("t", make_prompt(1), SPEC, attachments={TRAINING_REPORT: b"{}\n"})
    reg.register("t", make_prompt(2), SPEC)
    assert reg.resolve("t").version == 2 and reg.resolve("t@1") == v1
    assert torch.equal(reg.load_embeddings(v1), make_prompt(1).embeddings)
    assert reg.attachments(v1) == {TRAINING_REPORT: b"{}\n"} and reg.attachments(reg.resolve("t")) == {}
    reg.set_alias("t", "prod", 1)
    with pytest.raises(RegistryConflictError):
        reg.set_alias("t", "prod", 2, expected=None)
    with pytest.raises(RegistryConflictError):
        reg.delete("t@1")
    folder = reg.export("t@prod", tmp_path / "exported")
    exported_weights = (folder / PEFT_WEIGHTS).read_bytes()
    assert torch.equal(parse_embeddings(exported_weights, v1.sha256, where="export"), make_prompt(1).embeddings)
    assert parse_metadata((folder / METADATA).read_bytes(), where="export") == {**v1.to_metadata(), "init": None}
    assert reg.delete("t@1", force=True) == ["t@1"]
    assert refs(reg.list_page()[0]) == ["t@2"]
    assert reg.delete("t", all_versions=True) == ["t@2"]
    assert reg.register("t", make_prompt(3), SPEC).version == 3
    # Errors name where the damaged file lives, in the store's own terms.
    reg.store.tasks["t"][3][PEFT_WEIGHTS] = b"damaged"
    with pytest.raises(CorruptPromptError) as e:
        reg.load_embeddings(reg.resolve("t"))
    assert "memory:/t/3/adapter_model.safetensors has sha256" in str(e.value)
