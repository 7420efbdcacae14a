"""The one place that puts each row's soft prompt in front of its input: used by training and serving.

A row's model input is `[prompt ; tokens]`. Rows are padded to a common width and positions count
real positions only (`cumsum(mask) - 1`), so a row computes what it would compute alone whatever
shares its batch. Serving pads on the left (new tokens are appended on the right); training and
scoring pad on the right, where no query position is fully masked (which keeps gradients finite).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LEFT = "left"
RIGHT = "right"


@dataclass
class Inputs:
    """A padded batch ready for `model(inputs_embeds=..., attention_mask=..., position_ids=...)`."""

    embeds: torch.Tensor  # [batch, width, hidden]
    attention_mask: torch.Tensor  # [batch, width], 1 at real positions
    position_ids: torch.Tensor  # [batch, width]
    starts: list[int]  # column of each row's first real position (its first virtual token, if any)


def build_inputs(
    embedding: torch.nn.Module,
    prompts: Sequence[torch.Tensor | None],
    token_ids: Sequence[Sequence[int]],
    *,
    padding: str = LEFT,
) -> Inputs:
    """Embeds each row's tokens, prepends its prompt (cast to the embedding dtype) and pads the batch.

    Gradients flow into prompts that require them, so the trainer learns through exactly this code.
    """
    if len(prompts) != len(token_ids):
        raise ValueError(f"{len(prompts)} prompts for {len(token_ids)} rows")
    weight = embedding.weight
    lengths = [(0 if p is None else int(p.shape[0])) + len(ids) for p, ids in zip(prompts, token_ids)]
    width = max(lengths)
    rows, masks, starts = [], [], []
    for prompt, ids, length in zip(prompts, token_ids, lengths):
        parts = []
        if prompt is not None:
            parts.append(prompt.to(device=weight.device, dtype=weight.dtype))
        if ids:
            parts.append(embedding(torch.tensor(list(ids), device=weight.device)))
        pad = weight.new_zeros(width - length, weight.shape[1])
        start = width - length if padding == LEFT else 0
        rows.append(torch.cat([pad, *parts] if padding == LEFT else [*parts, pad]))
        mask = torch.zeros(width, dtype=torch.long, device=weight.device)
        mask[start:start + length] = 1
        masks.append(mask)
        starts.append(start)
    attention_mask = torch.stack(masks)
    return Inputs(
        embeds=torch.stack(rows),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
        starts=starts,
    )


@dataclass
class Continuations:
    """Per-token results of scoring continuations, each `[batch, longest continuation]`."""

    logprobs: torch.Tensor  # float32 log-probability of each continuation token
    mask: torch.Tensor  # 1 at real tokens, 0 at padding
    greedy: torch.Tensor  # True where the token is the model's most likely next token

    def totals(self) -> torch.Tensor:
        """Each row's total log-probability."""
        return (self.logprobs * self.mask).sum(-1)

    def greedy_rows(self) -> torch.Tensor:
        """Rows whose every token is the argmax: greedy decoding would produce exactly this continuation."""
        return (self.greedy | (self.mask == 0)).all(-1)


def score_continuations(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor | None],
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
) -> Continuations:
    """Scores each row's continuation tokens given `[prompt ; context]`, in one teacher-forced forward.

    The loss of training, the label scores of Classify and exact-match evaluation all come from
    here. Each row needs at least one position (prompt or context) before its continuation.
    """
    for p, ctx in zip(prompts, contexts):
        if (p is None or p.shape[0] == 0) and not ctx:
            raise ValueError("a continuation needs a prompt or context tokens in front of it")
    inputs = build_inputs(
        model.get_input_embeddings(), prompts, [[*c, *t] for c, t in zip(contexts, continuations)], padding=RIGHT
    )
    out = model(
        inputs_embeds=inputs.embeds,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        use_cache=False,
    )
    firsts = [(0 if p is None else int(p.shape[0])) + len(ctx) - 1 for p, ctx in zip(prompts, contexts)]
    return gather_continuations(out.logits, firsts, continuations)


def gather_continuations(logits: torch.Tensor, firsts: Sequence[int],
                         continuations: Sequence[Sequence[int]]) -> Continuations:
    """Scores from teacher-forced `logits` [rows, columns, vocab] of right-padded rows, where column
    `firsts[row]` predicts the row's first continuation token."""
    longest = max(len(t) for t in continuations)
    rows, cols, targets = [], [], []
    mask = torch.zeros(len(continuations), longest, dtype=torch.bool)
    for row, (first, cont) in enumerate(zip(firsts, continuations)):
        for j, token in enumerate(cont):
            rows.append(row)
            cols.append(first + j)
            targets.append(token)
            mask[row, j] = True
    device = logits.device
    mask = mask.to(device)
    picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
    tokens = torch.tensor(targets, device=device)
    logprobs = torch.zeros(len(continuations), longest, device=device)
    logprobs[mask] = picked.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    greedy = torch.zeros(len(continuations), longest, dtype=torch.bool, device=device)
    greedy[mask] = picked.argmax(-1) == tokens
    return Continuations(logprobs, mask.float(), greedy)
