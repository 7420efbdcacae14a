"""Turns a row's generated token ids into text deltas, honouring stop sequences.

Streaming must never show text that later turns out to be part of a stop sequence, nor half of a
multi-byte character, so the safe-to-emit end of the text trails the decoded end when needed.

Each token is decoded in a window of the few ids since the last complete character (as
text-generation-inference does), not by decoding the whole generation again: the worker does
this for every row at every step, so it must cost the same at token 1,000 as at token 1.

The visible text leaves special tokens out. A stop sequence that names one (`<|im_end|>`) could
never match it, so a row with such a stop matches its stops against a second decode that keeps
special tokens (as text-generation-inference matches them); only those rows pay for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from softprompt.prompts.tokens import special_token_ids


def fast_decoder(tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=...)`, calling the Rust tokenizer directly when that is
    what transformers would do anyway: its Python wrapper costs several times the decode itself, and
    this runs for every row at every step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@functools.lru_cache(maxsize=8)
def _special_texts(tokenizer: PreTrainedTokenizerBase) -> frozenset[str]:
    # Cached: a tokenizer's special tokens do not change while it serves, and Llama 3 has hundreds.
    ids = sorted(special_token_ids(tokenizer))
    return frozenset(tokenizer.convert_ids_to_tokens(ids)) if ids else frozenset()


class _Window:
    """Decodes one row's ids incrementally: ids[_prefix:_read] decode to the tail of the text so far."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self._prefix = 0
        self._read = 0

    def advance(self, ids: list[int], final: bool) -> str:
        """Text the newest ids complete, decoded with a little context so spacing comes out as in a full decode."""
        prefix = self.decode(ids[self._prefix:self._read])
        full = self.decode(ids[self._prefix:])
        # An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives: wait for it.
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(ids)
            return full[len(prefix):]
        return ""


class TextTracker:
    """Incremental detokenizer for one row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._visible = _Window(fast_decoder(tokenizer))
        self._stop = stop
        self._longest = max((len(s) for s in stop), default=0)
        # The text stops are matched on: the visible text, or (`_raw`) the text with special tokens.
        self._raw: _Window | None = None
        if stop and any(t in s for s in stop for t in _special_texts(tokenizer)):
            self._raw = _Window(fast_decoder(tokenizer, skip_special_tokens=False))
        self._ids: list[int] = []
        self._decoded = ""
        self._raw_text = ""  # decoded by `_raw`
        self._searched = 0  # length of the matched text at the previous search
        self._text = ""
        self._emitted = 0
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """The final text: everything decoded, cut before a stop sequence if one was produced."""
        return self._text

    def add(self, token_id: int, *, final: bool = False) -> str:
        """Appends a token and returns the text that is now safe to show.

        Sets `stopped_by` when the generation reaches a stop sequence; the text is then cut where it begins.
        """
        self._ids.append(token_id)
        self._decoded += self._visible.advance(self._ids, final)
        text = self._decoded
        held = 0
        if self._stop:
            if self._raw is not None:
                self._raw_text += self._raw.advance(self._ids, final)
            matched = text if self._raw is None else self._raw_text
            # Only the tail can hold a new match: search where the previous text might have ended one.
            start = max(0, self._searched - self._longest + 1)
            hits = [(matched.find(s, start), s) for s in self._stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            self._searched = len(matched)
            if hits:
                cut, self.stopped_by = min(hits)
                self._searched = cut  # tokens added after a stop find it again: the text stays cut
                text = text[:cut] if self._raw is None else self._visible_before(cut)
                final = True
            else:
                held = self._held(matched)
        self._text = text
        # Hold back as many visible characters as the matched text's tail that could still grow into
        # a stop: exact for visible matching, never too few for raw (special tokens show no text).
        end = len(text) if final else max(len(text) - held, self._emitted)
        delta = text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held(self, matched: str) -> int:
        """Length of the longest tail of `matched` that is the start of a stop sequence."""
        end = len(matched)
        held = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, end), held, -1):
                if matched.startswith(stop[:k], end - k):
                    held = k
                    break
        return held

    def _visible_before(self, cut: int) -> str:
        """The visible text before raw position `cut`, where a stop begins (full decodes: once per row).

        It is the visible text of the tokens before the one the stop begins in, plus that token's
        visible text less as many characters as its raw text has from `cut` on (none when it is a
        special token, which has no visible text).
        """
        assert self._raw is not None
        ids, raw, visible = self._ids, self._raw.decode, self._visible.decode
        m = len(ids) - 1
        while len(raw(ids[:m])) > cut:
            m -= 1
        raw_after = len(raw(ids[:m + 1])) - cut
        before, through = visible(ids[:m]), visible(ids[:m + 1])
        return through[:len(before) + max(0, len(through) - len(before) - raw_after)]
