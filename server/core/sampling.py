"""Chooses each row's next token from its logits: greedy rows by argmax, sampled rows all together.

A sampled row's scores are its float32 logits divided by its temperature; top-k then keeps the tokens
scoring at least its k-th best (ties with the k-th included), and top-p keeps, of those, the most likely
tokens until the ones before the next reach probability top_p (the first always stays), plus every
token tied with the least likely one kept, so that the kept set never depends on how a sort orders
ties. `top_k` 0 and `top_p` 0 or 1 mean off. The token is then drawn from the kept tokens' renormalized
probabilities by inverse transform: one uniform number per row, located in the float64 cumulative sum
of the kept weights in token-id order.

One uniform per row (rather than one number per vocabulary entry, as the exponential race needs) keeps
the draw cheap on a CPU, and lets a seeded row draw from its own generator: it samples the same tokens
whatever shares its batch, since every other operation works on each row separately and the kept set
depends on score values alone. Unseeded rows draw together from one generator that their engine seeds
from the operating system.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from softprompt.prompts.options import DecodingOptions

# A temperature that rounds to float32 zero would divide 0 by 0 at the row's best token.
_SMALLEST_TEMPERATURE = torch.finfo(torch.float32).tiny


def seeded_generator(params: DecodingOptions, device: torch.device) -> torch.Generator | None:
    """A seeded sampled row's own generator, so that it samples the same tokens whatever shares its batch;
    None for greedy and unseeded rows."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def unseeded_generator(device: torch.device) -> torch.Generator:
    """The generator that unseeded rows share, seeded from the operating system (so that no global
    `torch.manual_seed` makes them repeat)."""
    gen = torch.Generator(device=device)
    gen.seed()
    return gen


class _Filter(NamedTuple):
    """How a batch's sampled rows filter, for one vocabulary size."""

    width: int  # best scores sorted per row: 0 (no row filters), the largest k, or the whole vocabulary
    kth: torch.Tensor  # [rows, 1] int64: each row's k-th best index into the sorted scores
    k_off: torch.Tensor  # [rows, 1] bool: rows without top-k
    p_off: torch.Tensor  # [rows, 1] bool: rows without top-p


class RowSampler:
    """Picks the next token of every row of a batch; built once per batch composition.

    `generators[i]` is row i's own generator (seeded rows) or None (greedy rows, and unseeded rows,
    which draw from `unseeded`). The per-row parameters become tensors here, once, so that a step
    launches the same few kernels whatever the batch size and never waits for the device.
    """

    def __init__(self, params: Sequence[DecodingOptions], generators: Sequence[torch.Generator | None],
                 unseeded: torch.Generator, device: torch.device) -> None:
        if len(params) != len(generators):
            raise ValueError(f"{len(params)} rows of parameters but {len(generators)} generators")
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        chosen = [params[i] for i in sampled]
        self.rows = len(params)
        self.device = device
        self._count = len(sampled)
        # Where sampled rows sit among all rows; None when every row is sampled (no gather needed).
        self._index = torch.tensor(sampled, device=device) if 0 < len(sampled) < len(params) else None
        self._temperature = torch.tensor([[max(p.temperature, _SMALLEST_TEMPERATURE)] for p in chosen],
                                         dtype=torch.float32, device=device)
        self._top_k = [p.top_k for p in chosen]
        self._top_p_rows = [p.top_p_on for p in chosen]
        self._any_top_p = any(self._top_p_rows)
        # Compared with unnormalized float64 cumulative weights; rows without top-p never reach it.
        self._top_p = torch.tensor([[p.top_p if p.top_p_on else float("inf")] for p in chosen],
                                   dtype=torch.float64, device=device)
        self._filter: tuple[int, _Filter] | None = None
        self._generators = [generators[i] for i in sampled]
        seeded = [j for j, g in enumerate(self._generators) if g is not None]
        self._seeded = seeded
        self._seeded_index = torch.tensor(seeded, device=device) if 0 < len(seeded) < len(chosen) else None
        self._unseeded = unseeded if len(seeded) < len(chosen) else None

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """One token id per row of float32 `logits` [rows, vocab] (int64, on the logits' device)."""
        if logits.dim() != 2 or logits.shape[0] != self.rows:
            raise ValueError(f"expected logits of shape [{self.rows}, vocab], got {list(logits.shape)}")
        if not self._count:
            return logits.argmax(dim=-1)
        if self._index is None:
            return self._sample(logits)
        sampled = self._sample(logits.index_select(0, self._index))
        return logits.argmax(dim=-1).index_copy_(0, self._index, sampled)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        # Shifting by the max first keeps a tiny temperature from overflowing to inf - inf = NaN; the
        # probabilities are unchanged by the shift, and the best token's score is exactly 0.
        scores = (logits - logits.amax(dim=-1, keepdim=True)).div_(self._temperature)
        weights = scores.exp()
        floor = self._floor(scores)
        if floor is not None:
            weights.masked_fill_(scores < floor, 0.0)
        cumulative = weights.cumsum(dim=-1, dtype=torch.float64)
        total = cumulative[:, -1:]
        # Strictly below the total, so that the token found always has a weight.
        target = torch.minimum(self._uniforms() * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cumulative, target, right=True).view(-1)

    def _floor(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Each row's lowest kept score [rows, 1] after top-k and top-p; None when no row filters."""
        f = self._filter_for(scores.shape[-1])
        if f.width == 0:
            return None
        # Sorted values only: which of several tied tokens comes first does not matter to a value.
        if f.width == scores.shape[-1]:
            best = scores.sort(dim=-1, descending=True).values
        else:
            best = scores.topk(f.width, dim=-1).values
        kth = best.gather(1, f.kth).masked_fill_(f.k_off, float("-inf"))
        if not self._any_top_p:
            return kth
        weights = best.exp().masked_fill_(best < kth, 0.0)
        cumulative = weights.cumsum(dim=-1, dtype=torch.float64)
        total = cumulative[:, -1:]
        if f.width < scores.shape[-1]:
            # Tokens tied with the k-th best beyond the `width` sorted ones are kept by top-k too.
            beyond = (scores >= kth).sum(dim=-1, keepdim=True) - (best >= kth).sum(dim=-1, keepdim=True)
            total = total + beyond * kth.double().exp()
        # A token goes once the kept tokens before it reach top_p: the drops are a suffix of `best`.
        drop = (cumulative - weights >= self._top_p * total) | (best < kth)
        nucleus = best.gather(1, (~drop).sum(dim=-1, keepdim=True) - 1)
        return torch.where(f.p_off, kth, nucleus)

    def _filter_for(self, vocab: int) -> _Filter:
        """The rows' filtering for this vocabulary size, computed on the first step (k >= vocab is off)."""
        if self._filter is not None and self._filter[0] == vocab:
            return self._filter[1]
        ks = [k if 0 < k < vocab else 0 for k in self._top_k]
        if any(p and k == 0 for p, k in zip(self._top_p_rows, ks)):
            width = vocab  # top-p over every token
        else:
            width = max(ks, default=0)
        f = _Filter(width=width,
                    kth=torch.tensor([[(k or width or 1) - 1] for k in ks], device=self.device),
                    k_off=torch.tensor([[k == 0] for k in ks], device=self.device),
                    p_off=torch.tensor([[not p] for p in self._top_p_rows], device=self.device))
        self._filter = (vocab, f)
        return f

    def _uniforms(self) -> torch.Tensor:
        """One float64 uniform in [0, 1) per sampled row [rows, 1]; seeded rows draw from their own generators."""
        own = [torch.rand(1, dtype=torch.float64, generator=self._generators[j], device=self.device)
               for j in self._seeded]
        if self._unseeded is None:
            return torch.cat(own).view(self._count, 1)
        draws = torch.rand(self._count, 1, dtype=torch.float64, generator=self._unseeded, device=self.device)
        if own:
            draws.index_copy_(0, self._seeded_index, torch.cat(own).view(-1, 1))
        return draws
