"""Shared fixtures: a tiny real Llama model and tokenizer built from a config, and helpers.

The tiny model is a real transformers model saved to disk and loaded through the same code path
as any `--model` folder; only its size is small, so the whole suite runs offline on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a soft prompt is a small matrix of virtual token embeddings",
    "one frozen model serves many tasks in a single batch",
    "positive negative neutral review movie film great awful boring",
    "translate english to french: hello world, how are you today?",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \" @ # $ % & _",
] * 4


def build_tiny_model_dir(path: Path, *, seed: int = 0) -> Path:
    """Writes a tiny Llama model with a byte-level BPE tokenizer and a chat template to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Larger-than-default weights make the logits peaked, so greedy choices are far from ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder, built once per test session."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir: Path):
    """The tiny model loaded through softprompt's loader (CPU, float32)."""
    from softprompt.server.model import load_base_model

    return load_base_model(str(tiny_model_dir), device="cpu")


@contextmanager
def running_server(base, store: Path, **settings) -> Iterator[tuple[object, str]]:
    """A real server for `base` on a free loopback port: yields (app, address), then drains it."""
    from softprompt.server.app import build_app, shutdown, start
    from softprompt.server.config import ServerConfig

    app = build_app(ServerConfig(port=0, store=store, **settings), base=base)
    grpc_server, port, health = start(app)
    try:
        yield app, f"127.0.0.1:{port}"
    finally:
        shutdown(app, grpc_server, health, grace_s=1.0)


def make_peft_adapter(base_model, out_dir: Path, *, num_virtual_tokens: int, seed: int) -> Path:
    """Saves a real PEFT prompt-tuning adapter with seeded random prompt vectors.

    PEFT wraps `base_model`; pass a copy that is not used for serving.
    """
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    peft_model = get_peft_model(base_model, config)
    with torch.no_grad():
        emb = peft_model.prompt_encoder["default"].embedding.weight
        # Scale like real token embeddings rather than N(0, 1).
        scale = base_model.get_input_embeddings().weight.std()
        emb.copy_(torch.randn_like(emb) * scale * 4)
    peft_model.save_pretrained(out_dir)
    return out_dir


def reference_greedy(model, prompt: torch.Tensor | None, input_ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """The correctness reference: full forward over [prompt ; input ; generated], no KV cache, greedy."""
    embed = model.get_input_embeddings()
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([input_ids + generated], dtype=torch.long)
            x = embed(ids)
            if prompt is not None:
                x = torch.cat([prompt[None].to(x.dtype), x], dim=1)
            logits = model(inputs_embeds=x, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            generated.append(token)
            if token in eos_ids:
                break
    return generated
