"""Tests of softprompt.prompts.format's modules against real PEFT adapters saved by PEFT itself."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from softprompt.prompts.base import BaseModelSpec, spec_of
from softprompt.prompts.errors import BaseModelMismatchError, CorruptPromptError, InvalidPromptError
from softprompt.prompts.format.layout import METADATA, PEFT_CONFIG, PEFT_WEIGHTS, TENSOR_NAME
from softprompt.prompts.format.stored import (
    adapter_files,
    metadata_bytes,
    parse_embeddings,
    parse_metadata,
    peft_config_for,
    write_peft_folder,
)
from softprompt.prompts.format.tensor import PromptTensor, check_base_model, validate_embeddings
from softprompt.prompts.format.uploads import parse_peft_adapter, parse_raw_tensor

TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
HIDDEN = TINY_LLAMA["hidden_size"]
MAX_TOKENS = 16


def tiny_llama(seed: int = 0):
    """A fresh tiny LlamaForCausalLM; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def save_adapter(peft_config, out_dir: Path, *, seed: int = 1, model_seed: int = 0):
    """Saves a real adapter with PEFT; returns (config text, weights bytes, PEFT's own prompt tensor)."""
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_llama(model_seed), peft_config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    # The tensor PEFT itself saves for prompt-learning adapters (for P-tuning: the encoder's output).
    expected = peft_model.get_prompt_embedding_to_save("default") if hasattr(peft_model, "prompt_encoder") else None
    return (out_dir / PEFT_CONFIG).read_text(), (out_dir / PEFT_WEIGHTS).read_bytes(), expected


@pytest.fixture(scope="module")
def base() -> BaseModelSpec:
    return spec_of(tiny_llama(0), "tiny-llama")


@pytest.fixture(scope="module")
def prompt_tuning_adapter(tmp_path_factory):
    from peft import PromptTuningConfig

    out = tmp_path_factory.mktemp("pt")
    return save_adapter(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), out)


@pytest.fixture(scope="module")
def good_config(prompt_tuning_adapter) -> dict:
    return json.loads(prompt_tuning_adapter[0])


def weights_of(**tensors: torch.Tensor) -> bytes:
    return save_safetensors(tensors, metadata={"format": "pt"})


def parse(config: dict | str, weights: bytes, base: BaseModelSpec, **kw) -> PromptTensor:
    text = config if isinstance(config, str) else json.dumps(config)
    kw.setdefault("max_virtual_tokens", MAX_TOKENS)
    return parse_peft_adapter(text, weights, base, **kw)


def assert_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------- good adapters


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_parses_prompt_tuning_adapter(tmp_path, base, init):
    from peft import PromptTuningConfig

    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prompt_tuning_init=init)
    config_text, weights, expected = save_adapter(cfg, tmp_path)
    prompt = parse(config_text, weights, base)
    assert prompt.source_type == "PROMPT_TUNING"
    assert prompt.init == init
    assert prompt.embeddings.shape == (4, HIDDEN)
    assert prompt.embeddings.dtype == torch.float32 and prompt.embeddings.is_contiguous()
    assert torch.equal(prompt.embeddings, expected)


def test_accepts_config_as_bytes(base, prompt_tuning_adapter):
    config_text, weights, expected = prompt_tuning_adapter
    prompt = parse_peft_adapter(config_text.encode(), weights, base, max_virtual_tokens=MAX_TOKENS)
    assert torch.equal(prompt.embeddings, expected)


def test_parses_p_tuning_adapter_as_its_encoder_output(tmp_path, base):
    from peft import PromptEncoderConfig

    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16)
    config_text, weights, expected = save_adapter(cfg, tmp_path)
    prompt = parse(config_text, weights, base)
    assert prompt.source_type == "P_TUNING"
    assert prompt.init is None
    assert torch.equal(prompt.embeddings, expected)


def test_p_tuning_stored_as_prompt_tuning_gives_the_same_logits(tmp_path, base):
    """Serving a P-tuning adapter from its saved tensor must match PEFT running the encoder itself."""
    from peft import PeftModel, PromptEncoderConfig

    cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)
    config_text, weights, _ = save_adapter(cfg, tmp_path / "ptune")
    original = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "ptune").eval()
    prompt = parse(config_text, weights, base)
    stored = write_peft_folder(tmp_path / "stored", adapter_files(prompt, base))
    reloaded = PeftModel.from_pretrained(tiny_llama(0), stored).eval()
    assert reloaded.peft_config["default"].peft_type == "PROMPT_TUNING"
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        a = original(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tensor_is_cast_to_float32(base, good_config, dtype):
    t = torch.randn(4, HIDDEN).to(dtype)
    prompt = parse(good_config, weights_of(prompt_embeddings=t), base)
    assert prompt.embeddings.dtype == torch.float32
    assert torch.equal(prompt.embeddings, t.float())


def test_single_tensor_with_another_name_is_accepted(base, good_config):
    t = torch.randn(4, HIDDEN)
    assert torch.equal(parse(good_config, weights_of(weight=t), base).embeddings, t)


def test_config_without_optional_fields_is_accepted(base):
    t = torch.randn(3, HIDDEN)
    prompt = parse({"peft_type": "PROMPT_TUNING"}, weights_of(prompt_embeddings=t), base)
    assert torch.equal(prompt.embeddings, t)


# ---------------------------------------------------------------- bad weight bytes


def test_truncated_weights(base, prompt_tuning_adapter):
    config_text, weights, _ = prompt_tuning_adapter
    for cut in (len(weights) - 7, 20, 5):
        with pytest.raises(InvalidPromptError) as e:
            parse(config_text, weights[:cut], base)
        assert_error(e, "safetensors", "truncated", "save_pretrained")


@pytest.mark.parametrize("garbage", [b"", b"hello world", os.urandom(300), b"\xff" * 8 + b"{}"])
def test_garbage_weights(base, good_config, garbage):
    with pytest.raises(InvalidPromptError) as e:
        parse(good_config, garbage, base)
    assert_error(e, "adapter_model.safetensors", "upload")


class _Boom:
    """Unpickling this creates a marker directory: proof that the bytes were unpickled."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_is_refused_and_never_unpickled(base, good_config, tmp_path):
    marker = tmp_path / "unpickled"
    boom = _Boom()
    boom.marker = str(marker)
    for payload in (pickle.dumps(boom), pickle.dumps(torch.randn(4, HIDDEN))):
        with pytest.raises(InvalidPromptError) as e:
            parse(good_config, payload, base)
        assert_error(e, "pickle", "safe_serialization=True")
    assert not marker.exists()


def test_torch_save_bytes_are_refused(base, good_config):
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.randn(4, HIDDEN)}, buf)
    with pytest.raises(InvalidPromptError) as e:
        parse(good_config, buf.getvalue(), base)
    assert_error(e, "torch.save", "adapter_model.safetensors")


def test_two_tensors(base, good_config):
    w = weights_of(prompt_embeddings=torch.randn(4, HIDDEN), extra=torch.randn(4, HIDDEN))
    with pytest.raises(InvalidPromptError) as e:
        parse(good_config, w, base)
    assert_error(e, "2 tensors", "exactly one tensor")


def test_no_tensor(base, good_config):
    with pytest.raises(InvalidPromptError) as e:
        parse(good_config, weights_of(), base)
    assert_error(e, "0 tensors")


@pytest.mark.parametrize("shape", [(4 * HIDDEN,), (1, 4, HIDDEN), ()])
def test_wrong_rank(base, shape):
    w = weights_of(prompt_embeddings=torch.randn(shape))
    with pytest.raises(InvalidPromptError) as e:
        parse({"peft_type": "PROMPT_TUNING"}, w, base)
    assert_error(e, f"{len(shape)} dimension", "2-D", f"hidden size {HIDDEN}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.float64])
def test_non_float_dtypes(base, good_config, dtype):
    w = weights_of(prompt_embeddings=torch.ones(4, HIDDEN, dtype=dtype))
    with pytest.raises(InvalidPromptError) as e:
        parse(good_config, w, base)
    assert_error(e, str(dtype).removeprefix("torch."), "float32, float16 or bfloat16", "convert")


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_non_finite_values(base, good_config, bad, word):
    t = torch.randn(4, HIDDEN)
    t[2, 7] = bad
    with pytest.raises(InvalidPromptError) as e:
        parse(good_config, weights_of(prompt_embeddings=t), base)
    assert_error(e, f"1 {word}", "virtual token 2", "retrain")


def test_wrong_width(base):
    w = weights_of(prompt_embeddings=torch.randn(4, 24))
    with pytest.raises(InvalidPromptError) as e:
        parse({"peft_type": "PROMPT_TUNING"}, w, base)
    assert_error(e, "width 24", f"hidden size {HIDDEN}", "tiny-llama", "train the prompt on this base model")


def test_too_many_tokens(base, prompt_tuning_adapter):
    config_text, weights, _ = prompt_tuning_adapter
    with pytest.raises(InvalidPromptError) as e:
        parse(config_text, weights, base, max_virtual_tokens=3)
    assert_error(e, "4 virtual tokens", "at most 3", "fewer virtual tokens")
    assert parse(config_text, weights, base, max_virtual_tokens=4).embeddings.shape[0] == 4


def test_zero_tokens(base):
    w = weights_of(prompt_embeddings=torch.empty(0, HIDDEN))
    with pytest.raises(InvalidPromptError) as e:
        parse({"peft_type": "PROMPT_TUNING"}, w, base)
    assert_error(e, "no virtual tokens", "at least 1")


# ---------------------------------------------------------------- bad configs


def test_prefix_tuning_adapter_is_a_kv_prompt(tmp_path, base):
    """Issue 21: a prefix-tuning adapter made for this model is taken as keys and values (it was refused before)."""
    from peft import PrefixTuningConfig

    config_text, weights, expected = save_adapter(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                                                  tmp_path)
    prompt = parse(config_text, weights, base)
    assert (prompt.method, prompt.source_type, prompt.layout) == ("prefix", "PREFIX_TUNING", base.kv_layout)
    assert torch.equal(prompt.embeddings, expected)


def test_prefix_tuning_adapter_for_another_model_is_refused(tmp_path, base):
    from peft import PrefixTuningConfig

    config_text, weights, _ = save_adapter(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path)
    other = BaseModelSpec("other", HIDDEN, 3, 4, 128, "f" * 16, kv_heads=2, head_dim=8)
    with pytest.raises(InvalidPromptError) as e:
        parse(config_text, weights, other)
    assert_error(e, "num_layers is 2", "3 layers", "keys and values")


def test_adaption_prompt_adapter_is_refused(base):
    config = {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": 4, "adapter_layers": 1}
    with pytest.raises(InvalidPromptError) as e:
        parse(config, weights_of(prompt_embeddings=torch.zeros(4, HIDDEN)), base)
    assert_error(e, "ADAPTION_PROMPT", "inside", "gate", "PREFIX_TUNING", "PROMPT_TUNING")


def test_lora_adapter_is_refused(tmp_path, base):
    from peft import LoraConfig

    config_text, weights, _ = save_adapter(LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]), tmp_path)
    with pytest.raises(InvalidPromptError) as e:
        parse(config_text, weights, base)
    assert_error(e, "LORA", "not a soft prompt", "PROMPT_TUNING")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("{not json", "not valid JSON"),
        ("", "empty"),
        ("[1, 2]", "JSON object"),
        ('"PROMPT_TUNING"', "JSON object"),
        ("{}", "no peft_type"),
        ('{"peft_type": 3}', "not a soft prompt"),
    ],
)
def test_bad_config_json(base, prompt_tuning_adapter, text, fragment):
    with pytest.raises(InvalidPromptError) as e:
        parse(text, prompt_tuning_adapter[1], base)
    assert_error(e, fragment)


def test_config_not_utf8(base, prompt_tuning_adapter):
    with pytest.raises(InvalidPromptError) as e:
        parse_peft_adapter(b"\xff\xfe{", prompt_tuning_adapter[1], base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, "UTF-8")


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"num_virtual_tokens": 5}, ("num_virtual_tokens=5", "4 rows", "different adapters")),
        ({"token_dim": 16}, ("token_dim=16", f"{HIDDEN} wide", "different adapters")),
        ({"num_virtual_tokens": "4"}, ("must be an integer",)),
        ({"task_type": "SEQ_2_SEQ_LM"}, ("SEQ_2_SEQ_LM", "CAUSAL_LM")),
        ({"num_transformer_submodules": 2}, ("num_transformer_submodules=2", "encoder-decoder", "CAUSAL_LM")),
    ],
)
def test_config_inconsistent_or_unsupported(base, prompt_tuning_adapter, good_config, change, fragments):
    with pytest.raises(InvalidPromptError) as e:
        parse({**good_config, **change}, prompt_tuning_adapter[1], base)
    assert_error(e, *fragments)


def test_wrong_num_layers_is_a_base_model_mismatch_unless_forced(base, prompt_tuning_adapter, good_config):
    config = {**good_config, "num_layers": 30}
    with pytest.raises(BaseModelMismatchError) as e:
        parse(config, prompt_tuning_adapter[1], base)
    assert_error(e, "num_layers=30", "another base model", "force=True", "--force")
    prompt = parse(config, prompt_tuning_adapter[1], base, force=True)
    assert torch.equal(prompt.embeddings, prompt_tuning_adapter[2])


def test_width_error_wins_over_layer_mismatch(base):
    # force cannot make a wrong-width tensor servable, so the message must not suggest it.
    w = weights_of(prompt_embeddings=torch.randn(4, 24))
    with pytest.raises(InvalidPromptError):
        parse({"peft_type": "PROMPT_TUNING", "num_layers": 30}, w, base, force=True)


def test_check_base_model_fingerprint(base):
    check_base_model("", base, force=False)
    check_base_model(base.fingerprint, base, force=False)
    check_base_model("0123456789abcdef", base, force=True)
    with pytest.raises(BaseModelMismatchError) as e:
        check_base_model("0123456789abcdef", base, force=False)
    assert_error(e, "0123456789abcdef", base.fingerprint, "tiny-llama", "force=True", "--force")


# ---------------------------------------------------------------- raw tensors


def raw_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_raw_tensor_good(base, dtype):
    t = torch.randn(3, HIDDEN).to(getattr(torch, dtype))
    data = bytearray(raw_bytes(t))
    prompt = parse_raw_tensor([3, HIDDEN], dtype, bytes(data), base, max_virtual_tokens=MAX_TOKENS)
    assert prompt.source_type == "RAW" and prompt.init is None
    assert prompt.embeddings.dtype == torch.float32 and prompt.embeddings.is_contiguous()
    assert torch.equal(prompt.embeddings, t.float())


def test_raw_tensor_does_not_share_the_callers_buffer(base):
    t = torch.randn(2, HIDDEN)
    data = bytearray(raw_bytes(t))
    prompt = parse_raw_tensor((2, HIDDEN), "float32", data, base, max_virtual_tokens=MAX_TOKENS)
    data[:] = b"\x00" * len(data)
    assert torch.equal(prompt.embeddings, t)


@pytest.mark.parametrize("delta", [-1, 1, -4 * HIDDEN])
def test_raw_tensor_wrong_byte_length(base, delta):
    data = raw_bytes(torch.randn(3, HIDDEN))
    data = data[:delta] if delta < 0 else data + b"\x00" * delta
    with pytest.raises(InvalidPromptError) as e:
        parse_raw_tensor([3, HIDDEN], "float32", data, base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, f"has {len(data)} bytes", f"exactly {3 * HIDDEN * 4}", "row-major, little-endian")


@pytest.mark.parametrize("dtype", ["int8", "float64", "fp32", "", "FLOAT32"])
def test_raw_tensor_wrong_dtype_string(base, dtype):
    with pytest.raises(InvalidPromptError) as e:
        parse_raw_tensor([1, HIDDEN], dtype, b"\x00" * 4 * HIDDEN, base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, repr(dtype), '"float32", "float16" or "bfloat16"')


@pytest.mark.parametrize("shape", [[1, 3, HIDDEN], [3 * HIDDEN], []])
def test_raw_tensor_wrong_rank(base, shape):
    with pytest.raises(InvalidPromptError) as e:
        parse_raw_tensor(shape, "float32", b"\x00" * 12 * HIDDEN, base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, f"{len(shape)} dimension", "2-D")


def test_raw_tensor_shape_checked_before_bytes(base):
    # A huge claimed shape must be refused from the shape alone, without allocating it.
    with pytest.raises(InvalidPromptError) as e:
        parse_raw_tensor([10**12, HIDDEN], "float32", b"", base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, "at most 16")
    with pytest.raises(InvalidPromptError) as e:
        parse_raw_tensor([2, 10**12], "float32", b"", base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, "hidden size")
    with pytest.raises(InvalidPromptError) as e:
        parse_raw_tensor([0, HIDDEN], "float32", b"", base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, "no virtual tokens")


def test_raw_tensor_nan(base):
    t = torch.randn(2, HIDDEN)
    t[1, 0] = float("nan")
    with pytest.raises(InvalidPromptError) as e:
        parse_raw_tensor([2, HIDDEN], "float32", raw_bytes(t), base, max_virtual_tokens=MAX_TOKENS)
    assert_error(e, "NaN", "virtual token 1")


# ---------------------------------------------------------------- validate, write, read


def test_validate_embeddings_returns_a_private_float32_copy(base):
    t = torch.randn(HIDDEN, 4).t()  # non-contiguous
    out = validate_embeddings(t, base, max_virtual_tokens=MAX_TOKENS)
    assert out.is_contiguous() and out.dtype == torch.float32 and torch.equal(out, t)
    t.zero_()
    assert not torch.equal(out, t)


def test_prompt_tensor_rejects_unknown_source_type():
    with pytest.raises(ValueError):
        PromptTensor(torch.zeros(1, HIDDEN), "LORA")


def test_peft_config_has_the_keys_peft_writes(base, good_config):
    prompt = PromptTensor(torch.randn(4, HIDDEN), "P_TUNING")
    config = peft_config_for(prompt, base)
    assert set(config) == set(good_config)
    for key in ("num_layers", "num_attention_heads", "num_virtual_tokens", "token_dim", "task_type", "peft_version"):
        assert config[key] == good_config[key], key
    assert config["peft_type"] == "PROMPT_TUNING"
    assert config["prompt_tuning_init"] == "RANDOM"
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["inference_mode"] is True and config["num_transformer_submodules"] == 1


def test_write_and_read_version_files(tmp_path, base):
    from peft import PeftModel
    from safetensors import safe_open

    prompt = PromptTensor(torch.randn(4, HIDDEN), "PROMPT_TUNING", init="TEXT")
    files = adapter_files(prompt, base)
    sha = hashlib.sha256(files[PEFT_WEIGHTS]).hexdigest()
    write_peft_folder(tmp_path, {**files, METADATA: metadata_bytes({"note": "x", "sha256": sha})})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PEFT_CONFIG, PEFT_WEIGHTS, METADATA])
    assert sha == hashlib.sha256((tmp_path / PEFT_WEIGHTS).read_bytes()).hexdigest()
    assert parse_metadata((tmp_path / METADATA).read_bytes(), where=METADATA) == {"note": "x", "sha256": sha}
    with safe_open(str(tmp_path / PEFT_WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == [TENSOR_NAME]
    weights = (tmp_path / PEFT_WEIGHTS).read_bytes()
    assert torch.equal(parse_embeddings(weights, sha, where=PEFT_WEIGHTS), prompt.embeddings)
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert torch.equal(peft_model.get_prompt_embedding_to_save("default"), prompt.embeddings)


def test_read_embeddings_detects_corruption(base):
    prompt = PromptTensor(torch.randn(2, HIDDEN), "RAW")
    weights = adapter_files(prompt, base)[PEFT_WEIGHTS]
    sha = hashlib.sha256(weights).hexdigest()
    with pytest.raises(CorruptPromptError) as e:
        parse_embeddings(weights, "0" * 64, where=PEFT_WEIGHTS)
    assert_error(e, "sha256", "register the prompt again")
    data = bytearray(weights)
    data[-1] ^= 0x01
    with pytest.raises(CorruptPromptError):
        parse_embeddings(bytes(data), sha, where=PEFT_WEIGHTS)
    # A weights file gone from a store: test_registry's test_corrupt_weights_detected_on_load.


def test_read_metadata_damaged():
    with pytest.raises(CorruptPromptError):
        parse_metadata(b"{broken", where=METADATA)
