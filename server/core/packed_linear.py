"""Linear layers with oneDNN-packed weights for the engine's forwards on a CPU.

On a CPU a decode step is mostly matrix products of a few rows by each weight matrix, and the BLAS
behind `torch.nn.functional.linear` (MKL) is slow at that shape on some processors: on this
project's 2-core AMD EPYC, oneDNN with its weights reordered once into its blocked layout (what
inductor's `freezing` does for compiled CPU graphs) computes SmolLM2's projections 1.5-2x faster and
its 49,152-row LM head 4x faster, at a batch of 16 rows, and still 1.3-1.7x at 64 rows.

`pack_linears(model)` turns every `nn.Linear` of a model into a `PackedLinear` in place: the same
module (same parameters, names, hooks and tied weights), plus a packed copy of its weight. The packed
kernel runs only inside `serving(True)`, which an engine that packed the model enters around its
forwards, and only for inputs that need no gradient; everything else (a training job's backward, a test's no-cache reference)
runs the module's own dense `linear`, unchanged. The packed copy costs the weights' size once more
in host memory.

oneDNN sums in another order than MKL, so logits differ in the last bits (float32); greedy outputs
equal the dense path's on the test suite's models, and BENCHMARKS.md says how they compare on the
default model.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_SERVING: contextvars.ContextVar[bool] = contextvars.ContextVar("softprompt_packed_serving", default=False)
# The batch size oneDNN is told to expect when it chooses the packed layout: the decode steps' rows.
_PACKED_FOR_ROWS = 16


class PackedLinear(nn.Linear):
    """An `nn.Linear` that also holds its weight in oneDNN's packed layout, used while serving."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The packed kernel inside `serving(True)` for inputs that need no gradient; else the dense `linear`."""
        if not _SERVING.get() or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed weights serve this device and dtype: a CPU with oneDNN, float32."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Makes every `nn.Linear` of `model` a `PackedLinear` in place (idempotent); returns how many it packed."""
    packed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
            module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), _PACKED_FOR_ROWS)
            packed += 1
    log.info("packed the weights of %d linear layers for oneDNN", packed)
    return packed


@contextlib.contextmanager
def serving(packed: bool) -> Iterator[None]:
    """Packed linears use their packed weights inside this block if `packed` (in this thread or task only)."""
    token = _SERVING.set(packed)
    try:
        yield
    finally:
        _SERVING.reset(token)
