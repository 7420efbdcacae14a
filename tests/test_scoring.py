"""Prefill budgets count padded positions; Classify scores only the positions it needs, exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import TEXTS, engine_prompts, expected_ids
from softprompt.prompts.inject import score_continuations
from softprompt.server.app.server import build_app
from softprompt.server.config import ServerConfig
from softprompt.server.core import kv
from softprompt.server.core.engine import Engine, ScoreRow
from softprompt.server.core.planning import rows_that_fit
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.types import ClassifyRequest, GenerationRequest


def test_a_prefill_counts_rows_times_its_widest_row():
    # Summed lengths (120) fit 250; padded to the widest (3 x 100) they do not.
    assert rows_that_fit([10, 10, 100], max_rows=8, max_positions=250) == 2
    assert rows_that_fit([10, 10, 100], max_rows=8, max_positions=300) == 3
    # One 2,300-token row with 31 short ones: the long row goes alone, or the short ones go without it.
    assert rows_that_fit([2300] + [40] * 31, max_rows=32, max_positions=4096) == 1
    assert rows_that_fit([40] * 31 + [2300], max_rows=32, max_positions=4096) == 31
    # A row over the budget still goes, alone; the batch's room bounds the rows.
    assert rows_that_fit([5000, 1], max_rows=8, max_positions=4096) == 1
    assert rows_that_fit([1] * 10, max_rows=3, max_positions=4096) == 3
    assert rows_that_fit([1] * 10, max_rows=0, max_positions=4096) == 0
    assert rows_that_fit([], max_rows=8, max_positions=4096) == 0


@pytest.mark.parametrize("long_first", [True, False])
def test_a_long_row_and_short_ones_take_separate_prefills(long_first, tiny_base, tmp_path):
    tok = tiny_base.tokenizer
    long_text, short_text = TEXTS[0] * 3, "hi"
    long_n, short_n = len(tok(long_text).input_ids), len(tok(short_text).input_ids)
    # Their summed lengths fit the budget, but padded to the long row two rows already do not.
    budget = long_n + 3 * short_n
    assert budget < 2 * long_n
    app = build_app(ServerConfig(port=0, store=tmp_path / "store", max_batch_size=8, max_prefill_tokens=budget),
                    base=tiny_base)
    texts = [long_text, short_text, short_text, short_text]
    texts = texts if long_first else texts[::-1]
    handles = [app.scheduler.submit(app.admission.admit(GenerationRequest("", text, DecodingOptions(max_new_tokens=4))))
               for text in texts]  # the worker is not started: all four wait in the queue
    app.scheduler.start()
    try:
        for text, handle in zip(texts, handles):
            assert list(handle.result().token_ids) == expected_ids(tiny_base, None, text, 4)
        assert app.scheduler.stats.prefills == 2
    finally:
        app.scheduler.close()


def test_classify_chunks_of_a_small_budget_score_each_label_as_alone(tiny_base, tmp_path):
    """Label rows are sorted by length and split over several forwards; each score lands on its own label."""
    app = build_app(ServerConfig(port=0, store=tmp_path / "store", max_batch_size=3, max_prefill_tokens=24),
                    base=tiny_base)
    requests = [ClassifyRequest("", text, labels) for text, labels in [
        (TEXTS[0], ("great", "awful film", "a")),
        ("hi", ("boring, long and slow", "ok")),
        (TEXTS[1], ("yes", "no", "maybe so", "positive review")),
    ]]
    admitted = [app.admission.admit_classify(r) for r in requests]
    futures = [app.scheduler.submit_scoring(a) for a in admitted]
    app.scheduler.start()
    try:
        for a, future in zip(admitted, futures):
            alone = [float(score_continuations(tiny_base.model, [None], [a.input_ids], [t]).totals()[0])
                     for t in a.label_ids]
            assert future.result(timeout=60) == pytest.approx(alone, abs=1e-4)
    finally:
        app.scheduler.close()


def test_scoring_keeps_logits_of_the_scored_positions_only(tiny_base, monkeypatch):
    """The forward returns logits for the last `longest label + 1` columns, and scores match a full forward."""
    engine = Engine(tiny_base, prefix_cache_bytes=1 << 20)
    prompts = engine_prompts(tiny_base)
    tok = tiny_base.tokenizer
    contexts = [tok(TEXTS[i]).input_ids for i in range(3)]
    labels = [tok(x).input_ids for x in ("great", "a slow, long and boring film", "no")]
    kept = []
    forward = kv.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        kept.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(kv, "forward", spy)
    keys = [None, ("a", 1, "x"), ("b", 1, "y")]
    got = engine.score([ScoreRow(*row) for row in zip(prompts, keys, contexts, labels)])
    longest = max(map(len, labels))
    assert kept[-1] == (3, longest + 1, tiny_base.model.config.vocab_size)
    assert got == pytest.approx(score_continuations(tiny_base.model, prompts, contexts, labels).totals().tolist(),
                                abs=1e-4)


def test_scoring_needs_a_position_before_the_continuation(tiny_base):
    engine = Engine(tiny_base)
    with pytest.raises(ValueError, match="needs a prompt or context"):
        engine.score([ScoreRow(None, None, [], [5])])
    with pytest.raises(ValueError, match="score_last must be a positive"):
        ids = torch.tensor([tiny_base.tokenizer("hi").input_ids])
        kv.forward(tiny_base.model, object(), input_ids=ids, attention_mask=torch.ones_like(ids),
                   position_ids=torch.arange(ids.shape[1])[None], score_last=0)
