"""A server's bounded-staleness view of a shared store (`CachedStore`): what another server did is seen within
`refresh_s`, its own writes and explicitly named versions at once, and cached versions survive an outage.

Two Registry objects on one folder stand for two replicas; a fake clock makes the bound exact without sleeping.
"""

from __future__ import annotations

import pytest
import torch

from softprompt.prompts.errors import PromptNotFoundError, StoreUnavailableError
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import LocalStore, Registry
from softprompt.prompts.registry.cached import CachedStore
from softprompt.prompts.base import BaseModelSpec

HIDDEN = 8
SPEC = BaseModelSpec(model_id="test/model", hidden_size=HIDDEN, num_layers=2, num_attention_heads=2,
                     vocab_size=50, fingerprint="f" * 16)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _prompt(seed: int) -> PromptTensor:
    return PromptTensor(torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(seed)), "PROMPT_TUNING")


@pytest.fixture
def replicas(tmp_path):
    """(writer, reader, clock, reader's store): the reader sees the folder through a 2-second view."""
    clock = Clock()
    view = CachedStore(LocalStore(tmp_path), refresh_s=2.0, clock=clock)
    return Registry(tmp_path), Registry(store=view), clock, view


def test_another_servers_changes_are_seen_within_refresh_s(replicas):
    writer, reader, clock, _ = replicas
    writer.register("sent", _prompt(1), SPEC)
    assert reader.resolve("sent").version == 1
    writer.register("sent", _prompt(2), SPEC)
    writer.set_alias("sent", "prod", 1)
    clock.now = 1.9
    assert reader.resolve("sent").version == 1  # the view is 1.9 s old: still within its bound
    clock.now = 2.1
    assert reader.resolve("sent").version == 2  # past it: read again
    assert reader.resolve("sent@prod").version == 1
    writer.set_alias("sent", "prod", 2)
    writer.delete("sent@1")
    clock.now = 4.3
    assert reader.resolve("sent@prod").version == 2
    with pytest.raises(PromptNotFoundError):
        reader.resolve("sent@1")
    assert [v.ref for v in reader.list_page()[0]] == ["sent@2"]


def test_explicit_versions_and_new_aliases_are_read_through_at_once(replicas):
    writer, reader, clock, _ = replicas
    writer.register("sent", _prompt(1), SPEC)
    assert reader.resolve("sent").version == 1
    writer.register("sent", _prompt(2), SPEC)
    writer.set_alias("sent", "canary", 2)
    assert reader.resolve("sent@2").version == 2  # named explicitly: not in the view yet, so read through
    assert reader.resolve("sent@canary").version == 2
    writer.register("other", _prompt(3), SPEC)
    assert reader.resolve("other").version == 1  # a task the view never held


def test_own_writes_are_seen_at_once(replicas):
    _, reader, _, _ = replicas
    reader.register("sent", _prompt(1), SPEC)
    reader.register("sent", _prompt(2), SPEC)
    assert reader.resolve("sent").version == 2
    reader.set_alias("sent", "prod", 1)
    assert reader.resolve("sent@prod").version == 1
    reader.set_alias("sent", "prod", 2)  # the compare-and-swap ran on the store, not on the view
    reader.delete("sent@1")
    assert [v.version for v in reader.list_page()[0]] == [2]


class _Flaky(LocalStore):
    """A folder store that can be switched off, as an unreachable object store is."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailableError("the store s3://test is unreachable (injected)")

    def versions(self, name: str) -> list[int]:
        self._check()
        return super().versions(name)

    def read_aliases(self, name: str) -> dict[str, int]:
        self._check()
        return super().read_aliases(name)

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        self._check()
        return super().read_file(name, version, filename)


def test_cached_versions_keep_serving_while_the_store_is_down(tmp_path):
    clock = Clock()
    flaky = _Flaky(tmp_path)
    registry = Registry(store=CachedStore(flaky, refresh_s=1.0, clock=clock))
    registry.register("sent", _prompt(1), SPEC)
    registry.register("new", _prompt(2), SPEC)
    version = registry.resolve("sent")
    registry.load_embeddings(version)
    flaky.down = True
    clock.now = 60.0  # long past the bound: the view is stale, the store unreachable
    assert registry.resolve("sent").version == 1
    assert torch.equal(registry.load_embeddings(registry.resolve("sent")), _prompt(1).embeddings)
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        registry.resolve("never-read")
    flaky.down = False
    assert registry.resolve("new").version == 1
