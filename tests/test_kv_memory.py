"""`--kv-cache-memory`: parsing what the flag accepts, resolving it to bytes, and the engine it sizes."""

from __future__ import annotations

import os

import pytest
import torch

from softprompt.server.app.kv_budget import resolve_kv_cache_bytes
from softprompt.server.kv_memory import AUTO_CPU, KvCacheMemory, parse_kv_cache_memory
from softprompt.server.config import ServerConfig

CPU = torch.device("cpu")


@pytest.mark.parametrize(("text", "size"), [
    ("24GiB", 24 << 30),
    ("512MiB", 512 << 20),
    ("2GB", 2_000_000_000),
    ("1.5GiB", 3 << 29),
    ("1073741824", 1 << 30),
    ("64 kib", 64 << 10),  # units are case-insensitive, a space is allowed
    (" 3TB ", 3 * 10**12),
    ("100B", 100),
])
def test_sizes_parse_to_bytes(text: str, size: int) -> None:
    assert parse_kv_cache_memory(text) == KvCacheMemory(bytes=size)


@pytest.mark.parametrize(("text", "fraction"), [("0.8", 0.8), ("1.0", 1.0), (".25", 0.25), ("0.001", 0.001)])
def test_fractions_parse(text: str, fraction: float) -> None:
    assert parse_kv_cache_memory(text) == KvCacheMemory(fraction=fraction)


def test_auto_parses_to_neither() -> None:
    assert parse_kv_cache_memory("auto") == parse_kv_cache_memory("AUTO") == KvCacheMemory()


@pytest.mark.parametrize(("text", "message"), [
    ("", "must be 'auto', a size such as 24GiB"),
    ("lots", "must be 'auto', a size such as 24GiB"),
    ("2 GiBs", "must be 'auto', a size such as 24GiB"),
    ("-1GiB", "must be 'auto', a size such as 24GiB"),
    ("0.8.1", "must be 'auto', a size such as 24GiB"),
    ("80%", "must be 'auto', a size such as 24GiB"),
    ("1.5", "as a fraction must be within (0, 1], got '1.5'; a size needs a unit"),
    ("0.0", "as a fraction must be within (0, 1]"),
    ("0", "must be more than 0 bytes, got '0'"),
    ("0GiB", "must be more than 0 bytes"),
])
def test_bad_values_say_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory") as info:
        parse_kv_cache_memory(text)
    assert message in str(info.value)


def test_config_validates_the_flag() -> None:
    assert ServerConfig(kv_cache_memory="512MiB").kv_cache == KvCacheMemory(bytes=512 << 20)
    assert ServerConfig().kv_cache_memory == "auto"
    with pytest.raises(ValueError, match=r"kv_cache_memory must be 'auto'.*got '24 gigs'"):
        ServerConfig(kv_cache_memory="24 gigs")


def test_resolving_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_kv_cache_bytes(KvCacheMemory(bytes=12345), CPU) == 12345
    assert resolve_kv_cache_bytes(KvCacheMemory(), CPU) == AUTO_CPU.bytes == 2 << 30
    # A fraction is of the host's available memory, which changes from moment to moment: fix it.
    host = {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(os, "sysconf", host.__getitem__)
    assert resolve_kv_cache_bytes(KvCacheMemory(fraction=0.5), CPU) == 500 * 4096
    assert resolve_kv_cache_bytes(KvCacheMemory(fraction=1.0), CPU) == 1000 * 4096


def test_the_budget_sizes_the_served_engine(tiny_base, tmp_path) -> None:
    from softprompt.server.app.server import build_app

    app = build_app(ServerConfig(store=tmp_path, kv_cache_memory="1MiB"), base=tiny_base)
    kv = app.scheduler.engine.kv_usage()
    per_block = kv.block_size * kv.bytes_per_token
    # The pool takes whole blocks, one of them reserved, within the budget.
    assert 1 << 20 >= kv.total_bytes + per_block > (1 << 20) - per_block
    assert app.services.inference.model_info().kv_cache == kv


def test_resolving_on_cuda_reads_the_gpu_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = torch.device("cuda", 1)
    asked = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 10_000, 50_000  # free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert resolve_kv_cache_bytes(KvCacheMemory(), gpu) == 8_000  # auto: 0.8 of what is free
    assert resolve_kv_cache_bytes(KvCacheMemory(fraction=0.5), gpu) == 5_000
    assert resolve_kv_cache_bytes(KvCacheMemory(bytes=3 << 30), gpu) == 3 << 30
    assert asked == [gpu, gpu]
