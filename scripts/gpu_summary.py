"""Summarizes `softprompt bench --json` runs of random-weight models on a GPU, as issue 12 asks.

For each run: (d) our engine's tokens/s, against (g) HF static-cache generate of the bare model and
(c) PEFT one batch per task, against the same run with --no-cuda-graphs when given, and as a
fraction of the memory-bandwidth bound: a decode step must read every weight and every row's KV
once, so at batch B a step makes B tokens in at least (weight bytes + KV bytes read) / bandwidth.

    python scripts/gpu_summary.py --bandwidth-gbs 4800 CONFIG.json RUN.json [EAGER.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoConfig

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _shape(config_json: Path) -> tuple[int, int]:
    """(parameters, KV bytes per token per byte of dtype) of a config."""
    values = json.loads(config_json.read_text())
    c = AutoConfig.for_model(values.pop("model_type"), **values)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head * 2 * (c.num_attention_heads + c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    params = c.num_hidden_layers * (attention + mlp) + embeddings
    return params, c.num_hidden_layers * 2 * c.num_key_value_heads * head


def main() -> None:
    """Prints one summary line per run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth-gbs", type=float, required=True, help="the GPU's memory bandwidth, GB/s")
    parser.add_argument("config", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("eager", type=Path, nargs="?", help="the same run with --no-cuda-graphs")
    a = parser.parse_args()
    run = json.loads(a.run.read_text())
    methods, settings = run["methods"], run["settings"]
    size = BYTES[settings["dtype"].replace("torch.", "")]
    params, kv_per_token = _shape(a.config)
    batch = min(settings["engine_max_batch"], settings["requests"])
    context = settings["virtual_tokens"] + settings["input_tokens"]["mean"] + settings["new_tokens"] / 2
    step_bytes = params * size + batch * context * kv_per_token * size
    bound = batch * a.bandwidth_gbs * 1e9 / step_bytes
    d = methods["d"]["tokens_per_s"]
    parts = [f"{a.run.name}: (d) {d:,.0f} tok/s at batch {batch}",
             f"{d / bound:.0%} of the bandwidth bound ({bound:,.0f} tok/s)"]
    for key, name in (("g", "HF static cache, bare model"), ("c", "PEFT per task")):
        if key in methods:
            parts.append(f"{d / methods[key]['tokens_per_s']:.2f}x {name}")
    if a.eager is not None:
        eager = json.loads(a.eager.read_text())["methods"]["d"]["tokens_per_s"]
        parts.append(f"graphs {d / eager:.2f}x eager")
    print("; ".join(parts))


if __name__ == "__main__":
    main()
