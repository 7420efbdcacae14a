"""Startup refusal of models the engine cannot serve exactly (`server/core/support.py`, `probe.py`).

Models are tiny real transformers models built from configs with the tiny test tokenizer. Refused:
ALiBi families, attention kernels other than sdpa and eager, rotary scaling computed from the batch's
positions, untested families (unless allowed, and then only if the exactness probe passes), models
without an end-of-sequence id, bidirectional attention, a tokenizer larger than the embedding.
Accepted rotary types are checked to be exact, and the probe to catch a model that is not. Last,
`softprompt serve` on a tiny Bloom folder exits non-zero with the reasons and never listens.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import torch_threads
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from softprompt.prompts.base import spec_of
from softprompt.server.config import ServerConfig
from softprompt.server.core import probe
from softprompt.server.core.errors import UnsupportedModelError
from softprompt.server.core.families import TESTED_MODEL_TYPES
from softprompt.server.core.model import BaseModel
from softprompt.server.core.support import check_servable

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
_LLAMA = dict(_SMALL, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _peaked(model: torch.nn.Module) -> torch.nn.Module:
    # Larger-than-default weights make logits peaked (as a trained model's are), so wrong positions show.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.eval()


def _tiny(tokenizer, model_type: str, attn_implementation: str | None = None, **config) -> BaseModel:
    values = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **config)
    torch.manual_seed(0)
    kernel = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = _peaked(AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values), **kernel))
    return _base(model, tokenizer)


def _base(model: torch.nn.Module, tokenizer) -> BaseModel:
    return BaseModel(model, tokenizer, spec_of(model, "tiny"), torch.device("cpu"), torch.float32)


def _refusal(base: BaseModel, *, allow_untested: bool = False) -> str:
    with pytest.raises(UnsupportedModelError) as caught:
        check_servable(base, allow_untested=allow_untested)
    return str(caught.value)


@pytest.mark.parametrize("model_type, config", [
    ("bloom", dict(n_layer=2, n_head=4, hidden_size=32)),
    ("mpt", dict(d_model=32, n_layers=2, n_heads=4)),
    ("falcon", dict(_SMALL, alibi=True)),
])
def test_alibi_models_are_refused_with_the_reason(tokenizer, model_type, config) -> None:
    message = _refusal(_tiny(tokenizer, model_type, **config))
    assert f"cannot serve tiny (model type '{model_type}') exactly" in message
    assert "ALiBi" in message
    if model_type != "falcon":  # Bloom and MPT also take no position ids; Falcon does
        assert "takes no position_ids" in message


def test_flex_attention_is_refused_naming_sdpa_and_eager(tokenizer) -> None:
    message = _refusal(_tiny(tokenizer, "llama", attn_implementation="flex_attention", **_LLAMA))
    assert "attention implementation 'flex_attention'" in message
    assert "sdpa, eager" in message and "--attn-implementation" in message


def test_flash_attention_is_refused(tokenizer) -> None:
    base = _tiny(tokenizer, "llama", **_LLAMA)
    # flash-attn is not installed: the kernel cannot load, so the model says it uses it, as a loaded one would.
    base.model.config._attn_implementation = "flash_attention_2"
    assert "attention implementation 'flash_attention_2'" in _refusal(base)


def test_eager_attention_is_accepted_and_loaded_when_asked(tiny_model_dir) -> None:
    from softprompt.server.app.loading import load_base_model

    base = load_base_model(str(tiny_model_dir), device="cpu", attn_implementation="eager")
    assert base.model.config._attn_implementation == "eager"
    check_servable(base)


def test_settings_refuse_other_attention_before_loading() -> None:
    with pytest.raises(ValueError, match="attn_implementation must be one of sdpa, eager, got 'flash_attention_2'"):
        ServerConfig(attn_implementation="flash_attention_2")


# head_dim 8: four rotary frequencies.
_LONGROPE = dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[4.0] * 4, rope_theta=10000.0)


@pytest.mark.parametrize("rope, reason, inexact", [
    # Exact up to max_position_embeddings, but a host-side check in every forward defeats CUDA graphs.
    (dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0), "rope_type 'dynamic'", False),
    # The probe's long row passes 32 positions: the short row would get the long factors too.
    (dict(_LONGROPE, original_max_position_embeddings=32), "original_max_position_embeddings (32)", True),
], ids=["dynamic", "longrope"])
def test_rope_computed_from_the_batch_is_refused(tokenizer, rope, reason, inexact) -> None:
    base = _tiny(tokenizer, "llama", rope_parameters=rope, **_LLAMA)
    message = _refusal(base)
    assert reason in message and "config.json" in message
    assert (probe.mismatch(base) is not None) == inexact


@pytest.mark.parametrize("rope", [
    dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=16, rope_theta=10000.0),
    dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=32, rope_theta=10000.0),
    # Never past its original length within max_position_embeddings: its short factors only.
    dict(_LONGROPE, original_max_position_embeddings=64),
], ids=["linear", "llama3", "yarn", "longrope-short-only"])
def test_static_rope_is_accepted_and_served_exactly(tokenizer, rope) -> None:
    base = _tiny(tokenizer, "llama", rope_parameters=rope, **_LLAMA)
    check_servable(base)
    assert probe.mismatch(base) is None


def test_an_untested_family_is_refused_with_the_tested_list(tokenizer) -> None:
    base = _tiny(tokenizer, "helium", head_dim=8, **_LLAMA)
    message = _refusal(base)
    assert "model type 'helium' is not among the families the test suite verifies" in message
    assert ", ".join(sorted(TESTED_MODEL_TYPES)) in message
    assert "--allow-untested-model" in message
    check_servable(base, allow_untested=True)  # it passes the exactness probe


class _PositionBlindConfig(LlamaConfig):
    model_type = "position_blind_llama"


# transformers 5.24 calls the cache `cache`, earlier 5.x releases `past_key_values`.
_CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


class _PositionBlindLlama(LlamaForCausalLM):
    """A model that takes position ids but numbers positions itself, by column: padding shifts them."""

    config_class = _PositionBlindConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, logits_to_keep=0, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               logits_to_keep=logits_to_keep, **{_CACHE: past_key_values}, **kwargs)


def test_the_probe_refuses_an_allowed_model_the_engine_gets_wrong(tokenizer) -> None:
    torch.manual_seed(0)
    config = _PositionBlindConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **_LLAMA)
    base = _base(_peaked(_PositionBlindLlama(config)), tokenizer)
    message = _refusal(base, allow_untested=True)
    assert "the startup exactness probe found the engine's output differs from the model's own: probe row" in message


def test_a_model_without_end_of_sequence_is_refused(tiny_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.eos_token = None
    base = _tiny(tokenizer, "llama", **_LLAMA)
    base.model.generation_config.eos_token_id = None
    assert "it has no end-of-sequence id" in _refusal(base)


def test_bidirectional_attention_is_refused(tokenizer) -> None:
    base = _tiny(tokenizer, "gemma", head_dim=8, use_bidirectional_attention=True, **_LLAMA)
    assert "its attention is bidirectional" in _refusal(base)


def test_a_tokenizer_past_the_embedding_is_refused(tokenizer) -> None:
    base = _tiny(tokenizer, "llama", **_LLAMA)
    base.model.resize_token_embeddings(len(tokenizer) - 10)
    assert f"its tokenizer has {len(tokenizer)} tokens but its input embedding only {len(tokenizer) - 10} rows" \
        in _refusal(base)


def test_softprompt_serve_refuses_bloom_before_listening(tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "tiny-bloom"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "bloom", vocab_size=len(tokenizer), n_layer=2, n_head=4, hidden_size=32, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    command = [sys.executable, "-m", "softprompt.client.cli", "serve", "--model", str(folder), "--port", "0",
               "--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"softprompt serve: cannot serve {folder} (model type 'bloom') exactly" in done.stderr
    assert "ALiBi" in done.stderr
    assert re.search(r"serving .* on 127\.0\.0\.1:", output) is None  # the line `serve` logs once it listens
    assert "Traceback" not in output
