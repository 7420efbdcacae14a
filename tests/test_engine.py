"""The engine against the no-cache reference: prompts injected right, batches mixed, rows joining and leaving."""

from __future__ import annotations

import pytest
import torch

from helpers import TEXTS, engine_prompts, engine_rows, reference_greedy, run_to_end
from softprompt.server.core.engine import Engine, ScoreRow, Sequence
from softprompt.prompts.options import DecodingOptions
from softprompt.prompts.outcomes import FinishReason
from softprompt.server.core.text import TextTracker

def test_single_rows_match_reference(tiny_base):
    engine = Engine(tiny_base)
    for seq in engine_rows(engine, tiny_base, 3):
        batch, _ = engine.prefill([seq])
        run_to_end(engine, batch)
        expected = reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens, engine.eos_ids)
        assert seq.generated == expected


def test_mixed_batch_with_joins_and_leaves_matches_reference(tiny_base):
    engine = Engine(tiny_base)
    rows = engine_rows(engine, tiny_base, 8)
    batch, _ = engine.prefill(rows[:3])
    for _ in range(2):
        engine.decode(batch)
    late, _ = engine.prefill(rows[3:])  # rows of all three kinds join a batch already two steps in
    run_to_end(engine, engine.concatenate([batch, late]))
    for seq in rows:
        expected = reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens, engine.eos_ids)
        assert seq.generated == expected, f"row {seq.request_id} differs from the no-cache reference"
        assert seq.finish_reason == "length"


def test_wrong_positions_would_be_caught(tiny_base):
    """Guards the guard: a prompt of a different row gives different tokens, so the checks above can fail."""
    engine = Engine(tiny_base)
    a, b = engine_rows(engine, tiny_base, 3)[1:3]
    swapped = reference_greedy(tiny_base.model, b.prompt, a.input_ids, a.params.max_new_tokens, engine.eos_ids)
    batch, _ = engine.prefill([a])
    run_to_end(engine, batch)
    assert a.generated != swapped


def test_eos_finishes_row(tiny_base):
    engine = Engine(tiny_base)
    seq = engine_rows(engine, tiny_base, 1, max_new=40)[0]
    first = reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, 1, engine.eos_ids)[0]
    engine.eos_ids = frozenset({first})  # make the row's first token its end-of-sequence token
    batch, events = engine.prefill([seq])
    assert events[0].finish_reason == "eos"
    assert seq.generated == [first]
    assert engine.filter(batch, []) is None


class _CharTokenizer:
    """One character per token id, enough to test stop handling without a model."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _feed(tracker: TextTracker, text: str) -> list[str]:
    return [tracker.add(ord(c)) for c in text]


def test_stop_sequence_is_cut_and_never_streamed():
    tracker = TextTracker(_CharTokenizer(), stop=("\nUser:",))
    deltas = _feed(tracker, "Hi there\nUser: more")
    assert tracker.stopped_by == "\nUser:"
    assert tracker.text == "Hi there"
    assert "".join(deltas) == "Hi there"
    assert "\n" not in "".join(deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_match():
    tracker = TextTracker(_CharTokenizer(), stop=("STOP",))
    deltas = _feed(tracker, "aSTxb")
    assert deltas[2] == ""  # "ST" might start "STOP": held back
    assert "".join(deltas) == "aSTxb"
    assert tracker.stopped_by is None


def test_cached_prefixes_give_the_reference_and_are_reused(tiny_base):
    """Prompt prefixes come from the cache on later prefills; every row still equals the reference."""
    engine = Engine(tiny_base, prefix_cache_bytes=1 << 20)
    hidden = tiny_base.model.config.hidden_size
    g = torch.Generator().manual_seed(3)
    scale = tiny_base.model.get_input_embeddings().weight.std() * 4
    prompts = {("long", 1, "a"): torch.randn(7, hidden, generator=g) * scale,
               ("one", 1, "b"): torch.randn(1, hidden, generator=g) * scale}  # one virtual token: no prefix
    cases = [(("long", 1, "a"), TEXTS[0]), (("long", 1, "a"), ""), (("one", 1, "b"), TEXTS[1]), (None, TEXTS[2])]
    for round_ in range(2):
        rows = []
        for i, (key, text) in enumerate(cases):
            seq = Sequence(request_id=i, input_ids=tiny_base.tokenizer(text).input_ids if text else [],
                           params=DecodingOptions(max_new_tokens=6), prompt=prompts.get(key), prompt_key=key)
            engine.start(seq)
            rows.append(seq)
        batch, _ = engine.prefill(rows)
        run_to_end(engine, batch)
        for seq in rows:
            expected = reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, 6, engine.eos_ids)
            assert seq.generated == expected, f"round {round_}, row {seq.request_id}"
    # Round one misses "long" for both its rows (each computes it in the same forward; one copy is kept);
    # round two hits both.
    # "one" has a single virtual token, so no prefix; the bare row has none either.
    assert (engine.prefixes.misses, engine.prefixes.hits, len(engine.prefixes._items)) == (2, 2, 1)
    engine.prefixes.evict("long", 1)
    assert not engine.prefixes._items


def _check(engine: Engine, base, rows: list[Sequence], *, dropped: frozenset[int] = frozenset()) -> None:
    """Every row's whole output and finish reason equal the no-cache reference's; only the rows in `dropped`
    (request ids of rows taken out early, as a cancelled request is) are compared as far as they got."""
    for seq in rows:
        if seq.request_id in dropped:
            assert seq.finish_reason is None, f"row {seq.request_id} was dropped before it finished"
            expected = reference_greedy(base.model, seq.prompt, seq.input_ids, len(seq.generated), engine.eos_ids)
        else:
            expected = reference_greedy(base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens,
                                        engine.eos_ids)
            reason = FinishReason.EOS if expected[-1] in engine.eos_ids else FinishReason.LENGTH
            assert seq.finish_reason == reason, f"row {seq.request_id} finished by {seq.finish_reason}, not {reason}"
        assert seq.generated == expected, f"row {seq.request_id} differs from the no-cache reference"


def test_graph_shaped_steps_match_reference(tiny_base):
    """The bucketed shapes a CUDA graph replays (padding rows, masked padding columns) change no token."""
    engine = Engine(tiny_base, pad_shapes=True)
    rows = engine_rows(engine, tiny_base, 7)
    batch, _ = engine.prefill(rows[:3])
    for _ in range(3):
        engine.decode(batch)
    batch = engine.concatenate([batch, engine.prefill(rows[3:5])[0]])
    engine.decode(batch)
    batch = engine.filter(batch, [0, 2, 3, 4])  # a row leaves from the middle
    batch = engine.concatenate([batch, engine.prefill(rows[5:])[0]])
    assert engine.shape_of(batch) == (8, 64)  # 6 live rows padded to 8, width to one column block
    run_to_end(engine, batch)
    assert [len(s.generated) for s in rows] == [12, 5, 14, 15, 16, 17, 18]
    _check(engine, tiny_base, rows, dropped=frozenset({rows[1].request_id}))


def test_rows_of_any_lengths_join_and_leave_without_moving_each_others_kv(tiny_base):
    """A joiner longer than the running rows, and a row leaving, leave the other rows' blocks as they were."""
    engine = Engine(tiny_base)
    short = Sequence(request_id=0, input_ids=tiny_base.tokenizer("hi").input_ids, params=DecodingOptions(max_new_tokens=20))
    long = Sequence(request_id=1, input_ids=tiny_base.tokenizer(TEXTS[2] * 3).input_ids,
                    params=DecodingOptions(max_new_tokens=5), prompt=engine_prompts(tiny_base)[2])
    for seq in (short, long):
        engine.start(seq)
    batch, _ = engine.prefill([short])
    engine.decode(batch)
    blocks, held = list(short.kv.blocks), _held(engine, short)
    batch = engine.concatenate([batch, engine.prefill([long])[0]])
    assert short.kv.blocks == blocks and torch.equal(_held(engine, short), held)
    run_to_end(engine, batch)
    _check(engine, tiny_base, [short, long])
    assert engine.kv_usage().used_blocks == 0 and engine.kv_usage().rows == 0  # finished rows gave theirs back


def _held(engine: Engine, seq: Sequence) -> torch.Tensor:
    """The keys a row holds, in position order, first layer."""
    return engine.pool.keys[0][seq.kv.slots(0, seq.kv.length)].clone()


def test_two_live_batches_decode_independently(tiny_base):
    """Two batches over one pool, stepped in turn, stay exact."""
    engine = Engine(tiny_base)
    rows = engine_rows(engine, tiny_base, 4)
    a, _ = engine.prefill(rows[:2])
    b, _ = engine.prefill(rows[2:])
    while a is not None or b is not None:
        for name, batch in (("a", a), ("b", b)):
            if batch is None:
                continue
            engine.decode(batch)
            batch = engine.filter(batch, [i for i, s in enumerate(batch.sequences) if s.finish_reason is None])
            if name == "a":
                a = batch
            else:
                b = batch
    _check(engine, tiny_base, rows)


def test_incremental_detokenizing_equals_a_full_decode(tiny_base):
    """Deltas decoded in small windows add up to the full decode, multi-byte characters split over tokens included."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = tiny_base.tokenizer
    texts = ["héllo wörld — naïve café", "日本語のテキスト", "emoji 🙂🚀 mixed", "plain ascii text, with punctuation!"]
    vocab = len(tok)

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.lists(st.one_of(st.integers(0, vocab - 1), st.sampled_from(texts)), min_size=1, max_size=12))
    def check(parts):
        ids = [i for p in parts for i in ([p] if isinstance(p, int) else tok(p).input_ids)]
        tracker = TextTracker(tok, ())
        deltas = [tracker.add(t, final=n == len(ids) - 1) for n, t in enumerate(ids)]
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)

    check()


def test_scoring_over_cached_prefixes_equals_a_full_forward(tiny_base):
    from softprompt.prompts.inject import score_continuations

    engine = Engine(tiny_base, prefix_cache_bytes=1 << 20)
    prompts = engine_prompts(tiny_base)
    keys = [None, ("five", 1, "a"), ("nine", 1, "b")]
    tok = tiny_base.tokenizer
    rows = [(i % 3, tok(TEXTS[i % 4]).input_ids, tok(label).input_ids)
            for i, label in enumerate(["great", "awful film", "a", "boring, long and slow"])]
    args = ([prompts[p] for p, _, _ in rows], [c for _, c, _ in rows], [t for _, _, t in rows])
    expected = score_continuations(tiny_base.model, *args).totals().tolist()
    for _ in range(2):  # misses, then hits
        got = engine.score([ScoreRow(prompt, keys[p], c, t) for prompt, (p, c, t) in zip(args[0], rows)])
        assert got == pytest.approx(expected, abs=1e-4)
    assert (engine.prefixes.misses, engine.prefixes.hits) == (2, 2)  # the two prompted rows


def test_window_masks_are_transformers_rules_over_positions(tiny_base):
    """Over KV-pool rows a column is a position: each layer type's mask is transformers' own rule; a padding
    query sees column 0 (no mask row is empty, so no NaN); a step sees nothing past its own position. Eager
    attention gets the same masks as additive ones."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    from softprompt.server.core.masks import FULL, SLIDING, MaskLayout

    window = 3
    rules = {FULL: causal_mask_function, SLIDING: sliding_window_causal_mask_function(window)}
    # Queries at positions 8 and 1 (and a padding query at 0) of a width of 12, columns past a query not written yet.
    at = torch.tensor([[8], [1], [0]])
    paged = MaskLayout(window, per_layer_type=True, dtype=None).over_positions(at, 12)
    for kind, rule in rules.items():
        assert torch.equal(paged[kind][:, 0, 0], rule(0, 0, at, torch.arange(12)[None, :])), kind
    assert paged[SLIDING][0, 0, 0].nonzero()[:, 0].tolist() == [6, 7, 8]  # the last 3 positions
    assert paged[SLIDING][2, 0, 0].nonzero()[:, 0].tolist() == [0]  # a padding query is never all-masked
    additive = MaskLayout(window, per_layer_type=False, dtype=torch.float32).over_positions(at, 12)
    assert torch.equal(additive == 0, paged[SLIDING]) and additive.min() == torch.finfo(torch.float32).min

    full = MaskLayout.of(tiny_base.model)
    assert full.window is None
    assert torch.equal(full.over_positions(at, 12)[:, 0, 0], torch.arange(12)[None, :] <= at)
