"""The startup exactness probe: the engine, run on the loaded model, against the model's own no-cache forward.

The static checks in `support.py` refuse what is known not to work; this catches what nobody knew
about a model (a forward that numbers positions itself, a cache it updates its own way, a mask it
rebuilds) by trying the serving paths once. Two rows of different lengths, one behind a soft prompt
of three virtual tokens (so its cached prefix, its padding and the gap between them all occur), are
prefilled together and decoded greedily for a few tokens at the padded shapes CUDA graphs use. At
every token the logits must be those of the reference, the full forward over `[prompt ; input ;
tokens so far]` without a cache; Classify's path (right padding over the prompt's cached prefix)
must give the tokens the reference's log-probabilities.

Logits are compared at the output embedding (a forward hook), before any soft-capping or scaling
a model applies after it, up to a tolerance for rounding relative to the largest logit. Comparing
logits rather than tokens matters: a greedy token often survives a wrong position.
"""

from __future__ import annotations

import torch

from softprompt.server.core.engine import Engine, ScoreRow, Sequence
from softprompt.server.core.model import BaseModel
from softprompt.prompts.options import DecodingOptions

TOKENS = 3  # greedy tokens per row: the prefill's and two decode steps'
_VIRTUAL_TOKENS = 3
_KEY = ("startup probe", 1, "")
_PREFIX_CACHE_BYTES = 64 << 20
# The probe's few short rows need little KV; a small pool leaves the device memory to the server's own,
# which is sized from what is free after the probe.
_KV_CACHE_BYTES = 64 << 20
_TEXTS = ("The quick brown fox jumps over the lazy dog.", "Hello")
# Differences that count as rounding, relative to the largest logit: float32 paths differ by ~1e-6 of
# it; bfloat16 keeps 8 bits of mantissa. Wrong positions or masks move logits by a good part of it.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@torch.inference_mode()
def mismatch(base: BaseModel) -> str | None:
    """Runs the probe; returns what disagreed with the reference, or None when everything matched.

    Exceptions from the model propagate: a model the engine's forwards break is not servable either.
    """
    head = base.model.get_output_embeddings()
    if head is None:
        return "the model has no output embedding (get_output_embeddings) whose logits the probe can compare"
    outputs: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, _inputs, out: outputs.append(out.detach().float()))
    try:
        return _run(base, outputs)
    finally:
        hook.remove()


def _run(base: BaseModel, outputs: list[torch.Tensor]) -> str | None:
    """The probe, with every forward's output-embedding logits appended to `outputs` as it runs."""
    inputs = [list(base.tokenizer(text).input_ids) for text in _TEXTS]
    embed = base.model.get_input_embeddings()
    # A prompt made of real token embeddings: its scale is that of what the model was trained on.
    prompt = embed(torch.tensor(inputs[0][:_VIRTUAL_TOKENS], device=base.device)).detach()
    prompts, keys = [None, prompt], [None, _KEY]
    # Scoring reuses the prefix the prefill cached under `keys`: one forward fewer.
    engine = Engine(base, prefix_cache_bytes=_PREFIX_CACHE_BYTES, cuda_graphs=False, pad_shapes=True, ignore_eos=True,
                    kv_cache_bytes=_KV_CACHE_BYTES)
    rows = [Sequence(row, ids, DecodingOptions(max_new_tokens=TOKENS), prompt=p, prompt_key=k)
            for row, (ids, p, k) in enumerate(zip(inputs, prompts, keys))]
    for seq in rows:
        engine.start(seq)
    batch, _ = engine.prefill(rows)
    # The prefill's last positions: [1, rows, vocab] of a ragged forward (its wanted positions only), else
    # [rows, 1, vocab] of the padded one.
    steps = [outputs[-1][0] if engine.fuses_steps else outputs[-1][:, -1]]
    for _ in range(TOKENS - 1):
        engine.decode(batch)
        steps.append(outputs[-1][:len(rows), -1])  # decode steps run padded rows too
    served = torch.stack(steps, dim=1)
    tolerance = _TOLERANCE.get(base.dtype, _TOLERANCE[torch.bfloat16])
    references = []
    for row, (p, seq) in enumerate(zip(prompts, rows)):
        references.append(_reference_logits(base, p, seq.input_ids, seq.generated, outputs))
        expected = references[-1]
        differs = (served[row] - expected).abs().amax(-1)  # per token
        bound = tolerance * max(1.0, float(expected.abs().max()))
        if float(differs.max()) > bound:
            step = int(differs.argmax())
            return (f"{_describe(seq)}: the logits of greedy token {step + 1} differ from the model's own forward "
                    f"(no KV cache) by up to {float(differs[step]):.3g} (tolerance {bound:.3g})")
    scores = engine.score([ScoreRow(p, k, seq.input_ids, seq.generated) for p, k, seq in zip(prompts, keys, rows)])
    for seq, logits, score in zip(rows, references, scores):
        picked = torch.tensor(seq.generated, device=logits.device)[:, None]
        expected = float(logits.log_softmax(-1).gather(-1, picked).sum())
        if abs(score - expected) > tolerance * max(1.0, abs(expected)):
            return (f"{_describe(seq)}: Classify's scoring gave its {TOKENS} tokens a log-probability of {score:.4g}, "
                    f"the model's own forward {expected:.4g}")
    return None


def _reference_logits(base: BaseModel, prompt: torch.Tensor | None, input_ids: list[int], generated: list[int],
                      outputs: list[torch.Tensor]) -> torch.Tensor:
    """Output-embedding logits [len(generated), vocab] of the no-cache forward, teacher-forced: row i is
    where generated[i] was chosen."""
    embed = base.model.get_input_embeddings()
    x = embed(torch.tensor([[*input_ids, *generated[:-1]]], device=base.device))
    if prompt is not None:
        x = torch.cat([prompt[None].to(x.dtype), x], dim=1)
    base.model(inputs_embeds=x, use_cache=False)
    return outputs[-1][0, -len(generated):]


def _describe(seq: Sequence) -> str:
    prompt = f"{seq.num_virtual_tokens} virtual + " if seq.num_virtual_tokens else ""
    return f"probe row {seq.request_id} ({prompt}{len(seq.input_ids)} input tokens)"
