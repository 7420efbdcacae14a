"""Chunked prefill: a row longer than the prefill budget is prefilled in parts between decode steps.

Exactness: rows prefilled in one, two or many chunks (with and without soft prompts, resumed rows too)
then decoded in a batch with others equal the no-cache reference, for full-attention and sliding-window
models. Interleaving is counted, never timed: every engine call is recorded in order, and between two
chunks of a long row (or two Classify forwards) the running rows take a decode step -- in the same forward
where the engine runs mixed steps (`fused`: the paged kernel's ragged forwards), apart where it does not.
"""

from __future__ import annotations


import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import TEXTS, engine_prompts, expected_ids, reference_greedy, run_to_end, torch_threads
from softprompt.prompts.base import spec_of
from softprompt.prompts.inject import score_continuations
from softprompt.server.app.server import build_app
from softprompt.server.config import ServerConfig
from softprompt.server.core import forward
from softprompt.server.core.engine import Engine, PartialPrefill, Sequence
from softprompt.server.core.errors import CancelledError
from softprompt.server.core.model import BaseModel
from softprompt.server.core.planning import PrefillPlan, plan_prefill
from softprompt.server.core.kv_manager import KvManager, RowBlocks
from softprompt.server.core.paged_cache import Segment
from softprompt.server.core.pool import BLOCK_SIZE, KvPool, LayerShape
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.types import ClassifyRequest, GenerationRequest

WINDOW = 6
# "mistral": every layer slides; "qwen2": layer 0 attends to everything, layers 1 and 2 slide.
_SLIDING = {"mistral": dict(sliding_window=WINDOW),
            "qwen2": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)}
LONG = TEXTS[2] + " " + TEXTS[0] + " " + TEXTS[3]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _base(family: str, impl: str, tiny_base) -> BaseModel:
    if family == "llama":
        return tiny_base
    tok = tiny_base.tokenizer
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    config = AutoConfig.for_model(family, **{**sizes, **_SLIDING[family]}, vocab_size=len(tok),
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return BaseModel(model.eval().requires_grad_(False), tok, spec_of(model, family), torch.device("cpu"),
                     torch.float32)


def test_a_row_over_the_budget_is_planned_alone_in_chunks():
    assert plan_prefill([5000, 10], room=4, max_positions=4096) == PrefillPlan(1, chunked=True)
    assert plan_prefill([10, 5000], room=4, max_positions=4096) == PrefillPlan(1)
    assert plan_prefill([10, 10], room=4, max_positions=4096) == PrefillPlan(2)
    assert plan_prefill([5000], room=0, max_positions=4096) == PrefillPlan(0)
    assert plan_prefill([], room=4, max_positions=4096) == PrefillPlan(0)


def _manager(free_blocks: int) -> KvManager:
    return KvManager(KvPool([LayerShape(1, 2)], free_blocks, dtype=torch.float32, device=torch.device("cpu")))


def _joined(manager: KvManager, blocks: list[int]) -> int:
    """How many leading rows (each needing that many blocks) get theirs, asked in arrival order as the
    scheduler asks: the first told no holds back those behind it."""
    for joined, need in enumerate(blocks):
        if manager.allocate_slots(RowBlocks(), need * BLOCK_SIZE) is None:
            return joined
    return len(blocks)


def test_a_prefill_takes_only_rows_whose_kv_blocks_are_free():
    """Rows wait while the pool cannot hold them, in arrival order: a long row is not overtaken. A row
    joining leaves one block per row already holding blocks, so those can grow."""
    assert _joined(_manager(5), [2, 2, 2]) == 2
    assert _joined(_manager(5), [6, 1]) == 0
    assert _joined(_manager(312), [313]) == 0
    assert _joined(_manager(313), [313]) == 1
    manager = _manager(4)
    row = RowBlocks()
    assert manager.allocate_slots(row, BLOCK_SIZE) == [1] and manager.usage().rows == 1
    assert manager.allocate_slots(RowBlocks(), 3 * BLOCK_SIZE) is None  # 3 free, less one in reserve for `row`
    assert manager.allocate_slots(row, 4 * BLOCK_SIZE) == [2, 3, 4]  # a running row grows into the reserve
    assert manager.allocate_slots(row, 5 * BLOCK_SIZE) is None and len(row.blocks) == 4  # no: nothing changes
    manager.free(row)
    assert manager.allocate_slots(row, BLOCK_SIZE) == [4]
    scored = RowBlocks(transient=True)  # gives its blocks back within the step: it may take the reserve
    assert manager.allocate_slots(scored, 3 * BLOCK_SIZE) is not None and manager.usage().free_blocks == 0
    manager.free(scored)
    manager.free(row)
    assert manager.usage().used_blocks == manager.usage().rows == 0 and not row.blocks


def _chunked(engine: Engine, seq: Sequence, budget: int):
    partial, chunks = PartialPrefill(seq), 0
    while True:
        chunks += 1
        done = engine.prefill_chunk(partial, budget)
        if done is not None:
            return done[0], chunks


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("mistral", "sdpa"), ("qwen2", "sdpa"),
                                         ("qwen2", "eager")])
@pytest.mark.parametrize("chunks", [1, 2, "many"])
@pytest.mark.parametrize("segments", [False, True], ids=["kernel", "segments"])
def test_chunked_rows_join_a_batch_and_match_the_reference(family, impl, chunks, segments, tiny_base, monkeypatch):
    """Each prompt's row (none, 5 and 9 virtual tokens) and a resumed row are prefilled in chunks, then decode
    with rows prefilled whole; sliding windows (6 tokens) are far shorter than the rows. With `segments`, every
    ragged row of more than one position is attended by SDPA over its gathered keys (as long chunks are)."""
    made: list[forward.Segment] = []
    if segments:
        monkeypatch.setattr(forward, "SEGMENT_WORK", 0)
        monkeypatch.setattr(forward, "Segment", lambda *a: made.append(Segment(*a)) or made[-1])
    base = _base(family, impl, tiny_base)
    engine = Engine(base, prefix_cache_bytes=1 << 20, ignore_eos=True)
    prompts = engine_prompts(base)
    ids = base.tokenizer(LONG).input_ids
    rows = []
    for i, prompt in enumerate([*prompts, prompts[2]]):
        seq = Sequence(request_id=i, input_ids=ids[:len(ids) - 3 * i], params=DecodingOptions(max_new_tokens=8),
                       prompt=prompt, prompt_key=None if prompt is None else (str(i % 3), 1, "x"))
        engine.start(seq)
        rows.append(seq)
    resumed = rows[-1]
    first, _ = engine.prefill([resumed])
    for _ in range(3):
        engine.decode(first)
    engine.filter(first, [])  # preempted: its KV is gone, it resumes by recompute
    batch, _ = engine.prefill([rows[0]])  # a row prefilled whole, decoding while the others are chunked
    engine.decode(batch)
    for seq in rows[1:]:
        fresh = engine.fresh_positions(seq.prompt, seq.prompt_key, len(seq.tokens))
        budget = {1: fresh, 2: -(-fresh // 2), "many": 4}[chunks]
        part, count = _chunked(engine, seq, budget)
        assert count == -(-fresh // budget)
        batch = engine.concatenate([batch, part])
        engine.decode(batch)
    run_to_end(engine, batch)
    for seq in rows:
        assert seq.generated == reference_greedy(base.model, seq.prompt, seq.input_ids, 8, ()), seq.request_id
    assert bool(made) == (segments and engine.fuses_steps)


def test_a_chunk_needs_a_position(tiny_base):
    engine = Engine(tiny_base)
    seq = Sequence(request_id=0, input_ids=[5, 6], params=DecodingOptions(max_new_tokens=2))
    engine.start(seq)
    with pytest.raises(ValueError, match="at least one position"):
        engine.prefill_chunk(PartialPrefill(seq), 0)


# ---------------------------------------------------------------- the scheduler interleaves


class _Calls:
    """Records the engine's model calls in order (the real methods run)."""

    def __init__(self, engine: Engine, on_call=None) -> None:
        self.names: list[str] = []
        self.on_call = on_call
        for name in ("prefill", "prefill_chunk", "decode", "score", "step"):
            setattr(engine, name, self._recording(name, getattr(engine, name)))

    def _recording(self, name, method):
        def call(*args):
            self.names.append(name)
            if self.on_call is not None:
                self.on_call(name, args)
            return method(*args)
        return call

    def between(self, name: str) -> list[list[str]]:
        """The calls between consecutive calls of `name`."""
        at = [i for i, n in enumerate(self.names) if n == name]
        return [self.names[a + 1:b] for a, b in zip(at, at[1:])]


def _app(tiny_base, tmp_path, budget: int, fused: bool):
    app = build_app(ServerConfig(port=0, store=tmp_path / "store", max_batch_size=8, max_prefill_tokens=budget,
                                 paged_kernel=fused), base=tiny_base)
    assert app.scheduler.engine.fuses_steps == fused
    return app


def _submit(app, text: str, max_new: int):
    return app.scheduler.submit(app.admission.admit(GenerationRequest("", text, DecodingOptions(max_new_tokens=max_new))))


def _long_run(tiny_base, budget: int) -> tuple[int, int]:
    """The long request's chunks at `budget`, and how many tokens the short rows must make to outlast them."""
    chunks = -(-len(tiny_base.tokenizer(LONG).input_ids) // budget)
    short_new = chunks + 4
    assert len(expected_ids(tiny_base, None, "hi", short_new)) == short_new, "a short row ends before the long prefill"
    return chunks, short_new


@pytest.mark.parametrize("fused", [False, True], ids=["apart", "fused"])
def test_a_long_prefill_runs_in_chunks_between_decode_steps(fused, tiny_base, tmp_path):
    budget = 5
    chunks, short_new = _long_run(tiny_base, budget)
    app = _app(tiny_base, tmp_path, budget, fused)
    steps: list[tuple[bool, int, bool]] = []  # fused: (decode rows, arriving rows, a chunk) of each mixed step
    calls = _Calls(app.scheduler.engine,
                   lambda name, args: steps.append((args[0] is not None, len(args[1]), args[2] is not None))
                   if name == "step" else None)
    shorts = [_submit(app, "hi", short_new) for _ in range(2)]
    long = _submit(app, LONG, 6)  # queued behind the short rows, before the worker starts
    app.scheduler.start()
    try:
        for handle in shorts:
            assert list(handle.result().token_ids) == expected_ids(tiny_base, None, "hi", short_new)
        assert list(long.result().token_ids) == expected_ids(tiny_base, None, LONG, 6)
    finally:
        app.scheduler.close()
    assert app.scheduler.stats.prefill_chunks == chunks > 2
    if fused:
        # The short rows prefilled together, then each chunk in the forward of one decode step of theirs.
        assert calls.names[:1 + chunks + 1] == ["step"] * (1 + chunks) + ["decode"]
        assert steps == [(False, 2, False)] + [(True, 0, True)] * chunks
        assert "prefill_chunk" not in calls.names and "prefill" not in calls.names
        return
    assert calls.names[:2] == ["prefill", "decode"]  # the short rows, prefilled together
    assert calls.names.count("prefill_chunk") == chunks
    # One chunk between two decode steps of the running rows, and never a chunk without one.
    assert calls.between("prefill_chunk") == [["decode"]] * (chunks - 1)
    assert calls.names[2:2 + 2 * chunks] == ["prefill_chunk", "decode"] * chunks


@pytest.mark.parametrize("fused", [False, True], ids=["apart", "fused"])
@pytest.mark.parametrize("how", ["preempted", "cancelled"])
def test_a_row_stopped_mid_prefill_frees_its_partial_kv(how, fused, tiny_base, tmp_path):
    """Preempted (a decode step runs out of memory while the row is half prefilled) it restarts from its
    first chunk and ends exact; cancelled it fails alone. Either way its partial KV is freed.

    Fused, the mixed step carrying its second chunk runs out of memory first: its parts then run apart, the
    chunk alone and the decode step, which runs out of memory too."""
    budget = 5
    chunks, short_new = _long_run(tiny_base, budget)
    app = _app(tiny_base, tmp_path, budget, fused)
    held: list[RowBlocks] = []  # the long row's blocks, taken at its first chunk
    state = {"decodes": 0, "failed_step": False}

    def on_call(name, args):
        if name == "decode":
            state["decodes"] += 1
            if how == "preempted" and (state["failed_step"] if fused else state["decodes"] == 3):
                state["failed_step"] = False
                raise torch.OutOfMemoryError("injected: out of memory")  # after the long row's second chunk
        chunk = args[0] if name == "prefill_chunk" else args[2] if name == "step" else None
        if chunk is not None and chunk.done and not held:  # once its first chunk is in
            held.append(chunk.sequence.kv)
            assert held[0].blocks, "the partial row holds KV blocks"
            if how == "cancelled":
                long.cancel()
            elif fused:
                state["failed_step"] = True
                raise torch.OutOfMemoryError("injected: out of memory")

    calls = _Calls(app.scheduler.engine, on_call)
    shorts = [_submit(app, "hi", short_new) for _ in range(2)]
    long = _submit(app, LONG, 6)
    app.scheduler.start()
    try:
        for handle in shorts:
            assert list(handle.result().token_ids) == expected_ids(tiny_base, None, "hi", short_new)
        if how == "preempted":
            assert list(long.result().token_ids) == expected_ids(tiny_base, None, LONG, 6)
        else:
            with pytest.raises(CancelledError):
                long.result()
    finally:
        app.scheduler.close()
    assert held and not held[0].blocks, "the partial KV outlived the row's prefill"
    assert app.scheduler.engine.kv_usage().used_blocks == 0
    stats = app.scheduler.stats
    if how == "preempted":
        assert stats.preemptions == 1 and stats.prefill_chunks == chunks + 2  # two chunks redone
    else:  # cancelled during its second chunk: no third
        assert stats.preemptions == 0 and stats.prefill_chunks == 2


@pytest.mark.parametrize("fused", [False, True], ids=["apart", "fused"])
def test_classify_forwards_interleave_with_decode_steps(fused, tiny_base, tmp_path):
    """Classify rows needing several forwards are scored one forward per decode step of the running rows."""
    app = build_app(ServerConfig(port=0, store=tmp_path / "store", max_batch_size=2, max_prefill_tokens=24,
                                 paged_kernel=fused), base=tiny_base)
    calls = _Calls(app.scheduler.engine)
    requests = [ClassifyRequest("", text, ("great", "awful film", "a", "so so")) for text in (TEXTS[0], "hi")]
    admitted = [app.admission.admit_classify(r) for r in requests]
    futures = [app.scheduler.submit_scoring(a) for a in admitted]
    shorts = [_submit(app, "hi", 12) for _ in range(2)]
    app.scheduler.start()
    try:
        for a, future in zip(admitted, futures):  # each score lands on its own label, whichever forward ran it
            alone = [float(score_continuations(tiny_base.model, [None], [a.input_ids], [t]).totals()[0])
                     for t in a.label_ids]
            assert future.result(timeout=60) == pytest.approx(alone, abs=1e-4)
        for handle in shorts:
            assert list(handle.result().token_ids) == expected_ids(tiny_base, None, "hi", 12)
    finally:
        app.scheduler.close()
    forwards = calls.names.count("score")
    assert forwards >= 4  # 8 label rows, at most 2 per forward
    first = ["step"] if fused else ["prefill", "decode"]  # the short rows' prefill (with their decode step)
    assert calls.names[:1 + len(first)] == ["score", *first]
    assert calls.between("score") == [first] + [["decode"]] * (forwards - 2)
