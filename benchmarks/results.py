"""What a method's run produces (`Outcome`) and the figures measured from it (`MethodResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Outcome:
    """One run of a method: per request its generated ids, latency and (our server only) time to first token."""

    outputs: list[list[int]]
    latencies: list[float]
    ttfts: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Runner(Protocol):
    """A method under test: set up in its constructor, `run` repeatedly, `close` once."""

    def run(self, new_tokens: int) -> Outcome:
        """Serves every request of the workload, each generating exactly `new_tokens` tokens."""
        ...

    def close(self) -> None:
        """Releases what the constructor took."""
        ...


@dataclass
class MethodResult:
    """The figures of one method's timed run."""

    key: str
    name: str
    label: str
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    peak_memory_bytes: int
    memory_kind: str
    other_load_cores: float | None  # CPU cores other processes used during the run
    outputs: list[list[int]]
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated like numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
