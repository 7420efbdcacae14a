"""Tests of the S3 store (softprompt.prompts.registry.s3) and of store URLs (open_store), against a real S3 HTTP
endpoint on loopback (moto's server, `s3_endpoint_url` in conftest): real processes racing for numbers, a writer
killed mid-upload, objects changed behind the store's back, alias compare-and-swap, and every way opening fails.

The registry's own suite (tests/test_registry.py) runs against this store too.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
import boto3
import pytest
import torch

from helpers import race

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import CorruptPromptError, StoreUnavailableError
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import LocalStore, MissingVersionError, Registry, open_store
from softprompt.prompts.registry.s3 import S3Store

HIDDEN = 16
SPEC = BaseModelSpec(
    model_id="tiny", hidden_size=HIDDEN, num_layers=2, num_attention_heads=4, vocab_size=64, fingerprint="f" * 16
)
FILES = {"a.bin": b"alpha" * 100, "b.json": b"{}\n"}


def make_prompt(seed: int) -> PromptTensor:
    return PromptTensor(torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(seed)), "PROMPT_TUNING")


def no_numbered(version: int) -> dict[str, bytes]:
    return {}


@pytest.fixture
def store(s3_endpoint_url, s3_bucket, tmp_path) -> S3Store:
    return S3Store(s3_bucket, "team/prompts", endpoint_url=s3_endpoint_url, cache_dir=tmp_path / "cache")


def keys(store: S3Store, under: str = "") -> list[str]:
    """Every object key in the store's bucket under `under` (relative to the store's prefix)."""
    client = boto3.client("s3", endpoint_url=store.endpoint_url)
    found = client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/{under}").get("Contents", [])
    return sorted(item["Key"].removeprefix(f"{store.prefix}/") for item in found)


def object_of(store: S3Store, url: str) -> tuple[object, str, str]:
    """A boto3 client and the bucket and key of an s3:// URL the store reported."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    return boto3.client("s3", endpoint_url=store.endpoint_url), bucket, key


# ---------------------------------------------------------------- layout, reads and the cache


def test_publish_lays_out_files_then_manifest(store):
    version = store.publish("t", FILES, lambda v: {"n.txt": str(v).encode()})
    assert version == 1 and store.versions("t") == [1] and store.task_names() == ["t"]
    assert store.file_names("t", 1) == ["a.bin", "b.json", "n.txt"]
    assert store.read_file("t", 1, "n.txt") == b"1" and store.read_file("t", 1, "a.bin") == FILES["a.bin"]
    assert keys(store) == ["t/1/a.bin", "t/1/b.json", "t/1/n.txt", "t/claims/1", "t/manifests/1.json"]
    assert store.location("t", 1, "a.bin") == f"s3://{store.bucket}/team/prompts/t/1/a.bin"
    with pytest.raises(FileNotFoundError):
        store.read_file("t", 1, "other.bin")
    with pytest.raises(MissingVersionError):
        store.read_file("t", 2, "a.bin")
    with pytest.raises(MissingVersionError):
        store.file_names("t", 2)


def test_a_version_once_read_is_never_downloaded_again(store, tmp_path):
    store.publish("t", FILES, no_numbered)
    assert store.read_file("t", 1, "a.bin") == FILES["a.bin"]
    # Gone from the store, the bytes still come from the cache, checked against the manifest.
    client, bucket, key = object_of(store, store.location("t", 1, "a.bin"))
    client.delete_object(Bucket=bucket, Key=key)
    assert store.read_file("t", 1, "a.bin") == FILES["a.bin"]
    # Another store sharing the cache folder needs no download either.
    other = S3Store(store.bucket, store.prefix, endpoint_url=store.endpoint_url, cache_dir=tmp_path / "cache")
    assert other.read_file("t", 1, "a.bin") == FILES["a.bin"]
    # A damaged cache entry is dropped and the object downloaded again: here it is gone, so that is an error.
    (tmp_path / "cache" / hashlib.sha256(FILES["a.bin"]).hexdigest()).write_bytes(b"damaged")
    with pytest.raises(CorruptPromptError, match="missing"):
        store.read_file("t", 1, "a.bin")


def test_changed_object_is_detected_on_read(store):
    store.publish("t", FILES, no_numbered)
    url = store.location("t", 1, "a.bin")
    client, bucket, key = object_of(store, url)
    client.put_object(Bucket=bucket, Key=key, Body=FILES["a.bin"][:-1] + b"!")
    with pytest.raises(CorruptPromptError) as e:
        store.read_file("t", 1, "a.bin")
    assert url in str(e.value) and "sha256" in str(e.value)
    # Nothing damaged was cached: the next read fails the same way.
    with pytest.raises(CorruptPromptError):
        store.read_file("t", 1, "a.bin")


def test_damaged_manifest_is_detected(store):
    store.publish("t", FILES, no_numbered)
    store.publish("t", FILES, no_numbered)
    client, bucket, _ = object_of(store, store.location("t"))
    manifest = f"{store.prefix}/t/manifests/2.json"
    client.put_object(Bucket=bucket, Key=manifest, Body=b"{not json")
    with pytest.raises(CorruptPromptError, match=f"s3://{bucket}/{manifest} is damaged"):
        store.file_names("t", 2)
    # A manifest copied to another number is not taken for that version.
    first = {"Bucket": bucket, "Key": f"{store.prefix}/t/manifests/1.json"}
    client.copy_object(Bucket=bucket, Key=manifest, CopySource=first)
    with pytest.raises(CorruptPromptError, match="describes t@1"):
        store.read_file("t", 2, "a.bin")


# ---------------------------------------------------------------- numbers


def _register_many(store_args: tuple, worker: int, count: int, barrier, results) -> None:
    """Runs in a spawned process: registers `count` versions of one task into the S3 store as fast as it can."""
    made: list[int] = []
    try:
        bucket, prefix, endpoint = store_args
        reg = Registry(store=S3Store(bucket, prefix, endpoint_url=endpoint))
        barrier.wait(timeout=60)
        for i in range(count):
            seed = worker * 1000 + i
            made.append(reg.register("shared", make_prompt(seed), SPEC, tags={"seed": str(seed)}).version)
    except BaseException as e:  # reported to the parent, so the test fails fast with the cause
        results.put((worker, made, repr(e)))
        raise
    results.put((worker, made, None))


def test_two_processes_get_distinct_consecutive_versions(store):
    got = race(_register_many, (store.bucket, store.prefix, store.endpoint_url), 8)
    assert sorted(got[1] + got[2]) == list(range(1, 17))
    assert got[1] == sorted(got[1]) and got[2] == sorted(got[2])
    reg = Registry(store=store)
    listed = reg.list_page("shared")[0]
    assert [v.version for v in listed] == list(range(16, 0, -1))
    for v in listed:  # every version complete, each with its own writer's prompt
        assert torch.equal(reg.load_embeddings(v), make_prompt(int(v.tags["seed"])).embeddings)
    assert store.clean_stale_temp(max_age_s=0) == []


def test_a_number_taken_meanwhile_is_skipped(store):
    # Another writer claimed 1 and died before uploading anything: its number stays taken.
    client, bucket, _ = object_of(store, store.location("t"))
    client.put_object(Bucket=bucket, Key=f"{store.prefix}/t/claims/1", Body=b"")
    assert store.versions("t") == []
    assert store.publish("t", FILES, no_numbered) == 2


def test_numbers_are_never_reused_after_deletes(store):
    for _ in range(3):
        store.publish("t", FILES, no_numbered)
    assert store.delete_version("t", 3) and store.delete_version("t", 1)
    assert store.versions("t") == [2]
    assert keys(store, "t/3/") == [] and keys(store, "t/1/") == []
    assert store.delete_version("t", 2) and store.versions("t") == []
    assert store.publish("t", FILES, no_numbered) == 4
    with pytest.raises(MissingVersionError):
        store.delete_version("t", 2)


# ---------------------------------------------------------------- crashed writers


def _die_before_the_manifest(store_args: tuple) -> None:
    """Runs in a spawned process: uploads a version's files, then dies (no cleanup) instead of writing its manifest."""
    bucket, prefix, endpoint = store_args
    store = S3Store(bucket, prefix, endpoint_url=endpoint)
    put = store._put

    def put_or_die(key: str, data: bytes, **condition: str):
        if "/manifests/" in key:
            os._exit(17)  # as abrupt as a kill: no except or finally block runs
        return put(key, data, **condition)

    store._put = put_or_die
    store.publish("t", FILES, lambda v: {"n.txt": str(v).encode()})


def test_writer_killed_mid_upload_leaves_nothing_visible(store):
    reg = Registry(store=store)
    reg.register("t", make_prompt(0), SPEC)
    proc = multiprocessing.get_context("spawn").Process(
        target=_die_before_the_manifest, args=((store.bucket, store.prefix, store.endpoint_url),)
    )
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 17
    assert keys(store, "t/2/") == ["t/2/a.bin", "t/2/b.json", "t/2/n.txt"]  # its files did reach the store
    assert store.versions("t") == [1] and store.task_names() == ["t"]
    with pytest.raises(MissingVersionError):
        store.read_file("t", 2, "a.bin")
    assert [v.ref for v in reg.list_page()[0]] == ["t@1"]
    # Young leftovers may be a live writer's: kept. Old enough, they go.
    assert store.clean_stale_temp() == []
    assert store.clean_stale_temp(max_age_s=0) == [store.location("t", 2)]
    assert keys(store, "t/2/") == [] and keys(store, ".pending/") == []
    assert store.publish("t", FILES, no_numbered) == 3


def test_failed_upload_cleans_up_and_burns_its_number(store, monkeypatch):
    put = store._put

    def fail_on_manifest(key: str, data: bytes, **condition: str):
        if "/manifests/" in key:
            raise StoreUnavailableError("the store went away (injected)")
        return put(key, data, **condition)

    monkeypatch.setattr(store, "_put", fail_on_manifest)
    with pytest.raises(StoreUnavailableError, match="injected"):
        store.publish("t", FILES, no_numbered)
    monkeypatch.undo()
    assert store.versions("t") == [] and keys(store) == ["t/claims/1"]
    assert store.publish("t", FILES, no_numbered) == 2


# ---------------------------------------------------------------- aliases


def test_alias_compare_and_swap(store):
    store.publish("t", FILES, no_numbered)
    store.publish("t", FILES, no_numbered)
    assert store.swap_aliases("t", {}, {"prod": 1})
    assert not store.swap_aliases("t", {}, {"prod": 2})  # a stale table loses
    assert store.swap_aliases("t", {"prod": 1}, {"prod": 2, "canary": 1})
    assert not store.swap_aliases("t", {"prod": 1}, {"prod": 1})
    assert store.read_aliases("t") == {"prod": 2, "canary": 1}
    assert not store.swap_aliases("t", {"prod": 2, "canary": 1}, {"prod": 7, "canary": 1})  # no version 7
    assert not store.swap_aliases("nosuch", {}, {"prod": 1}) and store.task_names() == ["t"]
    assert not store.delete_version("t", 1) and store.versions("t") == [1, 2]
    assert store.swap_aliases("t", {"prod": 2, "canary": 1}, {})
    assert store.read_aliases("t") == {} and store.delete_version("t", 1)


@pytest.mark.parametrize("table_before", [{}, {"canary": 1}])
def test_alias_swap_racing_another_swap_loses(store, s3_endpoint_url, table_before):
    store.publish("t", FILES, no_numbered)
    store.publish("t", FILES, no_numbered)
    assert store.swap_aliases("t", {}, table_before)
    other = S3Store(store.bucket, store.prefix, endpoint_url=s3_endpoint_url)
    put_object = store.client.put_object

    def other_swaps_first(**kwargs):
        # Both read the same table; the other server writes first, between our read and our write.
        if kwargs["Key"].endswith("aliases.json"):
            assert other.swap_aliases("t", table_before, {**table_before, "prod": 1})
        return put_object(**kwargs)

    store.client.put_object = other_swaps_first
    assert store.swap_aliases("t", table_before, {**table_before, "prod": 2}) is False
    assert store.read_aliases("t") == {**table_before, "prod": 1}


def test_alias_set_while_deleting_keeps_the_version(store, s3_endpoint_url):
    store.publish("t", FILES, no_numbered)
    mover = S3Store(store.bucket, store.prefix, endpoint_url=s3_endpoint_url)
    delete_object = store.client.delete_object

    def alias_moves_first(**kwargs):
        # The deleter found no alias; another server points one at the version before the manifest goes.
        assert mover.swap_aliases("t", {}, {"prod": 1})
        return delete_object(**kwargs)

    store.client.delete_object = alias_moves_first
    assert store.delete_version("t", 1) is False
    assert store.versions("t") == [1] and store.read_aliases("t") == {"prod": 1}
    assert store.read_file("t", 1, "a.bin") == FILES["a.bin"] and keys(store, ".pending/") == []


def test_alias_to_a_version_deleted_meanwhile_is_undone(store, s3_endpoint_url):
    store.publish("t", FILES, no_numbered)
    store.publish("t", FILES, no_numbered)
    assert store.swap_aliases("t", {}, {"prod": 2})
    deleter = S3Store(store.bucket, store.prefix, endpoint_url=s3_endpoint_url)
    put_object = store.client.put_object

    def deleted_first(**kwargs):
        # The mover checked version 1 exists; it is deleted before the alias table is written.
        if kwargs["Key"].endswith("aliases.json") and 1 in store.versions("t"):
            assert deleter.delete_version("t", 1)
        return put_object(**kwargs)

    store.client.put_object = deleted_first
    assert store.swap_aliases("t", {"prod": 2}, {"prod": 2, "canary": 1}) is False
    assert store.read_aliases("t") == {"prod": 2} and store.versions("t") == [2]


# ---------------------------------------------------------------- open_store


def test_open_store_local_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    opened = open_store("~/prompts")
    assert isinstance(opened, LocalStore) and opened.root == (tmp_path / "prompts").resolve()
    assert isinstance(open_store(str(tmp_path / "a:b")), LocalStore)  # a colon after the first '/' is a path
    with pytest.raises(ValueError, match="S3 endpoint"):
        open_store(str(tmp_path / "x"), endpoint_url="http://127.0.0.1:9000")


def test_open_store_s3(s3_endpoint_url, s3_bucket, tmp_path):
    opened = open_store(f"s3://{s3_bucket}/a/b/", endpoint_url=s3_endpoint_url, cache_dir=tmp_path / "c")
    assert isinstance(opened, S3Store) and (opened.bucket, opened.prefix) == (s3_bucket, "a/b")
    assert opened.location("t", 1) == f"s3://{s3_bucket}/a/b/t/1" and opened.cache_dir == tmp_path / "c"
    at_root = open_store(f"s3://{s3_bucket}", endpoint_url=s3_endpoint_url)
    at_root.publish("t", FILES, no_numbered)
    assert at_root.location("t", 1, "a.bin") == f"s3://{s3_bucket}/t/1/a.bin" and at_root.task_names() == ["t"]


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("s3:bucket/prompts", "s3://bucket/prefix (with '//')"),
        ("s3://", "the bucket is missing"),
        ("s3:///prompts", "the bucket is missing"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://ab/x", "not a valid S3 bucket name"),
        ("gs://bucket/prompts", "gs:// is not supported; give a local folder path (e.g. ./prompts or ~/prompts) or s3"),
        ("http://minio:9000/bucket", "http:// is not supported"),
        ("data:v1", "write ./data:v1"),
        ("", "the store is empty"),
    ],
)
def test_open_store_refuses_bad_urls(url, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        open_store(url)
    assert fragment in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" or "gs:" was made


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_open_store_unreachable_endpoint(s3_endpoint_url, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(StoreUnavailableError) as e:
        open_store("s3://somebucket/p", endpoint_url=endpoint)
    assert "s3://somebucket/p is unavailable" in str(e.value)
    assert f"cannot reach the endpoint {endpoint}" in str(e.value)


def test_open_store_missing_bucket(s3_endpoint_url):
    with pytest.raises(StoreUnavailableError) as e:
        open_store("s3://no-such-bucket/p", endpoint_url=s3_endpoint_url)
    assert "s3://no-such-bucket/p" in str(e.value) and "the bucket does not exist" in str(e.value)


def test_open_store_refused_credentials(s3_endpoint_url, s3_bucket, monkeypatch):
    from moto import settings

    # The endpoint checks credentials from now on; it knows no access key, so it refuses ours.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(StoreUnavailableError) as e:
        open_store(f"s3://{s3_bucket}/p", endpoint_url=s3_endpoint_url)
    assert f"s3://{s3_bucket}/p" in str(e.value) and "access key id is not known" in str(e.value)


def test_store_going_away_while_serving_names_the_store(store, monkeypatch):
    store.publish("t", FILES, no_numbered)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    # The endpoint stops answering: the store's client now reaches a port nothing listens on.
    store.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(StoreUnavailableError) as e:
        store.read_file("t", 1, "a.bin")
    assert store.url in str(e.value) and "reading s3://" in str(e.value) and "cannot reach" in str(e.value)
