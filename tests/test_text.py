"""Stop sequences that name special tokens (`<|im_end|>`), matched on the text decoded with them.

The visible text still leaves special tokens out; it is cut where the stop begins, even inside a
token, and streaming never shows any part of a stop.
"""

from __future__ import annotations

import re

import pytest

from helpers import reference_greedy, running_server
from softprompt.server.core.engine import Engine, Sequence
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.text import TextTracker

TEXT = "hello fox!<|im_end|>\nmore<|im_start|> wörld"


def _feed(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[TextTracker, list[str]]:
    """Feeds ids as the engine does: until a stop fires, the last one final."""
    tracker = TextTracker(tokenizer, stop)
    deltas = []
    for n, token in enumerate(ids):
        deltas.append(tracker.add(token, final=n == len(ids) - 1))
        if tracker.stopped_by is not None:
            break
    return tracker, deltas


@pytest.mark.parametrize(("stop", "kept"), [
    ("<|im_end|>", "hello fox!"),
    ("!<|im_end|>\n", "hello fox"),  # text, a special token, text
    ("x!<|im_end|>", "hello fo"),  # begins inside a token
    ("<|im_end|>\nmo", "hello fox!"),
    ("<|im_start|>", "hello fox!\nmore"),
])
def test_a_stop_naming_a_special_token_fires_and_keeps_the_text_before(tiny_base, stop, kept):
    tok = tiny_base.tokenizer
    tracker, deltas = _feed(tok, tok(TEXT).input_ids, (stop,))
    assert tracker.stopped_by == stop
    assert tracker.text == kept
    assert "".join(deltas) == kept


def test_a_special_stop_that_never_comes_leaves_the_visible_text(tiny_base):
    tok = tiny_base.tokenizer
    ids = tok(TEXT).input_ids
    tracker, deltas = _feed(tok, ids, ("y<|im_end|>", "<|endoftext|>"))
    assert tracker.stopped_by is None
    assert tracker.text == "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == "hello fox!\nmore wörld"


def test_with_a_special_stop_every_stop_is_matched_on_the_text_with_special_tokens(tiny_base):
    """"!\\nm" is in the visible text but not in the generated one, where <|im_end|> separates them."""
    tok = tiny_base.tokenizer
    ids = tok(TEXT).input_ids
    assert _feed(tok, ids, ("!\nm",))[0].stopped_by == "!\nm"
    tracker, _ = _feed(tok, ids, ("!\nm", "<|im_start|>"))
    assert tracker.stopped_by == "<|im_start|>"


class _CountingTokenizer:
    """Characters as ids, one special token (id 1, "<s>"); records whether each decode kept special tokens."""

    all_special_ids = [1]

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def convert_ids_to_tokens(self, ids):
        return ["<s>" for _ in ids]

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(skip_special_tokens)
        return "".join("" if i == 1 and skip_special_tokens else "<s>" if i == 1 else chr(i) for i in ids)


def test_only_rows_whose_stops_name_a_special_token_decode_twice():
    ids = [ord(c) for c in "ab"] + [1] + [ord(c) for c in "cd"]
    for stop, twice in ((("zz",), False), (("<x>",), False), (("<s>c",), True)):
        tok = _CountingTokenizer()
        tracker, deltas = _feed(tok, ids, stop)
        assert (False in tok.calls) == twice, stop
    assert (tracker.text, "".join(deltas), tracker.stopped_by) == ("ab", "ab", "<s>c")


def test_incremental_special_stops_equal_a_full_decode(tiny_base):
    """Any mix of text (multi-byte characters included) and special tokens, any stops: the text is the
    visible text before the first stop in the text with special tokens, and the deltas add up to it."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = tiny_base.tokenizer
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    parts = ["héllo wörld", "日本語", "emoji 🙂!", "fox", "x", "\n", " more", *specials]
    stops = ["<|im_end|>", "x<|im_end|>", "<|im_end|>\n", "!<|im_start|>", "wörld", "<|im_start|> more",
             "🙂!<|im_end|>", "語<|endoftext|>日", "\n\n"]
    strip = re.compile("|".join(map(re.escape, specials)))

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from(parts), min_size=1, max_size=10), st.sets(st.sampled_from(stops), max_size=3))
    def check(chosen, stop_set):
        ids = [i for p in chosen for i in tok(p, add_special_tokens=False).input_ids]
        tracker, deltas = _feed(tok, ids, tuple(sorted(stop_set)))
        raw = tok.decode(ids[:len(deltas)], skip_special_tokens=False)
        hits = [raw.find(s) for s in stop_set if s in raw]
        assert (tracker.stopped_by is not None) == bool(hits)
        expected = strip.sub("", raw[:min(hits)]) if hits else tok.decode(ids, skip_special_tokens=True)
        assert tracker.text == expected
        assert "".join(deltas) == expected

    check()


def _special_stops(base, engine: Engine) -> tuple[list[int], list[tuple[str, str]]]:
    """The tiny model writes <|im_start|> a few tokens into "the dog": its reference up to there, and
    (stop, text kept) for a stop of that token alone and one that begins with the character before it."""
    tok = base.tokenizer
    reference = reference_greedy(base.model, None, tok("the dog").input_ids, 12, engine.eos_ids)
    at = reference.index(tok.convert_tokens_to_ids("<|im_start|>"))
    before = tok.decode(reference[:at])
    assert at >= 2 and before
    return reference[:at + 1], [("<|im_start|>", before), (before[-1] + "<|im_start|>", before[:-1])]


def test_the_engine_stops_a_row_at_a_generated_special_token(tiny_base):
    engine = Engine(tiny_base)
    input_ids = tiny_base.tokenizer("the dog").input_ids
    expected, cases = _special_stops(tiny_base, engine)
    for stop, kept in cases:
        seq = Sequence(request_id=0, input_ids=input_ids, params=DecodingOptions(max_new_tokens=12, stop=(stop,)))
        engine.start(seq)
        batch, events = engine.prefill([seq])
        while seq.finish_reason is None:
            events += engine.decode(batch)
        assert seq.finish_reason == "stop"
        assert seq.generated == expected
        assert seq.text.text == kept
        assert "".join(e.text for e in events) == kept


def test_special_stops_through_the_server(tiny_base, tmp_path):
    from softprompt.client import Client

    expected, cases = _special_stops(tiny_base, Engine(tiny_base))
    with running_server(tiny_base, tmp_path, batch_wait_ms=5) as (_, address), Client(address, timeout=60) as client:
        for stop, kept in cases:
            result = client.generate("", "the dog", max_new_tokens=12, stop=[stop])
            assert (result.text, list(result.token_ids), result.finish_reason) == (kept, expected, "stop")
            chunks = list(client.stream("", "the dog", max_new_tokens=12, stop=[stop]))
            assert "".join(c.text for c in chunks) == kept and chunks[-1].finish_reason == "stop"
