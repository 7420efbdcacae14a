"""Held-out metrics of the bare model or a registered prompt on a labelled JSONL file.

    .venv/bin/python scripts/evaluate_prompt.py data.jsonl                      # the bare model, zero-shot
    .venv/bin/python scripts/evaluate_prompt.py data.jsonl --task sentiment@3 --store ./store
    .venv/bin/python scripts/evaluate_prompt.py data.jsonl --template "Review: {input}\\nSentiment:" --chat

Prints loss, exact match and (for classification data) accuracy, computed exactly as training
evaluates. `--template` wraps each input in an instruction, for a fair zero-shot baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from softprompt.prompts.data import labels_of, load_jsonl
from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.registry import Registry
from softprompt.prompts.train import PromptTrainer
from softprompt.server.app.loading import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="JSONL with input/target pairs")
    parser.add_argument("--task", default="", help="registered prompt reference (default: the bare model)")
    parser.add_argument("--store", type=Path, help="prompt store holding --task")
    parser.add_argument("--template", default="{input}", help="input wrapper, e.g. 'Review: {input}\\nSentiment:'")
    parser.add_argument("--chat", action="store_true", help="wrap inputs with the chat template")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N examples only")
    parser.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()

    examples = load_jsonl(args.data)[: args.limit or None]
    labels = labels_of(examples)
    examples = [replace(ex, input=args.template.format(input=ex.input)) for ex in examples]
    base = load_base_model(args.model)
    prompt, method = None, "prompt"
    if args.task:
        registry = Registry(args.store)
        version = registry.resolve(args.task)
        prompt, method = registry.load_embeddings(version).to(base.device), version.method  # a prefix scores as one
    options = TrainingOptions(num_virtual_tokens=1 if prompt is None else int(prompt.shape[0]),
                              apply_chat_template=args.chat, method=method)
    trainer = PromptTrainer(base.model, base.tokenizer, options, kv_layout=base.spec.kv_layout)
    started = time.monotonic()
    result = trainer.evaluate(prompt, trainer.encode(examples, what="evaluation"), labels)
    print(json.dumps({"task": args.task or "bare model", "template": args.template, "chat": args.chat,
                      "labels": labels, **asdict(result), "seconds": round(time.monotonic() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
