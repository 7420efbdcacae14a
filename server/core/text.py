"""Turns a row's generated token ids into text deltas, honouring stop sequences.

Streaming must never show text that later turns out to be part of a stop sequence, nor half of a
multi-byte character, so the safe-to-emit end of the text trails the decoded end when needed.

Each token is decoded in a window of the few ids since the last complete character (as
text-generation-inference does), not by decoding the whole generation again: the worker does
this for every row at every step, so it must cost the same at token 1,000 as at token 1.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase


def fast_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, calling the Rust tokenizer directly when that is
    what transformers would do anyway: its Python wrapper costs several times the decode itself, and
    this runs for every row at every step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class TextTracker:
    """Incremental detokenizer for one row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._decode = fast_decoder(tokenizer)
        self._stop = stop
        self._ids: list[int] = []
        # ids[_prefix:_read] decode to the tail of `_decoded`; ids past _read are not text yet.
        self._prefix = 0
        self._read = 0
        self._decoded = ""
        self._text = ""
        self._emitted = 0
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """The final text: everything decoded, cut before a stop sequence if one was produced."""
        return self._text

    def add(self, token_id: int, *, final: bool = False) -> str:
        """Appends a token and returns the text that is now safe to show.

        Sets `stopped_by` when the text reaches a stop sequence; the text is then cut before it.
        """
        self._ids.append(token_id)
        self._decoded += self._decode_new(final)
        text = self._decoded
        if self._stop:
            # Only the tail can hold a new match: search where the previous text might have ended one.
            start = max(0, len(self._text) - max(len(s) for s in self._stop) + 1)
            hits = [(text.find(s, start), s) for s in self._stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                cut, self.stopped_by = min(hits)
                text = text[:cut]
                final = True
        self._text = text
        end = len(text) if final else self._safe_end(text)
        delta = text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return delta

    def _decode_new(self, final: bool) -> str:
        """Text the newest ids complete, decoded with a little context so spacing comes out as in a full decode."""
        prefix = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        # An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives: wait for it.
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prefix):]
        return ""

    def _safe_end(self, text: str) -> int:
        end = len(text)
        held = 0
        for stop in self._stop:
            # Hold back the longest tail that could still grow into this stop sequence.
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text.startswith(stop[:k], end - k):
                    held = max(held, k)
                    break
        return max(end - held, self._emitted)
