"""Writes a real, untrained PEFT prompt-tuning adapter for the default model: a starting point for training.

The README's tour uses examples/pirate-prompt instead, trained from examples/pirate.jsonl: an untrained
instruction prompt changes little on the default model (its answers read like the bare model's).

The prompt is PEFT's TEXT initialisation: the embeddings of an instruction, the usual starting
point of prompt tuning. It is saved with PEFT's own `save_pretrained`, exactly as a user's
trained adapter would be.

    .venv/bin/python scripts/make_example_prompt.py ./example-prompt --text "Answer in French:"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

from softprompt.server.app.loading import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write adapter_config.json + adapter_model.safetensors to")
    parser.add_argument("--text", default="Answer like a pirate:", help="instruction whose embeddings form the prompt")
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    base = load_base_model(args.model, device="cpu")
    tokens = len(base.tokenizer(args.text).input_ids)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=args.text,
        tokenizer_name_or_path=str(Path(base.tokenizer.name_or_path)),
    )
    get_peft_model(base.model, config).save_pretrained(args.out)
    print(f"wrote a {tokens}-token prompt to {args.out}")


if __name__ == "__main__":
    main()
