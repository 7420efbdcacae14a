"""One decode step over a KvArena: run eagerly, or replayed from a CUDA graph captured for its shape.

A decode step of a small model on a GPU is bound by the Python and kernel-launch work of ~10
kernels per layer, not by the GPU. A CUDA graph replays the whole step with one launch. A graph
is fixed to its tensors' addresses and shapes, so the step reads everything from the arena's
buffers (tokens, positions, the write column, the mask) and runs at bucketed shapes: rows padded
to a power of two, attended width to a multiple of 64. Padding rows compute garbage nobody
reads; padding columns are masked.

A graph is checked against the eager step it was captured from; if they disagree, graphs are
switched off with an error in the log rather than serving different tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from softprompt.server.core import kv
from softprompt.server.core.arena import COLUMN_ALIGN, KvArena, power_of_two, round_up
from softprompt.server.core.masks import MaskLayout

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # the graph's output buffer [rows, vocab]


class DecodeStep:
    """Computes next-token logits for an arena's live rows, writing their keys and values in place."""

    def __init__(self, model: PreTrainedModel, masks: MaskLayout, *, graphs: bool,
                 pad_shapes: bool | None = None) -> None:
        self.model = model
        self.masks = masks
        self.graphs = graphs
        self.pad_shapes = graphs if pad_shapes is None else pad_shapes
        self._captured: dict[tuple[int, int], _Captured] = {}
        self._arena_key: tuple[int, int] | None = None
        self._pool: object | None = None

    def shape(self, arena: KvArena) -> tuple[int, int]:
        """(rows, width) the step runs at: exact, or padded to a graph bucket."""
        rows, width = arena.rows, arena.t + 1
        if not self.pad_shapes:
            return rows, width
        return (min(power_of_two(rows), arena.capacity_rows),
                min(round_up(width, COLUMN_ALIGN), arena.capacity_columns))

    def __call__(self, arena: KvArena, *, graph_ok: bool = True) -> torch.Tensor:
        """float32 logits [live rows, vocab]; `graph_ok` is False for arenas too short-lived to capture for."""
        rows, width = self.shape(arena)
        if self.graphs and graph_ok:
            logits = self._replay(arena, rows, width)
            if logits is not None:
                return logits[:arena.rows]
        return self._forward(arena, rows, width)[:arena.rows]

    def _forward(self, arena: KvArena, rows: int, width: int) -> torch.Tensor:
        arena.mask[:rows].index_fill_(1, arena.column, True)
        return kv.forward(
            self.model,
            arena.step_cache(rows, width),
            input_ids=arena.tokens[:rows, None],
            attention_mask=self.masks.decode(arena.mask, rows, width, arena.column),
            position_ids=arena.positions[:rows, None],
        ).logits

    def _replay(self, arena: KvArena, rows: int, width: int) -> torch.Tensor | None:
        key = (id(arena), arena.generation)
        if key != self._arena_key:
            # New or reallocated buffers: graphs captured on the old ones would read freed memory.
            self._captured.clear()
            self._arena_key = key
        captured = self._captured.get((rows, width))
        if captured is None:
            captured = self._capture(arena, rows, width)
            if captured is None:
                return None
            self._captured[(rows, width)] = captured
            return captured.logits  # capturing ran this step
        captured.graph.replay()
        return captured.logits

    def _capture(self, arena: KvArena, rows: int, width: int) -> _Captured | None:
        """Captures the step at this shape and runs it once; None (graphs now off) if that fails or disagrees.

        The warm-up is the real step: it writes the same keys and values at the same column that
        the replay then writes again, so running both changes nothing.
        """
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                eager = self._forward(arena, rows, width).clone()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(arena, rows, width)
            self._pool = graph.pool()
            graph.replay()
        except Exception:  # noqa: BLE001 - an uncapturable model still serves, eagerly
            log.exception("CUDA graph capture failed at %d rows x %d columns; decoding eagerly from now on",
                          rows, width)
            self.graphs = False
            return None
        if not torch.allclose(logits[:arena.rows], eager[:arena.rows], rtol=1e-3, atol=1e-3):
            log.error("a CUDA graph disagreed with the eager step it was captured from (max difference %.3g); "
                      "decoding eagerly from now on", float((logits - eager).abs().max()))
            self.graphs = False
            return None
        log.debug("captured a decode step graph for %d rows x %d columns", rows, width)
        return _Captured(graph, logits)
