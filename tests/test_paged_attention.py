"""The CPU paged-attention kernel: the same attention as gathering the blocks and running SDPA (windows, grouped
heads, padding rows), used by decode steps and by ragged forwards (prefills, and mixed steps that prefill arriving
rows in a decode step's forward), with greedy outputs equal to the gathered path's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import engine_rows, reference_greedy, run_to_end
from softprompt.server.core import paged_attention, paged_cache
from softprompt.server.core.engine import Engine
from softprompt.server.core.pool import BLOCK_SIZE

KERNEL = paged_attention.load_kernel()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler to build the kernel with")


def _reference(q, keys, values, table, lengths, window, scale):
    """Gather each row's positions in order and run SDPA with grouped heads: what decode steps did before."""
    rows, heads, dim = q.shape
    width = int(lengths.max())
    columns = torch.arange(width)
    slots = table[:, columns // BLOCK_SIZE] * BLOCK_SIZE + columns % BLOCK_SIZE
    k = keys[slots].transpose(1, 2)  # [rows, kv_heads, width, dim]
    v = values[slots].transpose(1, 2)
    query = lengths[:, None] - 1
    allowed = (columns[None, :] <= query) & (columns[None, :] < lengths[:, None])
    if window:
        allowed &= columns[None, :] > query - window
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=allowed[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0]


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("kv_heads", [1, 3, 9])
def test_the_kernel_computes_what_gathering_and_sdpa_compute(kv_heads, window):
    g = torch.Generator().manual_seed(kv_heads + window)
    heads, dim, blocks = 9, 32, 40
    keys = torch.randn(blocks * BLOCK_SIZE, kv_heads, dim, generator=g)
    values = torch.randn(blocks * BLOCK_SIZE, kv_heads, dim, generator=g)
    lengths = torch.tensor([1, 17, 40, 3, 33])
    table = torch.stack([torch.randperm(blocks - 1, generator=g)[:3] + 1 for _ in lengths])  # scattered blocks
    q = torch.randn(len(lengths), heads, dim, generator=g)
    got = KERNEL.paged_decode(q, keys, values, table, lengths, BLOCK_SIZE, window, 0.2)
    assert torch.allclose(got, _reference(q, keys, values, table, lengths, window, 0.2), atol=1e-5, rtol=1e-5)


def test_a_padding_row_attends_to_nothing_and_bad_inputs_are_refused():
    keys = values = torch.randn(4 * BLOCK_SIZE, 1, 8)
    table = torch.tensor([[1], [2]])
    out = KERNEL.paged_decode(torch.randn(2, 2, 8), keys, values, table, torch.tensor([0, 3]), BLOCK_SIZE, 0, 1.0)
    assert not out[0].any() and out[1].abs().sum() > 0
    with pytest.raises(RuntimeError, match="outside the pool"):
        KERNEL.paged_decode(torch.randn(1, 2, 8), keys, values, torch.tensor([[9]]), torch.tensor([1]), BLOCK_SIZE,
                            0, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        KERNEL.paged_decode(torch.randn(1, 2, 8).double(), keys, values, table[:1], torch.tensor([1]), BLOCK_SIZE,
                            0, 1.0)


def test_decode_steps_use_the_kernel_and_give_the_gathered_paths_tokens(tiny_base, monkeypatch):
    calls = []
    attend = paged_cache.PagedCache.attend
    monkeypatch.setattr(paged_cache.PagedCache, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    outputs = {}
    for kernel in (True, False):
        engine = Engine(tiny_base, paged_kernel=kernel, pad_shapes=True)
        rows = engine_rows(engine, tiny_base, 5)
        batch, _ = engine.prefill(rows[:3])
        engine.decode(batch)
        run_to_end(engine, engine.concatenate([batch, engine.prefill(rows[3:])[0]]))
        outputs[kernel] = [s.generated for s in rows]
        if kernel:
            layers = tiny_base.model.config.num_hidden_layers
            assert calls and len(calls) % layers == 0  # every layer of every decode step, nothing else
            calls.clear()
    assert not calls  # the gathered path never calls the kernel
    assert outputs[True] == outputs[False]
    for seq in rows:
        assert seq.generated == reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens,
                                                 engine.eos_ids)


def test_outside_a_decode_step_sdpa_is_transformers_own(tiny_base):
    """The registered wrapper changes nothing for forwards that are not fused decode steps (the reference, training)."""
    Engine(tiny_base, paged_kernel=True)
    ids = tiny_base.tokenizer("the quick brown fox").input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        wrapped = tiny_base.model(x).logits
        tiny_base.model.config._attn_implementation = "eager"
        try:
            eager = tiny_base.model(x).logits
        finally:
            tiny_base.model.config._attn_implementation = "sdpa"
    assert torch.allclose(wrapped, eager, atol=1e-5)


def test_a_mixed_step_computes_what_prefill_and_decode_apart_compute(tiny_base):
    """Decode rows, arriving rows (a cached prefix, an uncached prompt, no prompt) and a chunk in one ragged
    forward: the same logits as the padded forwards, and every row's tokens the no-cache reference's."""
    from softprompt.server.core.engine import PartialPrefill
    from softprompt.server.core.forward import Fresh

    engine = Engine(tiny_base, prefix_cache_bytes=1 << 20, ignore_eos=True)
    assert engine.fuses_steps
    rows = engine_rows(engine, tiny_base, 7)
    batch, _ = engine.prefill(rows[:3])
    engine.decode(batch)
    partial = PartialPrefill(rows[6])
    engine.prefill_chunk(partial, 2)
    captured = {}
    emit = engine._emit
    engine._emit = lambda b, logits: captured.setdefault("logits", logits.clone()) is None or emit(b, logits)
    lengths = [s.kv.length for s in rows]
    batch, events = engine.step(batch, rows[3:6], partial, 3)
    assert [e.request_id for e in events] == [s.request_id for s in rows[:6]] and partial.done == 5
    # The same rows again, padded: rewind them and run what the step ran through the gathered path.
    engine._emit = emit
    for seq, length in zip(rows, lengths):
        seq.kv.length = length
    partial.done = 2
    firsts = [s.generated for s in rows[3:6]]
    for seq in rows[3:6]:
        seq.generated = []
    fresh = [engine._first(s.kv, s.prompt, s.prompt_key, s.tokens) for s in rows[3:6]]
    decode = [Fresh(s.kv, None, [s.generated[-2]]) for s in rows[:3]]
    chunk, _, _ = engine._chunk(partial, 3)
    padded = engine.forwards.padded([*decode, *fresh, chunk])[:6]
    assert torch.allclose(captured["logits"], padded, atol=1e-4, rtol=1e-4)
    for seq, first in zip(rows[3:6], firsts):
        seq.generated = first
    run_to_end(engine, batch)
    for seq in rows[:6]:
        assert seq.generated == reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, len(seq.generated), ())


def test_a_model_the_kernel_cannot_attend_for_runs_its_forwards_padded(tiny_base, monkeypatch):
    """A layer needing attention the kernel lacks (soft-capping, sinks) in a ragged forward: that forward runs padded,
    exact, and the engine stops fusing steps."""
    monkeypatch.setattr(paged_cache.PagedCache, "covers", lambda self, query: False)
    engine = Engine(tiny_base, ignore_eos=True)
    assert engine.fuses_steps
    rows = engine_rows(engine, tiny_base, 5)
    batch, _ = engine.prefill(rows[:3])
    assert not engine.fuses_steps
    engine.decode(batch)
    batch, _ = engine.step(batch, rows[3:])
    run_to_end(engine, batch)
    for seq in rows:
        assert seq.generated == reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, len(seq.generated), ())
