"""Prefix warming (`core/prefix_warmer.py`): a restarted server computes its served versions' prefix keys and values
while the worker is idle, within --prefix-cache-mb, so a task never served since the start copies its prefix
like a served one; registrations the worker could not warm at once are warmed when it is next idle."""

from __future__ import annotations

import pytest
import torch

from helpers import reference_greedy, running_server, wait_until
from softprompt.client import Client
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry
from softprompt.prompts.tokens import eos_token_ids
from softprompt.server.core.engine import Engine
from softprompt.server.core.pool import KvPool

TASKS = 6


def _store(tiny_base, root) -> Registry:
    """TASKS tasks of 3-5 virtual tokens; t0 with an older version and an alias to it."""
    registry = Registry(root)
    scale = float(tiny_base.model.get_input_embeddings().weight.std()) * 4
    for i in range(TASKS):
        rows = torch.randn(3 + i % 3, tiny_base.spec.hidden_size, generator=torch.Generator().manual_seed(i)) * scale
        registry.register(f"t{i}", PromptTensor(rows, "RAW"), tiny_base.spec)
    rows = torch.randn(4, tiny_base.spec.hidden_size, generator=torch.Generator().manual_seed(50)) * scale
    registry.register("t0", PromptTensor(rows, "RAW"), tiny_base.spec)
    registry.set_alias("t0", "prod", 1)
    return registry


def _tiers(client: Client) -> dict:
    return {t.name: t for t in client.model_info().caches}


def test_a_restarted_server_warms_every_served_version_and_a_first_request_copies_its_prefix(tiny_base, tmp_path):
    registry = _store(tiny_base, tmp_path)
    with running_server(tiny_base, tmp_path, batch_wait_ms=1) as (app, address):
        assert app.prefix_warmer.ready.wait(120)
        with Client(address, timeout=60) as client:
            before = _tiers(client)
            text = "hello there"
            got = client.generate("t4", text, max_new_tokens=5).token_ids
            after = _tiers(client)
    # Each task's served version and the alias target (t0@1): TASKS + 1 prefixes, and none more.
    assert app.prefix_warmer.warmed == TASKS + 1
    assert before["prefix"].entries == TASKS + 1 and before["prefix"].pending == 0
    assert before["prefix"].evictions == 0 and before["prefix"].hits == 0  # no request ran yet
    # t4 never served: its prefix was copied, not computed.
    assert after["prefix"].hits == 1 and after["prefix"].misses == before["prefix"].misses
    assert after["prefix"].loads == before["prefix"].loads
    prompt = registry.load_embeddings(registry.resolve("t4"))
    ids = tiny_base.tokenizer(text).input_ids
    assert list(got) == reference_greedy(tiny_base.model, prompt, ids, 5,
                                         eos_token_ids(tiny_base.model, tiny_base.tokenizer))


def test_warming_stops_at_the_prefix_budget_and_evicts_nothing(tiny_base, tmp_path):
    _store(tiny_base, tmp_path)
    per_token = KvPool.bytes_per_token(Engine(tiny_base).pool.layers, tiny_base.dtype)
    # Room for 7 of the 20 prefix positions the 7 served versions have (2-4 each).
    budget_mb = 7 * per_token / (1024 * 1024)
    with running_server(tiny_base, tmp_path, prefix_cache_mb=budget_mb) as (app, address):
        assert app.prefix_warmer.ready.wait(120)
        with Client(address, timeout=60) as client:
            prefix = _tiers(client)["prefix"]
    assert 0 < prefix.bytes <= prefix.capacity_bytes and prefix.evictions == 0
    assert prefix.entries == app.prefix_warmer.warmed < TASKS + 1 and prefix.pending == 0


def test_after_the_budget_filled_a_later_registration_is_warmed_once_deletes_made_room(tiny_base, tmp_path):
    _store(tiny_base, tmp_path)
    per_token = KvPool.bytes_per_token(Engine(tiny_base).pool.layers, tiny_base.dtype)
    hidden = tiny_base.spec.hidden_size
    scale = float(tiny_base.model.get_input_embeddings().weight.std()) * 4
    with running_server(tiny_base, tmp_path, prefix_cache_mb=7 * per_token / (1024 * 1024)) as (app, address):
        assert app.prefix_warmer.ready.wait(120) and app.prefix_warmer.filled
        with Client(address, timeout=60) as client:
            for i in range(TASKS):
                client.delete_prompt(f"t{i}", all_versions=True, force=True)
            assert _tiers(client)["prefix"].entries == 0
            with app.services.prompts._warming:  # queued to the warmer, as a registration in a burst is
                client.register("late", torch.randn(5, hidden, generator=torch.Generator().manual_seed(7)) * scale)
            wait_until(lambda: _tiers(client)["prefix"].entries == 1, "the late registration to be warmed")


def test_a_registration_the_worker_could_not_warm_at_once_is_warmed_when_it_is_idle(tiny_base, tmp_path):
    hidden = tiny_base.spec.hidden_size
    scale = float(tiny_base.model.get_input_embeddings().weight.std()) * 4
    with running_server(tiny_base, tmp_path, batch_wait_ms=1) as (app, address):
        assert app.prefix_warmer.ready.wait(120)
        with Client(address, timeout=60) as client:
            before = _tiers(client)["prefix"]
            with app.services.prompts._warming:  # another registration's prefix is being computed on the worker
                client.register("burst", torch.randn(5, hidden, generator=torch.Generator().manual_seed(5)) * scale)
            wait_until(lambda: _tiers(client)["prefix"].entries == before.entries + 1, "the burst to be warmed")
            client.generate("burst", "hello", max_new_tokens=2)
            after = _tiers(client)["prefix"]
    assert after.hits == before.hits + 1 and after.loads == before.loads + 1  # warmed once, then copied


@pytest.mark.parametrize("warm", [True, False])
def test_without_warming_a_first_request_computes_its_own_prefix(tiny_base, tmp_path, warm):
    _store(tiny_base, tmp_path)
    with running_server(tiny_base, tmp_path, batch_wait_ms=1, warm_prefixes=warm) as (app, address):
        assert (app.prefix_warmer is not None) == warm
        if warm:
            assert app.prefix_warmer.ready.wait(120)
        with Client(address, timeout=60) as client:
            client.generate("t2", "hello", max_new_tokens=2)
            prefix = _tiers(client)["prefix"]
    assert (prefix.hits, prefix.misses) == ((1, 0) if warm else (0, 1))
