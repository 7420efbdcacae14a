"""A registry of many tasks (issue 22): every registration, page and "not found" costs what its own tasks cost.

A store that counts what it is asked stands in for a folder or a bucket: a registration must ask about its
own task only, a listing page about its own tasks only, and a write must forget one task's entries of the
server's view, however many tasks the registry holds. S3 is checked the same way, by counting the requests
a registration sends to a real endpoint (moto's server).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import threading

import pytest
import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import InvalidNameError, PromptNotFoundError
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import LocalStore, Registry
from softprompt.prompts.registry import registry as registry_module
from softprompt.prompts.registry.cached import CachedStore
from softprompt.server.core.host_tier import HostTierLoader
from softprompt.server.core.prompt_cache import DeviceLru, HostTier, PromptCache, tensor_bytes

HIDDEN = 8
SPEC = BaseModelSpec(model_id="test/model", hidden_size=HIDDEN, num_layers=2, num_attention_heads=2,
                     vocab_size=50, fingerprint="f" * 16)


def _prompt(seed: int, rows: int = 3) -> PromptTensor:
    return PromptTensor(torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)), "PROMPT_TUNING")


class Counting(LocalStore):
    """A folder store that records which task each read asks about."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.asked: collections.Counter[tuple[str, str]] = collections.Counter()

    def task_names(self) -> list[str]:
        self.asked["task_names", ""] += 1
        return super().task_names()

    def versions(self, name: str) -> list[int]:
        self.asked["versions", name] += 1
        return super().versions(name)

    def read_aliases(self, name: str) -> dict[str, int]:
        self.asked["aliases", name] += 1
        return super().read_aliases(name)

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        self.asked["file", name] += 1
        return super().read_file(name, version, filename)

    def tasks_asked(self) -> set[str]:
        return {name for (_, name) in self.asked if name}


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A folder store of 300 tasks ("t000".."t299"), t007 with three versions and an alias."""
    root = tmp_path_factory.mktemp("many")
    writer = Registry(root)
    for i in range(300):
        writer.register(f"t{i:03d}", _prompt(i), SPEC)
    for seed in (1000, 1001):
        writer.register("t007", _prompt(seed), SPEC)
    writer.set_alias("t007", "prod", 2)
    return root


@pytest.fixture
def own(filled, tmp_path):
    """A copy of `filled` that a test may write to."""
    shutil.copytree(filled, tmp_path / "store")
    return tmp_path / "store"


def _view(root, refresh_s: float = 60.0) -> tuple[Registry, Counting]:
    counting = Counting(root)
    return Registry(store=CachedStore(counting, refresh_s=refresh_s)), counting


# ---------------------------------------------------------------- writes


def test_a_registration_asks_about_its_own_task_only(own):
    registry, counting = _view(own)
    registry.list_page()  # the view now holds the task list
    counting.asked.clear()
    registry.register("t100", _prompt(5000), SPEC)  # a new version of a task
    registry.register("zz-new", _prompt(5001), SPEC)  # a new task
    assert counting.tasks_asked() == set()  # writes go through; nothing is read about any task
    assert counting.asked["task_names", ""] == 0
    # The new task joined the held task list in place: the next listing reads no task list.
    page, _ = registry.list_page(page_size=1000, after="t299@1")
    assert [v.ref for v in page] == ["zz-new@1"]
    assert counting.asked["task_names", ""] == 0
    assert registry.resolve("t100").version == 2


def test_a_write_forgets_its_own_task_only(own):
    registry, counting = _view(own)
    for name in ("t001", "t002", "t003"):
        registry.resolve(name)
    counting.asked.clear()
    registry.set_alias("t002", "canary", 1)
    for name in ("t001", "t002", "t003"):
        registry.resolve(name)
    assert counting.tasks_asked() == {"t002"}
    registry.delete("t002@1", force=True)  # the alias goes with it
    registry.register("t002", _prompt(77), SPEC)


def test_registration_sweeps_crashed_writers_temporaries_once_a_minute(tmp_path, monkeypatch):
    swept = []
    store = LocalStore(tmp_path)
    monkeypatch.setattr(store, "clean_stale_temp", lambda *a: swept.append(1) or [])
    registry = Registry(store=store)
    for i in range(5):
        registry.register(f"t{i}", _prompt(i), SPEC)
    assert len(swept) == 1
    monkeypatch.setattr(registry_module, "SWEEP_EVERY_S", 0.0)
    registry.register("t9", _prompt(9), SPEC)
    assert len(swept) == 2


# ---------------------------------------------------------------- reads


def test_a_page_reads_its_own_tasks_only(filled):
    registry, counting = _view(filled)
    first, token = registry.list_page(page_size=10)
    assert [v.ref for v in first][:3] == ["t000@1", "t001@1", "t002@1"]
    counting.asked.clear()
    page, _ = registry.list_page(page_size=10, page_token=token)
    assert [v.name for v in page] == [f"t{i:03d}" for i in range(8, 18)]  # t007 has three versions
    # The tasks on the page, and the next one (where the page learns it is full).
    assert len(counting.tasks_asked()) <= 11
    # Starting after a version is the same as a token ending there.
    assert registry.list_page(page_size=10, after="t007@1")[0] == page
    assert [v.ref for v in registry.list_page(page_size=2, after="t007@3")[0]] == ["t007@2", "t007@1"]
    assert registry.list_page("t007", after="t007@2")[0][0].ref == "t007@1"
    with pytest.raises(InvalidNameError, match="exact version"):
        registry.list_page(after="t007")
    with pytest.raises(InvalidNameError, match="not both"):
        registry.list_page(page_token=token, after="t007@1")


def test_every_version_is_listed_once_across_pages(filled):
    registry, _ = _view(filled)
    refs, token = [], ""
    while True:
        page, token = registry.list_page(page_size=7, page_token=token)
        refs += [v.ref for v in page]
        if not token:
            break
    assert len(refs) == len(set(refs)) == 302
    assert refs[7:10] == ["t007@3", "t007@2", "t007@1"]


def test_not_found_names_a_few_tasks_without_reading_every_one(filled):
    registry, counting = _view(filled)
    counting.asked.clear()
    with pytest.raises(PromptNotFoundError) as e:
        registry.resolve("nope")
    message = str(e.value)
    assert "no task named 'nope'; registered tasks: t000, t001," in message and "and 280 more" in message
    assert len(counting.tasks_asked() - {"nope"}) == 20


def test_nearby_references_for_did_you_mean(filled):
    registry, counting = _view(filled)
    counting.asked.clear()
    assert registry.nearby("t007@9") == ["t007", "t007@3", "t007@2", "t007@1", "t007@prod"]
    near = registry.nearby("t12x")
    assert near and all(r.startswith("t12") for r in near)
    assert len(counting.tasks_asked()) <= 4
    assert registry.nearby("zzzzzz") == []


# ---------------------------------------------------------------- memory tiers


def test_lru_bookkeeping_costs_its_own_entries():
    lru: DeviceLru[torch.Tensor] = DeviceLru(3 * 32, tensor_bytes)  # three [8] float32 tensors
    for i in range(4):
        lru.put(("a" if i < 2 else "b", i, "s"), torch.zeros(8))
    assert lru.size() == (3, 96) and lru.evictions == 1 and not lru.contains(("a", 0, "s"))
    assert not lru.has_room(1)
    held = lru.lookup(("b", 2, "s"))
    assert lru.put(("b", 2, "s"), torch.ones(8)) is held  # a racing miss gets what was kept first
    lru.evict("b")
    assert lru.size() == (1, 32) and lru.evictions == 1  # deletes are not evictions
    stats = lru.stats()
    assert (stats.entries, stats.bytes, stats.capacity_bytes, stats.hits, stats.misses) == (1, 32, 96, 1, 0)
    assert stats.hit_rate == 1.0


def test_the_device_cache_takes_a_prompt_from_the_host_tier_before_the_store():
    host = HostTier(1 << 20, torch.float32)
    cache = PromptCache(1 << 20, torch.device("cpu"), torch.float32, host=host)
    key = ("t", 1, "s")
    cache.keep(key, torch.ones(3, HIDDEN, dtype=torch.float64))  # at registration: the matrix in hand
    loads = []
    got = cache.get(key, lambda: loads.append(1) or torch.zeros(3, HIDDEN))
    assert not loads and torch.equal(got, torch.ones(3, HIDDEN)) and got.dtype == torch.float32
    assert got is host.lru.lookup(key)  # on a CPU in the tier's dtype, one tensor serves both tiers
    other = ("u", 1, "s")
    cache.get(other, lambda: torch.zeros(2, HIDDEN))  # not held: read once, then kept in both tiers
    assert host.contains(other) and host.stats().misses == 1
    cache.evict("t")
    assert not host.contains(key) and not cache.lru.contains(key)


def test_the_background_load_holds_every_version_served_ones_first(filled):
    registry, _ = _view(filled)
    tier = HostTier(1 << 30, torch.float32)
    loader = HostTierLoader(registry, tier, duty=1.0)
    loader.start()
    assert loader.wait(60)
    assert loader.done() and tier.pending == 0
    assert tier.lru.size()[0] == 302 and loader.loaded == 302
    version = registry.resolve("t007@prod")
    held = tier.lru.lookup((version.name, version.version, version.sha256))
    assert torch.equal(held, registry.load_embeddings(version))


def test_the_background_load_stops_at_the_budget(filled):
    registry, _ = _view(filled)
    one = 3 * HIDDEN * 4
    tier = HostTier(10 * one, torch.float32)
    loader = HostTierLoader(registry, tier, duty=1.0)
    loader.start()
    assert loader.wait(60)
    assert tier.lru.size() == (10, 10 * one) and tier.lru.evictions == 0 and tier.pending == 0
    # What a name means comes before older versions: t007's served version and alias target are held...
    served = {(k[0], k[1]) for k in tier.lru._items}
    assert ("t007", 3) in served and ("t007", 2) in served
    assert ("t007", 1) not in served  # ...its oldest version only once every task's served one is


def test_the_background_load_stops_when_asked(filled):
    registry, _ = _view(filled)
    tier = HostTier(1 << 30, torch.float32)
    loader = HostTierLoader(registry, tier, duty=0.01)  # slow: mostly asleep
    loader.start()
    loader.stop(timeout=30)
    assert loader.done() and tier.pending == 0 and tier.lru.size()[0] < 302


# ---------------------------------------------------------------- S3


def _count_requests(store) -> collections.Counter[str]:
    """Every S3 operation the store's client sends, by name (ListObjectsV2 over the whole store separately)."""
    sent: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def count(params, model, **_):
        name = model.name
        if name == "ListObjectsV2" and params.get("Delimiter") == "/" and params.get("Prefix", "") in ("", "p/"):
            name = "ListTasks"
        with lock:
            sent[name] += 1

    store.client.meta.events.register("before-call.s3", count)
    return sent


def test_an_s3_registration_sends_the_same_requests_however_many_tasks(s3_endpoint_url, s3_bucket, tmp_path):
    from softprompt.prompts.registry.s3 import S3Store

    store = S3Store(s3_bucket, "p", endpoint_url=s3_endpoint_url, cache_dir=tmp_path / "files")
    registry = Registry(store=CachedStore(store))
    sent = _count_requests(store)
    registry.register("warm-up", _prompt(0), SPEC)  # the once-a-minute sweep of leftovers happens here

    def one(name: str, seed: int) -> collections.Counter[str]:
        sent.clear()
        registry.register(name, _prompt(seed), SPEC)
        return collections.Counter(sent)

    few = one("a-new-task", 1), one("a-new-task", 2)
    for i in range(30):
        registry.register(f"t{i:02d}", _prompt(100 + i), SPEC)
    many = one("b-new-task", 3), one("b-new-task", 4)
    assert many == few
    assert "ListTasks" not in few[0] and "ListTasks" not in few[1]


# ---------------------------------------------------------------- a real server (gRPC, HTTP, /metrics)

SERVED_TASKS = 40


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    """A server started on a store of 40 tasks (s00..s39, s05 with two versions and an alias), its host tier
    loaded; yields (app, address)."""
    from helpers import running_server

    root = tmp_path_factory.mktemp("served")
    writer = Registry(root)
    scale = float(tiny_base.model.get_input_embeddings().weight.std()) * 4
    hidden = tiny_base.spec.hidden_size
    for i in range(SERVED_TASKS):
        rows = torch.randn(3 + i % 4, hidden, generator=torch.Generator().manual_seed(i)) * scale
        writer.register(f"s{i:02d}", PromptTensor(rows, "RAW"), tiny_base.spec)
    writer.register("s05", PromptTensor(torch.randn(4, hidden, generator=torch.Generator().manual_seed(99)) * scale,
                                        "RAW"), tiny_base.spec)
    writer.set_alias("s05", "prod", 1)
    # No prefix warming: these tests follow a never-served task through the tiers (tests/test_prefix_warming.py
    # covers warming).
    with running_server(tiny_base, root, http_port=0, metrics_port=0, max_new_tokens=8, default_max_new_tokens=4,
                        max_virtual_tokens=32, batch_wait_ms=1, warm_prefixes=False) as (app, address):
        assert app.host_loader.wait(60)
        yield app, address


def _count_store_reads(monkeypatch, store) -> collections.Counter[tuple[str, str]]:
    """What the server's store view asks the store itself, by (operation, task)."""
    asked: collections.Counter[tuple[str, str]] = collections.Counter()
    for op in ("task_names", "versions", "read_aliases", "file_names", "read_file"):
        def counted(*args, _op=op, _real=getattr(store, op)):
            asked[_op, args[0] if args else ""] += 1
            return _real(*args)
        monkeypatch.setattr(store, op, counted)
    return asked


def test_a_task_never_served_takes_its_prompt_from_the_host_tier(served, tiny_base, monkeypatch):
    from helpers import reference_greedy
    from softprompt.client import Client
    from softprompt.prompts.tokens import eos_token_ids

    app, address = served
    asked = _count_store_reads(monkeypatch, app.registry.store.inner)
    with Client(address, timeout=60) as client:
        ids = list(client.tokenize("hello there").token_ids)
        before = {t.name: t for t in client.model_info().caches}
        got = client.generate("s17", "hello there", max_new_tokens=5).token_ids
        after = {t.name: t for t in client.model_info().caches}
    # Every version was loaded at start (no budget reached), and s17's request read none of its files.
    assert before["host"].pending == 0 and before["host"].entries == SERVED_TASKS + 1
    assert not [key for key in asked if key[0] in ("read_file", "file_names")]
    assert after["host"].hits - before["host"].hits == 1 and after["host"].misses == before["host"].misses
    assert after["prompt"].misses - before["prompt"].misses == 1  # not on the device yet: taken from the host tier
    # What the host tier held is what the store holds: the output is the full forward's.
    prompt = app.registry.load_embeddings(app.registry.resolve("s17"))
    want = reference_greedy(tiny_base.model, prompt, ids, 5, eos_token_ids(tiny_base.model, tiny_base.tokenizer))
    assert list(got) == want


def test_a_registration_over_grpc_reads_nothing_of_other_tasks(served, tiny_base, monkeypatch):
    from softprompt.client import Client

    app, address = served
    hidden = tiny_base.spec.hidden_size
    with Client(address, timeout=60) as client:
        client.list_prompts_page(None, 5)  # the server's view holds the task list now
        asked = _count_store_reads(monkeypatch, app.registry.store.inner)
        client.register("zz-late", torch.randn(3, hidden) * 0.02)
        client.register("s30", torch.randn(3, hidden) * 0.02)  # a task's second version
        # Storing, keeping in the tiers, warming and counting: none of it asks about any other task.
        assert {task for (_, task) in asked} <= {"zz-late", "s30"}
        assert asked["task_names", ""] == 0
        listed, _ = client.list_prompts_page(None, 1000)
        assert [p.ref for p in listed][-2:] == ["s39@1", "zz-late@1"]  # the new task listed, no task list read
        assert asked["task_names", ""] == 0
        client.delete_prompt("zz-late", all_versions=True)  # as it was, for the tests that count versions
        client.delete_prompt("s30@2")


def test_list_prompts_pages_are_complete_and_disjoint(served):
    from softprompt.client import Client

    _, address = served
    with Client(address, timeout=60) as client:
        everything = [p.ref for p in client.list_prompts(page_size=1000)]
        refs, token, pages = [], "", 0
        while True:
            page, token = client.list_prompts_page(None, 7, token)
            assert len(page) <= 7
            refs += [p.ref for p in page]
            pages += 1
            if not token:
                break
    assert refs == everything and len(set(refs)) == len(refs) == SERVED_TASKS + 1 and pages == 6


def _get(app, path: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{app.http_port}{path}", timeout=30) as response:
        return json.loads(response.read())


def test_v1_models_pages_are_complete_and_disjoint(served, tiny_base):
    import urllib.error

    app, _ = served
    everything = [m["id"] for m in _get(app, "/v1/models")["data"]]
    # The base model, then per version its task's name (if it means it), its aliases, its ref.
    assert everything[0] == tiny_base.spec.model_id and len(everything) == 1 + 2 * SERVED_TASKS + 2
    assert everything[1:7] == ["s00", "s00@1", "s01", "s01@1", "s02", "s02@1"]
    assert everything[11:15] == ["s05", "s05@2", "s05@prod", "s05@1"]
    ids, after, pages = [], "", 0
    while True:
        body = _get(app, "/v1/models?limit=9" + (f"&after={after}" if after else ""))
        page = [m["id"] for m in body["data"]]
        assert 0 < len(page) <= 9 and body["first_id"] == page[0] and body["last_id"] == page[-1]
        ids += page
        pages += 1
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert ids == everything and len(set(ids)) == len(ids) and pages > 1
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(app, "/v1/models?limit=0")
    assert e.value.code in (400, 422)


def test_cli_list_pages_with_limit_and_token(served, capsys):
    from softprompt.client.cli.app import main

    _, address = served
    assert main(["--server", address, "list", "--limit", "30"]) == 0
    out, err = capsys.readouterr()
    first = [line.split()[0] for line in out.splitlines()[1:]]
    assert len(first) == 30 and first[:2] == ["s00@1", "s01@1"]
    hint = err.strip().splitlines()[-1]
    assert hint.startswith(f"more versions: softprompt --server {address} list --limit 30 --page-token ")
    token = hint.rsplit(" ", 1)[1]
    assert main(["--server", address, "list", "--limit", "30", "--page-token", token]) == 0
    out, err = capsys.readouterr()
    rest = [line.split()[0] for line in out.splitlines()[1:]]
    assert len(rest) == SERVED_TASKS + 1 - 30 and not set(rest) & set(first) and "more versions" not in err


def test_every_tier_is_sized_and_counted_in_model_info_and_metrics(served):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from softprompt.client import Client

    app, address = served
    with Client(address, timeout=30) as client:
        client.generate("s03", "hi", max_new_tokens=1)  # a lookup in every tier
        tiers = {t.name: t for t in client.model_info().caches}
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {(s.name, s.labels.get("cache")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    config = app.config
    assert list(tiers) == ["host", "prompt", "prefix"]
    assert [tiers[n].capacity_bytes for n in tiers] == [
        int(mb * 1024 * 1024) for mb in (config.host_cache_mb, config.prompt_cache_mb, config.prefix_cache_mb)]
    # The host tier holds every stored version's matrix, float32 here.
    stored = app.registry.list_page(None, 1000)[0]
    assert tiers["host"].bytes == sum(4 * v.num_virtual_tokens * v.hidden_size for v in stored)
    for name, tier in tiers.items():  # nothing ran between the two reads: the same figures
        assert tier.hits + tier.misses > 0
        assert samples["softprompt_cache_capacity_bytes", name] == tier.capacity_bytes
        assert samples["softprompt_cache_bytes", name] == tier.bytes
        assert samples["softprompt_cache_hit_ratio", name] == pytest.approx(tier.hit_rate)
    assert samples["softprompt_cache_pending", "host"] == 0


def test_a_registration_while_another_warms_leaves_its_prefix_to_its_first_request(served, tiny_base):
    from softprompt.client import Client

    app, address = served
    warming = app.services.prompts._warming
    hidden = tiny_base.spec.hidden_size
    scale = float(tiny_base.model.get_input_embeddings().weight.std()) * 4
    with Client(address, timeout=60) as client:
        before = {t.name: t for t in client.model_info().caches}
        with warming:  # another registration's prefix is being computed on the worker
            client.register("burst", torch.randn(5, hidden, generator=torch.Generator().manual_seed(5)) * scale)
        registered = {t.name: t for t in client.model_info().caches}
        client.generate("burst", "hello", max_new_tokens=2)
        served_ = {t.name: t for t in client.model_info().caches}
        client.delete_prompt("burst", all_versions=True)
    # No forward was queued for it: its matrix went to the host tier and the device, its prefix waited...
    assert registered["prefix"].loads == before["prefix"].loads
    assert registered["host"].loads == before["host"].loads + 1
    assert registered["prompt"].loads == before["prompt"].loads + 1
    # ...for its request's own prefill, which computed and kept it.
    assert served_["prefix"].loads == registered["prefix"].loads + 1
    assert served_["prompt"].hits == registered["prompt"].hits + 1


# ---------------------------------------------------------------- the benchmark's table


def test_the_benchmark_prints_the_issues_rows_before_and_after(capsys, tmp_path):
    from softprompt.benchmarks import many_tasks

    host = {"entries": 1000, "bytes": 1000 * 32768, "capacity_bytes": 64 << 20, "evictions": 0}
    after = many_tasks.Figures(tasks=1000, windows=[(500, 100.0), (1000, 90.0)], register_s=10.5, listed=1000,
                               models=2001, models_page_s=0.004, ttft_warm=[0.1, 0.2], ttft_cold=[0.1, 0.3],
                               outputs_exact=12, outputs_checked=12, model_info={"host": host}, prefix_warmed=900,
                               prefix_warm_s=12.5)
    before = dataclasses.replace(after, windows=[(500, 10.0), (1000, 5.0)], listed=999, models_page_s=None,
                                 model_info={}, prefix_warmed=0, prefix_warm_s=None)
    for name, figures in (("after", after), ("before", before)):
        (tmp_path / f"{name}.json").write_text(json.dumps(dataclasses.asdict(figures)))
    # Two saved runs printed side by side, without running anything.
    assert many_tasks.main(["--after", str(tmp_path / "after.json"), "--before", str(tmp_path / "before.json")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["registrations/s, last window"] == ["5.0/s (0.50x the first)", "90.0/s (0.90x the first) |"]
    # A row whose name holds a count that differs between the runs is still matched.
    assert rows["ListPrompts, all 1,000 (default pages / pages of 1,000 / one page)"][0].startswith("0.00 s")
    assert rows["GET /v1/models (2,001 ids) / one page of 100"][0].endswith("/ -")
    assert rows["TTFT task never served p50 / p99"][1] == "200 / 298 ms (1.33x / 1.50x warm) |"
    assert rows["prefix KV warmed after the restart"] == ["-", "900 versions in 12.5 s |"]
    host_row = rows["host tier: versions held, memory per version, budget"]
    assert host_row == ["-", "1,000 versions, 31 MiB (32.0 KiB each) of 64 MiB: holds ~2,048 versions; all held |"]
