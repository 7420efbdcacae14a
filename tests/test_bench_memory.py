"""The memory and overload benchmarks' cores on the tiny model: the arena's reservation rule, the paged pool
holding more rows than it in the same memory, and a real server past its pool failing nothing and matching
the no-cache reference. Sizes are tiny; no timing is asserted."""

from __future__ import annotations

from helpers import torch_threads
from softprompt.benchmarks.memory import Trace, arena_reservation, make_trace, measure, simulate_arena
from softprompt.benchmarks.overload import Plan, run


def test_arena_reservation_is_rows_to_a_power_of_two_times_columns_to_64() -> None:
    # 3 rows -> 4; longest span 100 + most remaining 30 = 130 columns -> 192.
    assert arena_reservation([100, 40, 7], [5, 30, 1]) == 4 * 192
    assert arena_reservation([64], [0]) == 64


def test_arena_simulation_admits_while_the_reservation_fits() -> None:
    # Each row alone reserves 64 columns (span 40 + 9 left); two rows 128, three or four 256.
    trace = Trace(inputs=[40] * 4, max_new=[10] * 4, tasks=[None] * 4, virtual_tokens=0)
    two = simulate_arena(trace, budget_tokens=128)
    assert (two.max_rows, two.steps, two.mean_rows) == (2, 18, 2.0)  # two waves of 9 decode steps
    four = simulate_arena(trace, budget_tokens=256)
    assert (four.max_rows, four.steps) == (4, 9)


def test_pool_holds_more_rows_than_the_arena_in_the_same_memory(tiny_base) -> None:
    # Rows of 4 + 40..60 + 8..16 tokens: at most 5 blocks each, so 16 blocks hold any 3 to their end; the
    # arena reserves 128 columns per row and 4 x 128 for three rows, over the 272-token budget: 2 at most.
    trace = make_trace(8, min_input=40, max_input=60, min_new=8, max_new=16, virtual_tokens=4, tasks=2)
    with torch_threads(1):
        figures = measure(tiny_base, trace, pool_tokens=256)
    pool, arena = figures["pool"], figures["arena"]
    assert pool["failed"] == 0
    assert arena["max_rows"] == 2 and pool["max_rows"] >= 3
    assert pool["mean_rows"] > arena["mean_rows"] and figures["ratio"] > 1
    assert pool["steps"] < arena["steps"]


def test_overloaded_server_fails_nothing_and_matches_the_reference(tiny_base) -> None:
    # 8 streams of up to 4 + ~32 + 16 tokens on a pool of 8 blocks: a few rows at a time, the rest queued.
    plan = Plan(clients=8, distinct=4, tasks=2, virtual_tokens=4, min_new=8, max_new=16, kv_tokens=128)
    with torch_threads(1):
        outcome = run(tiny_base, plan)
    assert (outcome.ok, outcome.failed) == (8, 0)
    assert outcome.checked_equal == 8
    assert outcome.pool_tokens == 128 and outcome.max_rows < plan.clients
