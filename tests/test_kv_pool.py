"""The KV pool under the scheduler: admission by capacity, preemption when rows outgrow it, nothing lost.

Requests are queued before the worker starts, so which rows join and which are preempted does not
depend on timing; every output is checked against the no-cache reference (greedy) or the same
request served with room to spare (seeded sampling).
"""

from __future__ import annotations

import pytest
import torch

from helpers import TEXTS, reference_greedy, running_server
from softprompt.client import Client
from softprompt.client import errors as client_errors
from softprompt.server.app.server import build_app
from softprompt.server.config import ServerConfig
from softprompt.server.core.engine import Engine, ScoreRow, Sequence
from softprompt.server.core.errors import InvalidRequestError
from softprompt.server.core.kv_manager import KvManager, RowBlocks
from softprompt.server.core.pool import BLOCK_SIZE, SCRATCH, TRASH, KvPool, KvPoolFullError, blocks_for
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.types import ClassifyRequest, GenerationRequest

LONG = 40  # new tokens per request: 3 blocks a row, so 8 rows outgrow a 12-block pool


def _pool_memory(base, blocks: int) -> str:
    """--kv-cache-memory for a pool of exactly `blocks` blocks (the reserved one on top)."""
    layers = Engine(base).pool.layers
    return str(KvPool.bytes_per_token(layers, base.dtype) * BLOCK_SIZE * (blocks + 1))


def _app(base, tmp_path, blocks: int):
    config = ServerConfig(port=0, store=tmp_path / "store", max_batch_size=8, max_queued_requests=64,
                          kv_cache_memory=_pool_memory(base, blocks))
    app = build_app(config, base=base)
    app.scheduler.engine.ignore_eos = True  # every row makes all its tokens: the pool fills for sure
    return app


def _requests() -> list[GenerationRequest]:
    greedy = DecodingOptions(max_new_tokens=LONG)
    sampled = [DecodingOptions(max_new_tokens=LONG, temperature=1.0, seed=seed) for seed in range(4)]
    return [GenerationRequest("", TEXTS[i % len(TEXTS)], greedy) for i in range(8)] + \
        [GenerationRequest("", TEXTS[i], o) for i, o in enumerate(sampled)]


def _serve(app, requests: list[GenerationRequest]) -> list[tuple[int, ...]]:
    handles = [app.scheduler.submit(app.admission.admit(r)) for r in requests]
    app.scheduler.start()
    try:
        return [h.result().token_ids for h in handles]
    finally:
        app.scheduler.close()


def test_rows_outgrowing_the_pool_are_preempted_and_finish_with_the_same_tokens(tiny_base, tmp_path):
    roomy = _serve(_app(tiny_base, tmp_path / "roomy", blocks=1024), _requests())
    app = _app(tiny_base, tmp_path / "small", blocks=12)
    tight = _serve(app, _requests())
    assert app.scheduler.stats.preemptions > 0, "a pool this small should have forced preemptions"
    assert tight == roomy  # seeded sampled rows too: each row's stream survives its preemption
    for request, tokens in zip(_requests()[:8], tight):
        ids = tiny_base.tokenizer(request.input).input_ids
        assert list(tokens) == reference_greedy(tiny_base.model, None, ids, LONG, eos_ids=())
    usage = app.scheduler.engine.kv_usage()
    assert usage.used_blocks == 0 and usage.rows == 0  # every finished or preempted row gave its blocks back


def test_the_pool_holds_rows_for_what_they_hold_not_the_longest_row(tiny_base):
    """One long row beside short ones: the short rows' blocks grow with their own tokens only."""
    engine = Engine(tiny_base)
    long = Sequence(request_id=0, input_ids=tiny_base.tokenizer(TEXTS[2] * 8).input_ids,
                    params=DecodingOptions(max_new_tokens=4))
    shorts = [Sequence(request_id=i, input_ids=tiny_base.tokenizer("hi").input_ids,
                       params=DecodingOptions(max_new_tokens=4)) for i in range(1, 8)]
    for seq in (long, *shorts):
        engine.start(seq)
    batch, _ = engine.prefill([long, *shorts])
    engine.decode(batch)
    assert [len(s.kv.blocks) for s in shorts] == [1] * 7
    assert len(long.kv.blocks) == blocks_for(long.kv.length + 1) > 1
    assert engine.kv_usage().used_blocks == len(long.kv.blocks) + 7


def test_a_request_that_could_never_fit_the_pool_is_refused_with_the_limit(tiny_base, tmp_path):
    app = _app(tiny_base, tmp_path, blocks=4)  # 64 tokens
    with pytest.raises(InvalidRequestError, match=r"exceeds this server's KV cache of 64 tokens \(--kv-cache-memory\)"):
        app.admission.admit(GenerationRequest("", "hello", DecodingOptions(max_new_tokens=100)))
    app.admission.admit(GenerationRequest("", "hello", DecodingOptions(max_new_tokens=30)))  # fits: admitted


def test_over_grpc_a_never_fitting_request_gets_invalid_argument_and_the_server_keeps_serving(tiny_base, tmp_path):
    with running_server(tiny_base, tmp_path / "store", kv_cache_memory=_pool_memory(tiny_base, 4)) as (_, address):
        with Client(address) as client:
            with pytest.raises(client_errors.InvalidArgumentError, match="--kv-cache-memory"):
                client.generate("", "hello", max_new_tokens=100)
            assert client.generate("", "hello", max_new_tokens=5).token_ids


def test_the_pool_hands_out_and_takes_back_blocks():
    pool = KvPool([], 3, dtype=torch.float32, device=torch.device("cpu"))
    a = pool.allocate(2)
    with pytest.raises(KvPoolFullError):
        pool.allocate(2)
    assert pool.free_blocks == 1  # a refused allocation takes nothing
    pool.release(a)
    b = pool.allocate(3)
    assert sorted(b) == [1, 2, 3] and 0 not in b  # block 0 is reserved (TRASH, SCRATCH)


def test_parked_rows_give_their_blocks_back_first_and_only_when_that_makes_room():
    kv = KvManager(KvPool([], 8, dtype=torch.float32, device=torch.device("cpu")))
    old, new, running = RowBlocks(), RowBlocks(), RowBlocks()
    for row, tokens in ((old, 2 * BLOCK_SIZE), (new, 2 * BLOCK_SIZE), (running, BLOCK_SIZE)):
        assert kv.allocate_slots(row, tokens)
        row.length = tokens
    kv.park(old)
    kv.park(new)
    assert kv.parked_rows == 2 and kv.usage().free_blocks == 3
    # A joiner needing more than the free blocks, the parked ones' and the reserve allow: nothing changes.
    joiner = RowBlocks()
    assert kv.allocate_slots(joiner, 9 * BLOCK_SIZE) is None
    assert len(old.blocks) == len(new.blocks) == 2 and old.length and kv.parked_rows == 2
    # The running row grows past the free blocks: the longest parked row gives its blocks back, and only it.
    assert len(kv.allocate_slots(running, 5 * BLOCK_SIZE)) == 4
    assert old.blocks == [] and old.length == 0 and len(new.blocks) == 2 and kv.parked_rows == 1
    # A parked row asking again rejoins: no longer the pool's to take back.
    assert kv.allocate_slots(new, 2 * BLOCK_SIZE) == [] and kv.parked_rows == 0
    assert kv.allocate_slots(joiner, BLOCK_SIZE) is None  # one block free, one in reserve for each of 2 rows
    assert len(new.blocks) == 2
    kv.park(new)
    kv.free(new)  # given back while parked (its request failed): forgotten
    assert kv.parked_rows == 0 and kv.usage().rows == 1


def test_padding_rows_and_queries_never_write_the_slot_padding_columns_read(tiny_base):
    """Padded steps (graph buckets) and left-padded prefills write SCRATCH; TRASH stays zero, so a masked
    padding column can never hold a NaN that poisons a real row (0 * NaN)."""
    engine = Engine(tiny_base, pad_shapes=True)
    rows = [Sequence(request_id=i, input_ids=tiny_base.tokenizer(TEXTS[i]).input_ids,
                     params=DecodingOptions(max_new_tokens=6)) for i in range(3)]  # 3 rows pad to 4
    for seq in rows:
        engine.start(seq)
    batch, _ = engine.prefill(rows)  # different lengths: left-padded queries
    assert engine.shape_of(batch)[0] == 4
    while batch is not None:
        engine.decode(batch)
        batch = engine.filter(batch, [i for i, s in enumerate(batch.sequences) if s.finish_reason is None])
    for keys, values in zip(engine.pool.keys, engine.pool.values):
        assert not keys[TRASH].any() and not values[TRASH].any()
        assert keys[SCRATCH].any()  # the padding did write somewhere: its own slot


def test_classify_rows_take_blocks_of_the_pool_and_generation_waits_for_them(tiny_base, tmp_path):
    """Classify's scoring forwards run in the pool (--kv-cache-memory counts them): while one holds every
    block, a generation waits for the next step instead of failing, and both answer exactly."""
    label = "x" * 40  # a long label: each label row needs 3+ blocks
    app = _app(tiny_base, tmp_path, blocks=8)
    app.scheduler.engine.ignore_eos = False
    classify = ClassifyRequest("", TEXTS[0], (label, label + "y"))
    admitted = app.admission.admit_classify(classify)
    rows_tokens = [len(admitted.input_ids) + len(ids) for ids in admitted.label_ids]
    assert sum(blocks_for(n) for n in rows_tokens) == 8, "the two label rows should take the whole pool"
    order: list[str] = []
    engine = app.scheduler.engine
    for name in ("score", "prefill", "step"):  # a prefill runs apart, or inside a mixed step
        method = getattr(engine, name)
        setattr(engine, name, lambda *args, _m=method, _n=name: (order.append(_n), _m(*args))[1])
    scores = app.scheduler.submit_scoring(admitted)
    handle = app.scheduler.submit(app.admission.admit(GenerationRequest("", "hello", DecodingOptions(max_new_tokens=6))))
    app.scheduler.start()
    try:
        tokens = list(handle.result().token_ids)
        logprobs = scores.result(timeout=60)
    finally:
        app.scheduler.close()
    # The generation joined only once the scoring gave its blocks back.
    assert order[:2] == ["score", "step" if engine.fuses_steps else "prefill"]
    assert app.scheduler.snapshot().stats.kv_waits >= 1
    assert tokens == reference_greedy(tiny_base.model, None, tiny_base.tokenizer("hello").input_ids, 6,
                                      engine.eos_ids)
    alone = Engine(tiny_base).score([ScoreRow(None, None, admitted.input_ids, ids) for ids in admitted.label_ids])
    assert logprobs == pytest.approx(alone, abs=1e-4)
    assert app.scheduler.snapshot().kv.used_blocks == 0
