"""Preemption by recompute and failure isolation, with faults injected into the real tiny model.

A forward pre-hook raises torch.OutOfMemoryError: on the model, when a step has too many rows; on
its input embeddings (which embed every prefill's inputs and every decode step's newest tokens),
when a chosen token appears. Requests are queued before the worker starts, so the batches the faults hit do not
depend on timing. Every output is checked against the no-cache reference (greedy) or an
undisturbed run (seeded sampling).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from helpers import engine_rows, expected_ids, reference_greedy, run_to_end, running_server
from softprompt.client import Client
from softprompt.client import errors as client_errors
from softprompt.server.app.server import build_app
from softprompt.server.config import ServerConfig
from softprompt.server.core.engine import Engine, Sequence
from softprompt.server.core.pool import BLOCK_SIZE, KvPool, KvPoolFullError, blocks_for
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.types import GenerationRequest

TEXTS = ["the quick brown fox", "hello", "a soft prompt is a small matrix of", "one frozen model serves",
         "translate english to french", "movie film great"]
SAMPLED = DecodingOptions(max_new_tokens=10, temperature=1.0, seed=7)


@contextmanager
def fault(module: torch.nn.Module, guilty: Callable[[torch.Tensor], bool]) -> Iterator[list[int]]:
    """Raises OutOfMemoryError in any call of `module` whose input (token ids or embeddings) is `guilty`;
    yields the leading sizes of the inputs it failed."""
    failed: list[int] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if x is not None and guilty(x):
            failed.append(int(x.shape[0]))
            raise torch.OutOfMemoryError("injected: out of memory")

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield failed
    finally:
        handle.remove()


def rows_over(base, n: int):
    """A fault on the model's forward when a step has more than `n` rows."""
    return fault(base.model, lambda x: x.shape[0] > n)


def poisoned(base, token: int):
    """A fault on embedding `token`, wherever it is: in an input, or as a decode step's newest token."""
    return fault(base.model.get_input_embeddings(), lambda ids: bool((ids == token).any()))


def _app(base, tmp_path, **settings):
    config = ServerConfig(port=0, store=tmp_path / "store", max_batch_size=8, max_queued_requests=32, **settings)
    return build_app(config, base=base)


def _submit(app, text: str, options: DecodingOptions):
    return app.scheduler.submit(app.admission.admit(GenerationRequest("", text, options)))


# ---------------------------------------------------------------- engine: preemption by recompute


def _run_interrupted(engine: Engine, rows: list[Sequence], steps_before: int, *, park: bool = False,
                     embedded: list[int] | None = None) -> dict[int, list[str]]:
    """Decodes `rows` together, drops the middle row after `steps_before` steps (or with `park`, sets it aside
    keeping its KV), finishes the others a while, then resumes it by prefill and finishes all; returns each
    row's streamed texts. `embedded` gets the number of tokens the resuming prefill embedded."""
    texts: dict[int, list[str]] = {s.request_id: [] for s in rows}

    def record(events):
        for e in events:
            texts[e.request_id].append(e.text)

    batch, events = engine.prefill(rows)
    record(events)
    for _ in range(steps_before):
        record(engine.decode(batch))
    dropped = rows[1]
    index = batch.sequences.index(dropped)
    if park:
        batch = engine.set_aside(batch, index)
    else:
        batch = engine.filter(batch, [i for i in range(len(batch)) if i != index])
    for _ in range(2):
        record(engine.decode(batch))
    assert dropped.resumes_in_place == park
    if park:
        assert engine.joining_positions(dropped) == 1
    seen: list[int] = []
    hook = engine.base.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(int(args[0].numel())))
    try:
        resumed, events = engine.prefill([dropped])
    finally:
        hook.remove()
    if embedded is not None:
        embedded.extend(seen)
    record(events)
    batch = engine.concatenate([batch, resumed])
    while batch is not None:
        record(engine.decode(batch))
        batch = engine.filter(batch, [i for i, s in enumerate(batch.sequences) if s.finish_reason is None])
    return texts


@pytest.mark.parametrize("park", [False, True], ids=["dropped", "parked"])
def test_a_preempted_greedy_row_resumes_with_the_reference_tokens_and_text(tiny_base, park):
    engine = Engine(tiny_base)
    rows = engine_rows(engine, tiny_base, 3, max_new=10)
    embedded: list[int] = []
    texts = _run_interrupted(engine, rows, steps_before=3, park=park, embedded=embedded)
    # Dropped, it recomputes its prompt's tokens and the 4 it had generated; parked, only its last token runs.
    assert sum(embedded) == (1 if park else len(rows[1].input_ids) + 4)
    for seq in rows:
        expected = reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens,
                                    engine.eos_ids)
        assert seq.generated == expected, f"row {seq.request_id} differs from the no-cache reference"
        assert "".join(texts[seq.request_id]) == tiny_base.tokenizer.decode(seq.generated)


@pytest.mark.parametrize("park", [False, True], ids=["dropped", "parked"])
def test_a_preempted_seeded_sampled_row_continues_its_own_stream(tiny_base, park):
    def rows(engine: Engine) -> list[Sequence]:
        out = engine_rows(engine, tiny_base, 3, max_new=10)
        for seq in out:
            seq.params = DecodingOptions(max_new_tokens=seq.params.max_new_tokens, temperature=1.0,
                                        seed=100 + seq.request_id)
            engine.start(seq)
        return out

    engine = Engine(tiny_base)
    undisturbed = rows(engine)
    run_to_end(engine, engine.prefill(undisturbed)[0])
    interrupted = rows(engine)
    _run_interrupted(engine, interrupted, steps_before=4, park=park)
    assert [s.generated for s in interrupted] == [s.generated for s in undisturbed]
    greedy = [reference_greedy(tiny_base.model, s.prompt, s.input_ids, s.params.max_new_tokens, engine.eos_ids)
              for s in undisturbed]
    assert [s.generated for s in undisturbed] != greedy, "sampling should differ from greedy, or this proves nothing"


def test_a_failed_decode_step_leaves_the_batch_as_it_was(tiny_base):
    engine = Engine(tiny_base, pad_shapes=True)  # padded widths attend past the write column: it must read as dead
    rows = engine_rows(engine, tiny_base, 3, max_new=10)
    batch, _ = engine.prefill(rows)
    engine.decode(batch)
    before = [s.kv.length for s in rows], batch.tokens.clone(), engine.pool.keys[0][:16].clone()
    with rows_over(tiny_base, 2), pytest.raises(torch.OutOfMemoryError):
        engine.decode(batch)
    assert [s.kv.length for s in rows] == before[0] and torch.equal(batch.tokens, before[1])
    assert torch.equal(engine.pool.keys[0][:16], before[2])  # the reserved block (TRASH reads zero) untouched
    # As the scheduler does: the newest row is preempted (its blocks freed), the rest retried.
    batch = engine.filter(batch, [0, 1])
    engine.decode(batch)
    resumed, _ = engine.prefill([rows[2]])
    run_to_end(engine, engine.concatenate([batch, resumed]))
    for seq in rows:
        expected = reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens,
                                    engine.eos_ids)
        assert seq.generated == expected, f"row {seq.request_id} differs from the no-cache reference"


def test_a_pool_too_short_for_a_prefill_or_a_step_changes_nothing(tiny_base):
    """KvPoolFullError leaves every row's blocks and the free count as they were."""
    engine = Engine(tiny_base, kv_cache_bytes=_pool_bytes(engine_of=tiny_base, blocks=5))
    rows = [Sequence(request_id=i, input_ids=tiny_base.tokenizer("hello").input_ids,
                     params=DecodingOptions(max_new_tokens=40)) for i in range(6)]
    for seq in rows:
        engine.start(seq)
    assert engine.kv_usage().total_blocks == 5 and all(blocks_for(s.kv_tokens) == 1 for s in rows)
    batch, _ = engine.prefill(rows[:2])
    with pytest.raises(KvPoolFullError):
        engine.prefill(rows[2:])  # 4 rows for 3 free blocks, less one in reserve per running row
    assert engine.kv_usage().used_blocks == 2 and engine.kv_usage().rows == 2
    # Both rows grow into a second block each (one block stays free), then fill it.
    while not all(len(s.kv.blocks) == 2 and s.kv.length == s.kv.room for s in batch.sequences):
        engine.decode(batch)
    lengths = [s.kv.length for s in batch.sequences]
    assert engine.kv_usage().free_blocks == 1
    with pytest.raises(KvPoolFullError):
        engine.decode(batch)  # both rows need a block: one is free
    assert [s.kv.length for s in batch.sequences] == lengths and engine.kv_usage().free_blocks == 0
    # The KV manager's answers the scheduler preempts on: the older row holds its new block, the newest gets none.
    assert engine.kv.allocate_slots(batch.sequences[0].kv, lengths[0] + 1) == []
    assert engine.kv.allocate_slots(batch.sequences[1].kv, lengths[1] + 1) is None


def _pool_bytes(engine_of, blocks: int) -> int:
    """The --kv-cache-memory of a pool of exactly `blocks` blocks (the reserved one on top) for this model."""
    layers = Engine(engine_of).pool.layers
    return KvPool.bytes_per_token(layers, engine_of.dtype) * BLOCK_SIZE * (blocks + 1)


# ---------------------------------------------------------------- scheduler: isolation and preemption


def test_a_step_too_big_preempts_the_newest_rows_which_finish_with_the_same_tokens(tiny_base, tmp_path):
    app = _app(tiny_base, tmp_path)
    undisturbed = [_submit(app, text, SAMPLED) for text in TEXTS[:3]]
    app.scheduler.start()
    sampled_alone = [h.result().token_ids for h in undisturbed]
    app.scheduler.close()

    app = _app(tiny_base, tmp_path)
    greedy = [_submit(app, text, DecodingOptions(max_new_tokens=12)) for text in TEXTS]
    sampled = [_submit(app, text, SAMPLED) for text in TEXTS[:3]]
    with rows_over(tiny_base, 2) as failed:
        app.scheduler.start()  # all 9 are taken at once: prefill fails, then decode steps until 2 rows fit
        results = [h.result() for h in greedy + sampled]
    app.scheduler.close()

    assert failed and max(failed) == 8, "the first step should have held the whole batch"
    assert app.scheduler.stats.preemptions >= 6
    for text, result in zip(TEXTS, results):
        assert list(result.token_ids) == expected_ids(tiny_base, None, text, 12)
    assert [r.token_ids for r in results[len(TEXTS):]] == sampled_alone


def test_a_prefill_failure_fails_only_the_row_that_fails_alone(tiny_base, tmp_path):
    poison = _token_only_in(tiny_base, TEXTS[2], others=TEXTS[:2] + TEXTS[3:], max_new_tokens=8)
    app = _app(tiny_base, tmp_path)
    handles = [_submit(app, text, DecodingOptions(max_new_tokens=8)) for text in TEXTS]
    with poisoned(tiny_base, poison) as failed:
        app.scheduler.start()
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            handles[2].result()
        others = [h.result() for i, h in enumerate(handles) if i != 2]
    app.scheduler.close()
    assert len(failed) == 2, "the whole prefill fails, then the guilty row alone"
    assert app.scheduler.stats.prefills == len(TEXTS) - 1, "each innocent row was prefilled alone"
    for text, result in zip(TEXTS[:2] + TEXTS[3:], others):
        assert list(result.token_ids) == expected_ids(tiny_base, None, text, 8)


def test_a_decode_failure_of_one_row_fails_it_alone_and_the_others_finish(tiny_base, tmp_path):
    guilty = TEXTS[0]  # the oldest row: halving keeps it until it runs alone
    poison = expected_ids(tiny_base, None, guilty, 8)[3]  # its 4th token: it fails mid-stream
    others = [t for t in TEXTS if t != guilty]
    assert poison not in tiny_base.tokenizer(guilty).input_ids, "the guilty row must start well"
    assert all(poison not in tiny_base.tokenizer(t).input_ids + expected_ids(tiny_base, None, t, 8)
               for t in others), "pick a token only the guilty row generates"
    app = _app(tiny_base, tmp_path)
    handles = {text: _submit(app, text, DecodingOptions(max_new_tokens=8)) for text in TEXTS}
    # Resuming recomputes the poison token too, so the guilty row fails wherever it runs, as a real fault would.
    with poisoned(tiny_base, poison) as failed:
        app.scheduler.start()
        with pytest.raises(torch.OutOfMemoryError):
            handles[guilty].result()
        results = {t: handles[t].result() for t in others}
    app.scheduler.close()
    assert failed == [len(TEXTS), 3, 1], "the step is retried with half the rows, down to the guilty row alone"
    assert app.scheduler.stats.preemptions == 3 + 2
    for text in others:
        assert list(results[text].token_ids) == expected_ids(tiny_base, None, text, 8)


def _token_only_in(base, text: str, others: list[str], max_new_tokens: int) -> int:
    """A token of `text` that no other input has and no request generates (with `text`'s own outputs)."""
    used = {t for o in others for t in base.tokenizer(o).input_ids + expected_ids(base, None, o, max_new_tokens)}
    used |= set(expected_ids(base, None, text, max_new_tokens))
    return next(t for t in base.tokenizer(text).input_ids if t not in used)


# ---------------------------------------------------------------- through the server


def test_the_failing_request_gets_resource_exhausted_and_the_server_keeps_serving(tiny_base, tmp_path):
    poison = _token_only_in(tiny_base, TEXTS[2], others=[TEXTS[0]], max_new_tokens=6)
    with running_server(tiny_base, tmp_path / "store") as (app, address):
        with Client(address, timeout=60) as client:
            with poisoned(tiny_base, poison):
                with pytest.raises(client_errors.ResourceExhaustedError):
                    client.generate("", TEXTS[2], max_new_tokens=6)
                kept = client.generate("", TEXTS[0], max_new_tokens=6)
            after = client.generate("", TEXTS[2], max_new_tokens=6)
        assert list(kept.token_ids) == expected_ids(tiny_base, None, TEXTS[0], 6)
        assert list(after.token_ids) == expected_ids(tiny_base, None, TEXTS[2], 6)
