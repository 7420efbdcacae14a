"""Crash safety of the prompt store: writers SIGKILLed at random moments never leave a broken version.

Child processes (tests/crash_writer.py) register PEFT uploads of one task in a loop, two at a time, and
are SIGKILLed after seeded random delays, round after round. Afterwards every version in the store must
be complete, load, validate and hold the tensor of the seed it records; numbers must be unique and
every registration a writer saw succeed must still be there; a real server must serve every version
exactly as the no-cache reference computes it. Finally two writers race to completion on the same
store and get distinct, consecutive versions, none lost.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import crash_writer
import pytest
import torch
from helpers import running_server
from crash_writer import ALIAS, TASK, prompt_for, read_report
from helpers import expected_ids, torch_threads
from softprompt.client import Client
from softprompt.prompts.format.layout import METADATA, PEFT_CONFIG, PEFT_WEIGHTS
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.format.uploads import parse_peft_adapter
from softprompt.prompts.registry import LocalStore, Registry

SEED = 20240611
ROUNDS = 24  # two writers per round, both killed: 48 kills
MAX_KILL_DELAY_S = 0.35
VERSION_FILES = {PEFT_CONFIG, PEFT_WEIGHTS, METADATA}
TASK_FILES = {".lock", "counter", "aliases.json"}


@dataclass
class CrashRun:
    """What the kill rounds did: the store, and every registration a writer saw succeed."""

    root: Path
    reported: dict[int, int] = field(default_factory=dict)  # version -> seed
    kills: int = 0
    kills_mid_write: int = 0  # the writer had started its loop and not yet finished


@pytest.fixture(scope="module")
def ctx() -> multiprocessing.context.BaseContext:
    """A forkserver that imported torch and the registry once, so each victim starts in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    # Installed modules only: Python 3.11's forkserver ignores the parent's sys.path, so it cannot preload
    # tests/crash_writer.py itself (each child imports that small module, with tests/ on its path).
    context.set_forkserver_preload(["softprompt.prompts.registry.registry", "safetensors.torch"])
    return context


def _start(ctx, root: Path, spec, report: Path, first_seed: int, limit: int) -> multiprocessing.Process:
    proc = ctx.Process(target=crash_writer.register_until_killed,
                       args=(str(root), spec, str(report), first_seed, limit), daemon=True)
    proc.start()
    return proc


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def crashed(ctx, tiny_base, tmp_path_factory) -> CrashRun:
    """Runs the kill rounds once for the module's checks."""
    run = CrashRun(tmp_path_factory.mktemp("crash") / "store")
    Registry(run.root)
    reports = tmp_path_factory.mktemp("reports")
    rng = random.Random(SEED)
    for r in range(ROUNDS):
        procs = []
        for w in range(2):
            report = reports / f"r{r}-w{w}.txt"
            procs.append((_start(ctx, run.root, tiny_base.spec, report, (r * 10 + w) * 1000, 1000), report))
        # Kill times count from the start, so a few land while a writer is still opening the store.
        start = time.monotonic()
        for kill_at, (proc, report) in sorted(zip((rng.uniform(0, MAX_KILL_DELAY_S) for _ in procs), procs),
                                              key=lambda pair: pair[0]):
            time.sleep(max(0.0, start + kill_at - time.monotonic()))
            proc.kill()
            proc.join(timeout=60)
            assert proc.exitcode == -9, f"writer exited with {proc.exitcode} before it was killed; see {report}"
            started, finished, versions = read_report(str(report))
            run.kills += 1
            run.kills_mid_write += started and not finished
            overlap = run.reported.keys() & versions.keys()
            assert not overlap, f"versions {sorted(overlap)} were handed to two writers"
            run.reported.update(versions)
    return run


def _stored_seeds(registry: Registry) -> dict[int, int]:
    return {v: int(registry.resolve(f"{TASK}@{v}").tags["seed"]) for v in registry.store.versions(TASK)}


def test_kills_hit_writers_mid_registration(crashed: CrashRun) -> None:
    stored = len(Registry(crashed.root).store.versions(TASK))
    print(f"\ncrash safety: {crashed.kills} SIGKILLs ({crashed.kills_mid_write} mid-registration), "
          f"{len(crashed.reported)} registrations acknowledged, {stored} versions stored")
    assert crashed.kills == 2 * ROUNDS
    # Most kills must land inside the registration loop, or the test proves little.
    assert crashed.kills_mid_write >= crashed.kills // 2
    assert len(crashed.reported) >= ROUNDS


def test_every_stored_version_is_complete_and_valid(crashed: CrashRun, tiny_base) -> None:
    registry = Registry(crashed.root)
    root_entries = {p.name for p in crashed.root.iterdir()}
    assert root_entries == {".tmp", TASK}, "a crashed writer left something visible at the top of the store"
    task_dir = crashed.root / TASK
    versions = registry.store.versions(TASK)
    assert versions, "no version survived"
    extra = {p.name for p in task_dir.iterdir()} - TASK_FILES - {str(v) for v in versions}
    assert not extra, f"crashed writers left {sorted(extra)} in the task folder"

    seeds = []
    for v in versions:
        folder = task_dir / str(v)
        assert {p.name for p in folder.iterdir()} == VERSION_FILES, f"{TASK}@{v} is incomplete"
        info = registry.resolve(f"{TASK}@{v}")
        assert (info.name, info.version) == (TASK, v)
        seed = int(info.tags["seed"])
        seeds.append(seed)
        expected = prompt_for(seed, tiny_base.spec.hidden_size)
        assert torch.equal(registry.load_embeddings(info), expected)  # checks the recorded sha256 too
        # The stored folder is itself a valid PEFT upload for this base model.
        parsed = parse_peft_adapter((folder / PEFT_CONFIG).read_text(),
                                    (folder / PEFT_WEIGHTS).read_bytes(), tiny_base.spec,
                                    max_virtual_tokens=32)
        assert torch.equal(parsed.embeddings, expected)
    assert len(set(seeds)) == len(seeds), "one registration was published as two versions"

    counter = int((task_dir / "counter").read_text())
    assert counter >= versions[-1], "the counter fell behind a published version: numbers could be reused"
    aliases = json.loads((task_dir / "aliases.json").read_text())
    assert set(aliases) == {ALIAS} and aliases[ALIAS] in versions

    # Leftovers of killed writers live only in .tmp/, are never listed, and the stale-temp sweep removes them.
    LocalStore(crashed.root).clean_stale_temp(max_age_s=0)
    assert list((crashed.root / ".tmp").iterdir()) == []
    assert registry.store.versions(TASK) == versions


def test_no_acknowledged_registration_is_lost(crashed: CrashRun) -> None:
    stored = _stored_seeds(Registry(crashed.root))
    lost = {v: s for v, s in crashed.reported.items() if stored.get(v) != s}
    assert not lost, f"registrations that returned to their writer are missing or changed: {lost}"


def test_a_server_serves_every_surviving_version(crashed: CrashRun, tiny_base) -> None:
    registry = Registry(crashed.root)
    seeds = _stored_seeds(registry)
    text = "the quick brown fox"
    newest = max(seeds)
    alias_target = registry.resolve(f"{TASK}@{ALIAS}").version
    refs = [f"{TASK}@{v}" for v in sorted(seeds)] + [TASK, f"{TASK}@{ALIAS}"]
    targets = [*sorted(seeds), newest, alias_target]
    with running_server(tiny_base, crashed.root, max_batch_size=8, max_virtual_tokens=32) as (_, address), \
            Client(address, timeout=120) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ref: client.generate(ref, text, max_new_tokens=3), refs))
    for ref, version, result in zip(refs, targets, results):
        expected = expected_ids(tiny_base, prompt_for(seeds[version], tiny_base.spec.hidden_size), text, 3)
        assert result.prompt_version == f"{TASK}@{version}", ref
        assert list(result.token_ids) == expected, f"{ref} differs from the reference"


def _run_to_completion(ctx, root: Path, spec, reports: Path, seeds: list[int], count: int) -> Iterator[dict[int, int]]:
    procs = [(_start(ctx, root, spec, reports / f"race-{s}.txt", s, count), reports / f"race-{s}.txt")
             for s in seeds]
    for proc, report in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0, f"writer exited with {proc.exitcode}"
        started, finished, versions = read_report(str(report))
        assert started and finished and len(versions) == count
        yield versions


def test_concurrent_writers_get_distinct_versions_none_lost(crashed: CrashRun, ctx, tiny_base, tmp_path) -> None:
    registry = Registry(crashed.root)
    before = registry.store.versions(TASK)
    floor = max(before[-1], int((crashed.root / TASK / "counter").read_text()))
    count = 15
    first, second = _run_to_completion(ctx, crashed.root, tiny_base.spec, tmp_path, [900_000, 910_000], count)
    assert not first.keys() & second.keys(), "two writers were given the same version"
    # Nothing crashed this time, so the new numbers are exactly the next ones after the counter.
    assert sorted({**first, **second}) == list(range(floor + 1, floor + 2 * count + 1))
    assert sorted(first) == list(first) and sorted(second) == list(second)
    stored = _stored_seeds(registry)
    assert all(stored[v] == s for v, s in {**first, **second}.items())
    assert registry.store.versions(TASK) == [*before, *sorted({**first, **second})]


def test_killed_writer_leaves_no_lock_held(crashed: CrashRun, tiny_base) -> None:
    # flock dies with its holder: a fresh writer in this process is never blocked by a killed one.
    registry = Registry(crashed.root)
    version = registry.register(TASK, PromptTensor(prompt_for(1, tiny_base.spec.hidden_size), "RAW"),
                                tiny_base.spec, tags={"seed": "1"})
    assert version.version > max(crashed.reported, default=0)
    assert os.path.isdir(crashed.root / TASK / str(version.version))
