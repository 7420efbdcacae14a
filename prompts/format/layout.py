"""The files of a stored prompt version, by name; the one place these names are spelled.

A version holds:

- ``adapter_config.json``: a PEFT ``PROMPT_TUNING`` config, so ``PeftModel.from_pretrained(base, folder)``
  loads the folder as-is;
- ``adapter_model.safetensors``: one float32 tensor ``prompt_embeddings`` of shape
  ``[num_virtual_tokens, hidden_size]`` (metadata ``{"format": "pt"}``, as PEFT writes it);
- ``softprompt.json``: softprompt's own metadata (name, version, checksum, provenance);
- trained versions only: ``training.json`` (the run's report) and ``loss.png`` (its loss curve).

The store keeps these files by name; `stored` builds and reads their bytes.
"""

from __future__ import annotations

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
METADATA = "softprompt.json"
TRAINING_REPORT = "training.json"
LOSS_PLOT = "loss.png"
# Files a version may carry besides the adapter and its metadata.
ATTACHMENTS = (TRAINING_REPORT, LOSS_PLOT)
TENSOR_NAME = "prompt_embeddings"
