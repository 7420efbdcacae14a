"""Every model family the engine serves, against the model's own forward without a KV cache.

Each family is a tiny random model built from its config (the tiny tokenizer's vocabulary), run
with sdpa and eager attention. Sliding windows are 6 tokens, far shorter than the rows (up to 46
positions, soft prompts of 9 virtual tokens), and families with both kinds of layers get both. Rows
with different prompts, no prompt and different lengths share batches, join and leave mid-generation,
and decode at the bucketed shapes CUDA graphs use. `server/core/families.py` lists exactly the
families verified here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import (TEXTS, engine_prompts, engine_rows, make_prefix_adapter, peft_greedy, peft_ready, reference_greedy,
                     run_to_end, torch_threads)
from softprompt.prompts.base import spec_of
from softprompt.prompts.inject import score_continuations
from softprompt.server.core.engine import Engine, ScoreRow, Sequence
from softprompt.server.core.families import SUPPORTED_ATTENTION, TESTED_MODEL_TYPES
from softprompt.server.core.masks import MaskLayout
from softprompt.server.core.model import BaseModel
from softprompt.prompts.options import DecodingOptions

WINDOW = 6
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
_MIXED = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
_QWEN_MIXED = dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# model_type -> (config overrides, how its layers attend: "full", "sliding" (all) or "mixed").
FAMILIES: dict[str, tuple[dict, str]] = {
    "llama": ({}, "full"),
    "gpt2": ({}, "full"),
    "opt": (dict(ffn_dim=128, word_embed_proj_dim=64), "full"),
    "gpt_neox": ({}, "full"),
    "falcon": (dict(new_decoder_architecture=True, num_kv_heads=2), "full"),
    "gptj": (dict(rotary_dim=8), "full"),
    "codegen": (dict(rotary_dim=8), "full"),
    "gpt_bigcode": ({}, "full"),
    "gemma": (dict(head_dim=16), "full"),
    "phi": ({}, "full"),
    "stablelm": ({}, "full"),
    "olmo": ({}, "full"),
    "olmo2": ({}, "full"),
    "granite": ({}, "full"),
    "granitemoe": (dict(num_local_experts=4, num_experts_per_tok=2), "full"),
    "cohere": ({}, "full"),
    "smollm3": ({}, "full"),
    "qwen3_moe": (dict(head_dim=16, **_MOE), "full"),
    "mistral": (dict(sliding_window=WINDOW), "sliding"),
    "mixtral": (dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2), "sliding"),
    "phi3": (dict(sliding_window=WINDOW), "sliding"),
    "starcoder2": (dict(sliding_window=WINDOW), "sliding"),
    # Layers 1 and 2 slide (layer >= max_window_layers), layer 0 attends to everything.
    "qwen2": (_QWEN_MIXED, "mixed"),
    "qwen3": (dict(head_dim=16, **_QWEN_MIXED), "mixed"),
    # Every other layer below max_window_layers slides.
    "qwen2_moe": (dict(_QWEN_MIXED, max_window_layers=3, shared_expert_intermediate_size=32, **_MOE), "mixed"),
    "gemma2": (dict(head_dim=16, sliding_window=WINDOW), "mixed"),  # layer 0 slides, layer 1 is full
    "gemma3_text": (dict(head_dim=16, **_MIXED), "mixed"),
    "cohere2": (_MIXED, "mixed"),
    "olmo3": (_MIXED, "mixed"),
    "exaone4": (_MIXED, "mixed"),
}
# transformers builds Gemma 2 with eager attention only (its attention soft-capping has no sdpa path).
_EAGER_ONLY = {"gemma2"}
CASES = [(family, impl) for family in FAMILIES for impl in SUPPORTED_ATTENTION
         if impl == "eager" or family not in _EAGER_ONLY]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@functools.cache
def _weights(family: str, token_ids: tuple[int, int, int, int]) -> dict[str, torch.Tensor]:
    """One set of random weights per family, shared by its sdpa and eager models."""
    return _build(family, token_ids, "eager").state_dict()


def _build(family: str, token_ids: tuple[int, int, int, int], impl: str) -> torch.nn.Module:
    vocab, bos, eos, pad = token_ids
    overrides, _ = FAMILIES[family]
    config = AutoConfig.for_model(family, **{**_COMMON, **overrides}, vocab_size=vocab, bos_token_id=bos,
                                  eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    # Larger-than-default weights make the logits peaked, so greedy choices are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval().requires_grad_(False)


def family_base(family: str, impl: str, tiny_base) -> BaseModel:
    """The family's tiny model with the given attention, held as the server holds a base model."""
    tok = tiny_base.tokenizer
    token_ids = (len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = _build(family, token_ids, impl)
    model.load_state_dict(_weights(family, token_ids))
    return BaseModel(model, tok, spec_of(model, family), torch.device("cpu"), torch.float32)


def _check(base: BaseModel, rows: list[Sequence]) -> None:
    for seq in rows:
        expected = reference_greedy(base.model, seq.prompt, seq.input_ids, len(seq.generated), ())
        assert seq.generated == expected, f"row {seq.request_id} differs from the no-cache reference"


def test_the_tested_list_is_the_matrix():
    assert set(FAMILIES) == TESTED_MODEL_TYPES


def _mixed_batches(base: BaseModel) -> None:
    """Rows of three kinds join a running batch, one leaves from the middle, more join; all match the reference."""
    engine = Engine(base, pad_shapes=True, ignore_eos=True)  # every row runs to its length: more steps
    rows = engine_rows(engine, base, 7)
    batch, _ = engine.prefill(rows[:3])
    for _ in range(3):
        engine.decode(batch)
    batch = engine.concatenate([batch, engine.prefill(rows[3:5])[0]])  # joiners, longer than the batch
    engine.decode(batch)
    batch = engine.filter(batch, [0, 2, 3, 4])
    batch = _join(engine, batch, rows[5:])
    run_to_end(engine, batch)
    assert max(s.length + len(s.generated) for s in rows) > 5 * WINDOW
    _check(base, rows)


def _join(engine: Engine, batch, rows: list[Sequence]):
    """The batch with `rows` prefilled into it: in the forward of its next decode step where the engine runs
    mixed steps (the paged kernel's ragged forwards), else prefilled apart."""
    if engine.fuses_steps:
        return engine.step(batch, rows)[0]
    return engine.concatenate([batch, engine.prefill(rows)[0]])


def test_the_readme_lists_every_tested_family():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    names = section.split("`server/core/families.py`):", 1)[1].split("\n\n", 1)[0]
    listed = {name.strip(" .\n") for name in names.split(",")}
    assert listed == set(TESTED_MODEL_TYPES)


@pytest.mark.parametrize("family,impl", CASES)
def test_mixed_batches_match_the_reference(family, impl, tiny_base):
    base = family_base(family, impl, tiny_base)
    layout = MaskLayout.of(base.model)
    assert (layout.window, layout.per_layer_type) == {
        "full": (None, False), "sliding": (WINDOW, False), "mixed": (WINDOW, True)}[FAMILIES[family][1]]
    _mixed_batches(base)


def test_layer_types_a_family_does_not_take_are_ignored(tiny_base):
    """A Mistral checkpoint carrying `layer_types` still slides on every layer, as Mistral's modeling code does."""
    base = family_base("mistral", "sdpa", tiny_base)
    base.model.config.layer_types = ["sliding_attention", "full_attention"]
    layers = base.model.config.num_hidden_layers
    assert MaskLayout.of(base.model) == MaskLayout(WINDOW, per_layer_type=False, dtype=None,
                                                   layer_windows=(WINDOW,) * layers)
    _mixed_batches(base)


@pytest.mark.parametrize("impl", SUPPORTED_ATTENTION)
def test_cached_prefixes_of_a_sliding_family_match_the_reference(impl, tiny_base):
    """A prompt longer than the window, its prefix computed with another's, then read from the cache."""
    base = family_base("qwen2", impl, tiny_base)
    engine = Engine(base, prefix_cache_bytes=1 << 20, ignore_eos=True)
    prompts = engine_prompts(base)
    keys = [None, ("five", 1, "a"), ("nine", 1, "b")]
    for round_ in range(2):
        rows = []
        for i, text in enumerate([TEXTS[2], "", TEXTS[0], TEXTS[1] * 3]):
            seq = Sequence(request_id=i, input_ids=base.tokenizer(text).input_ids if text else [],
                           params=DecodingOptions(max_new_tokens=8), prompt=prompts[i % 3], prompt_key=keys[i % 3])
            engine.start(seq)
            rows.append(seq)
        run_to_end(engine, engine.prefill(rows)[0])
        _check(base, rows)
    # Round one misses both prompts (computed together, left-padded); round two hits them.
    assert (engine.prefixes.misses, engine.prefixes.hits) == (2, 2)


@pytest.mark.parametrize("family,impl", CASES)
def test_scoring_equals_each_row_alone(family, impl, tiny_base):
    """Classify's path (left padding over cached prefixes, logits at the scored positions only) and training's
    (right padding) score each row as its own unpadded forward does, rows padded by more than the window
    included, final soft-capping and logit scales applied."""
    base = family_base(family, impl, tiny_base)
    engine = Engine(base, prefix_cache_bytes=1 << 20)
    prompts = engine_prompts(base)
    tok = base.tokenizer
    rows = [(1, tok(TEXTS[2] * 2).input_ids, tok(" great film").input_ids),
            (0, tok("hi").input_ids, tok(" awful").input_ids),
            (2, tok(TEXTS[0]).input_ids, tok(" a slow, long and boring film").input_ids),
            (2, [], tok("neutral").input_ids)]
    alone = [float(score_continuations(base.model, [prompts[p]], [c], [t]).totals()[0]) for p, c, t in rows]
    args = ([prompts[p] for p, _, _ in rows], [c for _, c, _ in rows], [t for _, _, t in rows])
    keys = [None if p == 0 else (str(p), 1, "x") for p, _, _ in rows]
    assert score_continuations(base.model, *args).totals().tolist() == pytest.approx(alone, abs=1e-4)
    assert engine.score([ScoreRow(*row) for row in zip(args[0], keys, args[1], args[2])]) == pytest.approx(alone, abs=1e-4)


# One attention implementation per family for prefix rows: what differs between implementations (attention over
# the blocks) is the same for every row and checked with both by test_mixed_batches_match_the_reference.
PREFIX_CASES = [(family, "eager" if family in _EAGER_ONLY else "sdpa") for family in FAMILIES]


@pytest.mark.parametrize("family,impl", PREFIX_CASES)
def test_prefix_tuned_rows_match_peft(family, impl, tiny_base, tmp_path):
    """Issue 21: rows behind PEFT prefix-tuning adapters (keys and values written into their blocks, no forward
    for them; 9 virtual tokens, longer than the sliding window) share batches with prompt-tuned and bare rows,
    join and leave, and give what PEFT's own PeftModel forward gives, token for token."""
    import copy

    from peft import PeftModel

    from softprompt.prompts.format.uploads import parse_peft_adapter
    from softprompt.server.core.virtual import KvPrefix

    base = family_base(family, impl, tiny_base)
    folders = [make_prefix_adapter(base.model, tmp_path / f"p{i}", num_virtual_tokens=9, seed=i) for i in (1, 2)]
    # PEFT wraps copies, made before the engine packs the model's weights.
    references = [PeftModel.from_pretrained(peft_ready(copy.deepcopy(base.model)), f).eval() for f in folders]
    engine = Engine(base, pad_shapes=True, ignore_eos=True)
    prefixes = []
    for folder in folders:
        parsed = parse_peft_adapter((folder / "adapter_config.json").read_text(),
                                    (folder / "adapter_model.safetensors").read_bytes(), base.spec,
                                    max_virtual_tokens=32)
        assert parsed.method == "prefix"
        prefixes.append(KvPrefix.of(parsed.embeddings.to(base.dtype), engine.pool.layers))
    prompts = [prefixes[0], *engine_prompts(base)[1:], prefixes[1], None]
    rows = []
    for i in range(7):
        seq = Sequence(request_id=i, input_ids=base.tokenizer(TEXTS[i % 4] * (1 + i % 2)).input_ids,
                       params=DecodingOptions(max_new_tokens=10 + i), prompt=prompts[i % 5])
        engine.start(seq)
        rows.append(seq)
    batch, _ = engine.prefill(rows[:3])
    engine.decode(batch)
    batch = engine.concatenate([batch, engine.prefill(rows[3:5])[0]])
    batch = engine.filter(batch, [0, 2, 3, 4])
    batch = _join(engine, batch, rows[5:])
    run_to_end(engine, batch)
    for i, peft_model in enumerate(references):
        for seq in rows:
            if seq.prompt is prefixes[i]:
                assert seq.generated == peft_greedy(peft_model, seq.input_ids, len(seq.generated)), \
                    f"prefix-tuned row {seq.request_id} differs from PEFT"
    for seq in rows:
        if not isinstance(seq.prompt, KvPrefix):
            assert seq.generated == reference_greedy(base.model, seq.prompt, seq.input_ids, len(seq.generated), ())
