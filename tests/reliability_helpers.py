"""Helpers shared by the reliability tests (crash safety, hostile input, load, drain)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from conftest import reference_greedy


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the block with `n` intra-op torch threads, then restores the previous setting.

    The tiny test model's matrices are far too small to gain from parallelism, and on a busy 2-core
    runner OpenMP's spinning threads make each forward up to 100x slower; one thread keeps these
    tests' run time bounded without changing any result.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0, poll_s: float = 0.01) -> None:
    """Polls `predicate` until it holds; the generous bound only turns a hang into a failure."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def expected_ids(base, prompt: torch.Tensor | None, text: str, max_new_tokens: int) -> list[int]:
    """The reference greedy continuation of `text` under `prompt` (no KV cache, no batching)."""
    ids = base.tokenizer(text).input_ids
    return reference_greedy(base.model, prompt, ids, max_new_tokens, {base.tokenizer.eos_token_id})
