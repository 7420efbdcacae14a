"""Linear layers on oneDNN-packed weights: used by the engine's forwards only, close to the dense kernel, and
invisible to training (gradients) and to the no-cache reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import TEXTS, engine_rows, reference_greedy, run_to_end
from softprompt.server.core import packed_linear
from softprompt.server.core.engine import Engine
from softprompt.server.core.packed_linear import PackedLinear, pack_linears, packing_available, serving

pytestmark = pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 7, bias=False))
    model[2].weight = nn.Parameter(torch.randn(7, 40))
    return model


def test_packed_linears_compute_the_dense_result_inside_serving_only():
    model = _model()
    x = torch.randn(3, 5, 24)
    dense = model(x)
    assert pack_linears(model) == 2 and pack_linears(model) == 0  # idempotent
    assert all(isinstance(m, PackedLinear) and isinstance(m, nn.Linear) for m in (model[0], model[2]))
    assert torch.equal(model(x), dense)  # outside serving(): the dense kernel, bit for bit
    with serving(False):
        assert torch.equal(model(x), dense)
    with torch.inference_mode(), serving(True):
        out = model(x)
    assert out.shape == dense.shape and torch.allclose(out, dense, atol=1e-5, rtol=1e-5)
    # What serving(True) ran is the packed weights: poisoned, they change the output; outside, nothing changes.
    model[2].packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(7, 40), 16)
    assert torch.equal(model(x), dense)
    with torch.inference_mode(), serving(True):
        assert not model(x).any()


def test_training_through_packed_linears_gets_the_dense_gradients():
    model = _model()
    x = torch.randn(4, 24, requires_grad=True)
    model(x).square().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    pack_linears(model)
    with serving(True):  # an input that needs a gradient takes the dense kernel, even here
        model(x).square().sum().backward()
    assert torch.equal(x.grad, expected)


def test_an_engine_that_does_not_pack_never_runs_packed_weights(tiny_base):
    """Another engine packed the shared model's layers; this one was told not to use them."""
    Engine(tiny_base, packed_linears=True)
    engine = Engine(tiny_base, packed_linears=False)
    used = []
    lm_head = tiny_base.model.get_output_embeddings()
    assert isinstance(lm_head, PackedLinear)
    handle = lm_head.register_forward_hook(lambda *_: used.append(packed_linear._SERVING.get()))
    try:
        rows = engine_rows(engine, tiny_base, 2, max_new=3)
        run_to_end(engine, engine.prefill(rows)[0])
    finally:
        handle.remove()
    assert used and not any(used)
    for seq in rows:
        assert seq.generated == reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens,
                                                 engine.eos_ids)


def test_tied_weights_stay_tied(tiny_base):
    model = tiny_base.model
    Engine(tiny_base, packed_linears=True)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tiny_base.tokenizer(TEXTS[0]).input_ids
    assert reference_greedy(model, None, ids, 4, ()) == reference_greedy(model, None, ids, 4, ())
