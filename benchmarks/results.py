"""What a method's run produces (`Outcome`) and the figures measured from it (`MethodResult`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Outcome:
    """One run of a method: per request its generated ids, latency and (our server only) time to first token.

    A transport that streams text only ((i), the HTTP API) has no ids: `outputs` is None, `counts` holds the
    tokens the server reported per request, and `texts` the streamed text (which (e) records too, to compare).
    """

    outputs: list[list[int]] | None
    latencies: list[float]
    ttfts: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    texts: list[str] | None = None
    counts: list[int] | None = None

    def made(self) -> list[int]:
        """Tokens generated per request: counted from the ids, else as the server reported them."""
        if self.outputs is not None:
            return [len(o) for o in self.outputs]
        if self.counts is None:
            raise ValueError("an outcome without ids must carry the server's token counts")
        return self.counts


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
    outputs: list[list[int]] | None  # None: the transport returns text only
    texts: list[str] | None = None  # the streamed text, where the method streams text
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated like numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
