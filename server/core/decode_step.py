"""One decode step over KV-pool rows: run eagerly, or replayed from a CUDA graph captured at startup.

A decode step of a small model on a GPU is bound by the Python and kernel-launch work of ~10
kernels per layer, not by the GPU. A CUDA graph replays the whole step with one launch. A graph is
fixed to its tensors' addresses and shapes, so a padded step copies its inputs (tokens, positions,
block table) into static buffers and runs at a bucketed shape: rows and attended width each rounded
up to a power of two (width at least 64). Padding rows have position -1: they write the pool's
SCRATCH slot and read only its zero TRASH slot, so they touch no row's keys and values, and the
graphs can be captured over an idle pool with every row padding. The pool never moves, so a graph
captured at startup stays valid for the life of the process.

Graphs are captured once, at startup (`capture`, largest shapes first, all in one memory pool and
writing one shared logits buffer), while no other thread uses the device; thread-local capture mode
keeps other threads' allocator calls from invalidating a capture anyway. A shape whose capture fails
or disagrees with the eager step runs eagerly, alone, with the reason logged; other shapes keep
their graphs.
"""

from __future__ import annotations

import contextlib
import logging
from types import ModuleType

import torch
from transformers import PreTrainedModel

from softprompt.server.core import kv, paged_attention
from softprompt.server.core.masks import MaskLayout
from softprompt.server.core.paged_cache import InPlace, PagedCache, read_slots, write_slots
from softprompt.server.core.pool import BLOCK_SIZE, KvPool, blocks_for

log = logging.getLogger(__name__)

MIN_WIDTH = 64  # the narrowest padded width: short rows share one bucket


def power_of_two(value: int) -> int:
    """The smallest power of two at least `value`."""
    return 1 << max(0, value - 1).bit_length()


def capture_sizes(max_rows: int) -> list[int]:
    """The row buckets graphs are captured for: powers of two up to the one holding `max_rows`."""
    return [1 << i for i in range(power_of_two(max_rows).bit_length())]


def capture_widths(max_width: int) -> list[int]:
    """The width buckets graphs are captured for: powers of two from MIN_WIDTH up to the one holding `max_width`."""
    top = max(MIN_WIDTH, power_of_two(max_width))
    return [w for w in (1 << i for i in range(top.bit_length())) if w >= MIN_WIDTH]


class DecodeStep:
    """Computes next-token logits for rows of the KV pool, writing their new keys and values in place."""

    def __init__(self, model: PreTrainedModel, masks: MaskLayout, pool: KvPool, *, pad_shapes: bool,
                 packed: bool = False, kernel: ModuleType | None = None) -> None:
        self.model = model
        self.packed = packed  # linear layers run on their packed weights (packed_linear)
        self.kernel = kernel  # attention reads the blocks in place (paged_attention); None: gather them
        self.masks = masks
        self.pool = pool
        self.pad_shapes = pad_shapes
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graph_pool: object | None = None
        # Static inputs and the shared logits buffer of padded steps, grown on demand (which drops graphs).
        self._tokens: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._table: torch.Tensor | None = None
        self._logits: torch.Tensor | None = None

    def shape(self, rows: int, width: int) -> tuple[int, int]:
        """(rows, width) a step over `rows` rows attending to `width` columns runs at: exact, or a graph bucket."""
        if not self.pad_shapes:
            return rows, width
        return power_of_two(rows), max(MIN_WIDTH, power_of_two(width))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                 width: int) -> torch.Tensor:
        """float32 logits [rows, vocab] of one step.

        `tokens` [rows] are the rows' newest tokens, `positions` [rows] their next positions (= tokens in
        the pool), `table` [rows, blocks] their block numbers with room for the new token; `width` is the
        longest row's positions after the step.
        """
        rows = tokens.shape[0]
        if not self.pad_shapes:
            return self._forward(tokens, positions, table, width)
        padded_rows, padded_width = self.shape(rows, width)
        self._stage(tokens, positions, table, padded_rows, padded_width)
        graph = self._graphs.get((padded_rows, padded_width))
        if graph is not None:
            graph.replay()
        else:
            self._run(padded_rows, padded_width)
        assert self._logits is not None
        return self._logits[:rows]

    # ------------------------------------------------------------------ the step itself

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor,
                 width: int) -> torch.Tensor:
        at = positions.clamp(min=0)[:, None]
        in_place = None if self.kernel is None else InPlace(self.kernel, table, positions + 1, self.masks.window_of)
        cache = PagedCache(self.pool, write_slots(table, positions[:, None]), read_slots(table, positions + 1, width),
                           in_place=in_place)
        with paged_attention.fused(cache) if in_place is not None else contextlib.nullcontext():
            return kv.forward(self.model, cache, input_ids=tokens[:, None],
                              attention_mask=self.masks.over_positions(at, width), position_ids=at,
                              packed=self.packed).logits

    def _run(self, rows: int, width: int) -> None:
        """The step over the first `rows` static rows, its logits into the shared buffer (what a graph captures)."""
        assert self._tokens is not None and self._positions is not None and self._table is not None
        assert self._logits is not None
        logits = self._forward(self._tokens[:rows], self._positions[:rows], self._table[:rows], width)
        self._logits[:rows].copy_(logits)

    # ------------------------------------------------------------------ static buffers

    def _stage(self, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor, rows: int,
               width: int) -> None:
        """Copies a step's inputs into the static buffers; rows past the live ones become padding."""
        self._reserve(rows, max(blocks_for(width), table.shape[1]))
        assert self._tokens is not None and self._positions is not None and self._table is not None
        live, blocks = table.shape
        self._tokens[:live].copy_(tokens)
        self._positions[:live].copy_(positions)
        self._positions[live:rows].fill_(-1)
        # Entries past a row's own blocks are never read (columns past its length read TRASH).
        self._table[:live, :blocks].copy_(table)

    def _reserve(self, rows: int, blocks: int) -> None:
        """Static buffers for at least `rows` rows of `blocks` blocks; growing them drops graphs captured on the old."""
        have_rows = 0 if self._tokens is None else self._tokens.shape[0]
        have_blocks = 0 if self._table is None else self._table.shape[1]
        if rows <= have_rows and blocks <= have_blocks:
            return
        rows, blocks = max(rows, have_rows), max(blocks, have_blocks)
        device = self.pool.device
        vocab = self.model.get_output_embeddings().weight.shape[0]
        # All four are allocated before any is swapped in: an allocation that fails (out of memory)
        # leaves the buffers, and the graphs captured on them, as they were.
        tokens = torch.zeros(rows, dtype=torch.long, device=device)
        positions = torch.full((rows,), -1, dtype=torch.long, device=device)
        table = torch.zeros(rows, blocks, dtype=torch.long, device=device)
        logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        if self._graphs:
            log.warning("decode inputs outgrew the buffers graphs were captured on (%d rows x %d tokens): "
                        "dropping %d graphs; steps run eagerly", rows, blocks * BLOCK_SIZE, len(self._graphs))
            self._graphs.clear()
        self._tokens, self._positions, self._table, self._logits = tokens, positions, table, logits

    # ------------------------------------------------------------------ CUDA graphs

    def capture(self, max_rows: int, max_width: int) -> None:
        """Captures graphs for every row and width bucket up to `max_rows` x `max_width`, largest first.

        Runs before serving starts. Every row is padding during capture, so the pool's rows are untouched.
        """
        sizes, widths = capture_sizes(max_rows), capture_widths(max_width)
        self._reserve(sizes[-1], blocks_for(widths[-1]))
        assert self._positions is not None
        self._positions.fill_(-1)
        shapes = [(r, w) for r in reversed(sizes) for w in reversed(widths)]
        for rows, width in shapes:
            graph = self._capture(rows, width)
            if graph is not None:
                self._graphs[(rows, width)] = graph
        log.info("captured %d of %d decode step graphs (rows %s, widths %s)", len(self._graphs), len(shapes),
                 sizes, widths)

    def _capture(self, rows: int, width: int) -> torch.cuda.CUDAGraph | None:
        assert self._logits is not None
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._run(rows, width)  # warm-up: lazy initializations happen outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            eager = self._logits[:rows].clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                self._run(rows, width)
            self._graph_pool = graph.pool()
            self._logits[:rows].zero_()
            graph.replay()
        except Exception:  # noqa: BLE001 - that shape runs eagerly; the others keep their graphs
            log.exception("CUDA graph capture failed at %d rows x %d columns; that shape decodes eagerly", rows, width)
            return None
        if not torch.allclose(self._logits[:rows], eager, rtol=1e-3, atol=1e-3):
            log.error("the CUDA graph for %d rows x %d columns disagreed with its eager step (max difference %.3g); "
                      "that shape decodes eagerly", rows, width, float((self._logits[:rows] - eager).abs().max()))
            return None
        return graph

    @property
    def graph_shapes(self) -> list[tuple[int, int]]:
        """The (rows, width) buckets replayed from graphs."""
        return sorted(self._graphs)
