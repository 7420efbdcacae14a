"""Turns a row's generated token ids into text deltas, honouring stop sequences.

Streaming must never show text that later turns out to be part of a stop sequence, nor half of a
multi-byte character, so the safe-to-emit end of the text trails the decoded end when needed.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextTracker:
    """Incremental detokenizer for one row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
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
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
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

    def _safe_end(self, text: str) -> int:
        end = len(text)
        # An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
        while end > self._emitted and text[end - 1] == "\ufffd":
            end -= 1
        held = 0
        for stop in self._stop:
            # Hold back the longest tail that could still grow into this stop sequence.
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text.startswith(stop[:k], end - k):
                    held = max(held, k)
                    break
        return max(end - held, self._emitted)
