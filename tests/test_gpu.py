"""The CUDA paths: decode steps replayed from CUDA graphs captured at startup give the reference tokens.

These need a GPU and are skipped without one (CI has none); `scripts/gpu_check.sh` runs them on a
GPU machine together with the benchmark. On CPU, tests/test_engine.py runs the same decode step at
the same bucketed shapes, through the same static buffers, eagerly.
"""

from __future__ import annotations

import threading

import pytest
import torch

from helpers import reference_greedy
from softprompt.server.core.engine import Engine
from softprompt.server.app.loading import load_base_model
from helpers import engine_rows, run_to_end

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _joined_run(engine, base):
    """Three rows decode three steps, four more join, all run to the end; returns the rows."""
    rows = engine_rows(engine, base, 7)
    batch, _ = engine.prefill(rows[:3])
    for _ in range(3):
        engine.decode(batch)
    run_to_end(engine, engine.concatenate([batch, engine.prefill(rows[3:])[0]]))
    return rows


@pytest.fixture(scope="module")
def cuda_base(tiny_model_dir):
    return load_base_model(str(tiny_model_dir), device="cuda", dtype="float32")


CAPTURE = (8, 256)  # rows 1-8 x widths 64-256: 4 x 3 graphs, captured when the engine is built


def test_cuda_graph_steps_match_the_reference(cuda_base):
    engine = Engine(cuda_base, capture=CAPTURE)
    # Every bucket captured at startup, none lost to a failed or disagreeing capture.
    assert engine._step.graph_shapes == [(r, w) for r in (1, 2, 4, 8) for w in (64, 128, 256)]
    rows = _joined_run(engine, cuda_base)
    for seq in rows:
        expected = reference_greedy(cuda_base.model, seq.prompt, seq.input_ids, seq.params.max_new_tokens,
                                    engine.eos_ids)
        assert seq.generated == expected, f"row {seq.request_id} differs from the no-cache reference"
    assert len(engine._step.graph_shapes) == 12  # serving dropped none


def test_device_work_on_another_thread_does_not_break_a_capture(cuda_base):
    """Captures run in thread-local mode: another thread allocating on the device meanwhile is harmless."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            torch.ones(1024, device="cuda").sum().item()

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        engine = Engine(cuda_base, capture=CAPTURE)
    finally:
        stop.set()
        thread.join()
    assert len(engine._step.graph_shapes) == 12


def test_bfloat16_graphs_give_the_eager_tokens(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    outputs = []
    for graphs in (True, False):
        engine = Engine(base, cuda_graphs=graphs, pad_shapes=True, capture=CAPTURE)
        rows = engine_rows(engine, base, 6)
        batch, _ = engine.prefill(rows)
        run_to_end(engine, batch)
        outputs.append([seq.generated for seq in rows])
        assert bool(engine._step.graph_shapes) is graphs
    assert outputs[0] == outputs[1]


def test_sliding_window_graphs_give_the_reference(cuda_base):
    """A sliding-window model's decode masks are rebuilt from the step's positions inside the captured graphs."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from softprompt.prompts.base import spec_of
    from softprompt.server.core.model import BaseModel

    tok = cuda_base.tokenizer
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to("cuda").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    base = BaseModel(model, tok, spec_of(model, "mistral"), torch.device("cuda"), torch.float32)
    engine = Engine(base, ignore_eos=True, capture=CAPTURE)
    rows = _joined_run(engine, base)
    for seq in rows:
        assert seq.generated == reference_greedy(model, seq.prompt, seq.input_ids, len(seq.generated), ())
    assert len(engine._step.graph_shapes) == 12


def test_prefix_tuned_rows_decoded_in_graphs_give_peft_s_tokens(cuda_base, tiny_model_dir, tmp_path):
    """Issue 21: rows behind a PEFT prefix-tuning adapter (keys and values written into their blocks), batched with
    prompt-tuned and bare rows and decoded from captured graphs, give what PEFT's own PeftModel forward gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import make_prefix_adapter
    from softprompt.prompts.format.uploads import parse_peft_adapter
    from softprompt.server.core.virtual import KvPrefix

    folder = make_prefix_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tmp_path / "prefix",
                                 num_virtual_tokens=9, seed=1)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).to("cuda").eval(),
                                          folder).eval()
    parsed = parse_peft_adapter((folder / "adapter_config.json").read_text(),
                                (folder / "adapter_model.safetensors").read_bytes(), cuda_base.spec,
                                max_virtual_tokens=32)
    engine = Engine(cuda_base, capture=CAPTURE, ignore_eos=True)
    prefix = KvPrefix.of(parsed.embeddings.to("cuda"), engine.pool.layers)
    rows = engine_rows(engine, cuda_base, 7)
    for seq in rows[::2]:
        seq.prompt = prefix
    batch, _ = engine.prefill(rows[:3])
    for _ in range(3):
        engine.decode(batch)
    run_to_end(engine, engine.concatenate([batch, engine.prefill(rows[3:])[0]]))
    for seq in rows:
        if seq.prompt is prefix:
            expected: list[int] = []
            with torch.no_grad():
                for _ in range(len(seq.generated)):
                    ids = torch.tensor([seq.input_ids + expected], device="cuda")
                    logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                    expected.append(int(logits[0, -1].argmax()))
        else:
            expected = reference_greedy(cuda_base.model, seq.prompt, seq.input_ids, len(seq.generated), ())
        assert seq.generated == expected, f"row {seq.request_id} differs"
    assert len(engine._step.graph_shapes) == 12
