"""`python -m softprompt.benchmarks.peer` without vLLM: the requests both servers get, the vLLM-ready model copy, the
report's ratios and agreement, and a softprompt-only run against a real `softprompt serve` on the tiny model.

Nothing here needs vLLM or asserts a timing.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from softprompt.benchmarks import peer
from softprompt.prompts.tokens import encode_input

PLAN = peer.Plan(scenarios=(peer.Scenario(2, 4), peer.Scenario(3, 6)), tasks=2, virtual_tokens=3, new_tokens=4,
                 input_tokens=8)


def test_each_server_gets_the_same_input(tiny_base) -> None:
    work = peer.build_workload(tiny_base.model, tiny_base.tokenizer, PLAN)
    request = work.scenarios[1][3]
    assert request.task == 1 and request.input_ids == encode_input(tiny_base.tokenizer, request.text)

    ours = peer.softprompt_body(request, 4)
    assert ours["model"] == peer.task_name(1) and ours["prompt"] == request.text

    theirs = peer.vllm_body("base", request, work, 4)
    assert theirs["model"] == "base" and "prompt" not in theirs
    rows = torch.load(io.BytesIO(base64.b64decode(theirs["prompt_embeds"])), weights_only=True)
    embed = tiny_base.model.get_input_embeddings()
    expected = torch.cat([work.prompts[1], embed(torch.tensor(request.input_ids)).float()])
    assert rows.dtype == torch.float32 and torch.equal(rows, expected)
    for body in (ours, theirs):
        assert body["max_tokens"] == 4 and body["temperature"] == 0 and body["stream"] is True


def test_every_phase_has_its_own_inputs(tiny_base) -> None:
    work = peer.build_workload(tiny_base.model, tiny_base.tokenizer, PLAN)
    phases = [work.warmup, *work.scenarios]
    assert [len(p) for p in phases] == [2, 4, 6]
    texts = [r.text for p in phases for r in p]
    assert len(set(texts)) == len(texts) and all(texts)
    again = peer.build_workload(tiny_base.model, tiny_base.tokenizer, PLAN)
    assert [r.text for r in again.scenarios[1]] == [r.text for r in work.scenarios[1]]


def test_the_vllm_copy_names_its_input_embeddings(tiny_base, tmp_path: Path) -> None:
    out = peer.vllm_model_dir(tiny_base.model, tiny_base.tokenizer, "some/model", tmp_path)
    assert out == tmp_path / "vllm" / "model-float32" and (out / "tokenizer_config.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight")
    assert weight.dtype == torch.float32 and torch.equal(weight, tiny_base.model.get_input_embeddings().weight)
    assert peer.vllm_model_dir(None, None, "some/model", tmp_path) == out  # written once


def _figures(server: str, tok_s: float, texts: list[str]) -> peer.Figures:
    return peer.Figures(server=server, scenario=0, run=0, wall_s=2.0, tokens=int(tok_s * 2), tokens_per_s=tok_s,
                        ttft_p50_s=0.5, ttft_p99_s=1.0, latency_p50_s=1.0, latency_p99_s=1.5, stopped_early=0,
                        server_cores=1.0, other_cores=0.0, texts=texts, finish_reasons=["length"] * len(texts),
                        counts=[4] * len(texts), prefix_cache_hit_rate=None)


def test_the_report_gives_the_ratio_and_the_identical_outputs() -> None:
    plan = peer.Plan(scenarios=(peer.Scenario(2, 2),))
    figures = [_figures(peer.SOFTPROMPT, 50.0, ["a", "b"]), _figures(peer.VLLM, 100.0, ["a", "c"])]
    comparison = peer.compare(figures, 0)
    assert comparison is not None and comparison["tokens_per_s_ratio"] == 0.5
    assert comparison["agreement"] == [{"identical": 1, "total": 2, "same_finish": 2, "first_difference": 1}]
    lines = "\n".join(peer.table_lines(plan, figures))
    assert "softprompt/vLLM 0.50x tok/s" in lines and "outputs identical (same text) 1/2" in lines
    assert peer.compare(figures[:1], 0) is None


def test_softprompt_alone_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "peer.json"
    argv = ["--model", str(tiny_model_dir), "--skip-vllm", "--scenario", "2:4", "--tasks", "2", "--virtual-tokens",
            "3", "--new-tokens", "4", "--input-tokens", "8", "--json", str(out), "--work-dir", str(tmp_path / "w")]
    assert peer.main(argv) == 0

    figures = json.loads(out.read_text())
    (summary,) = figures["summary"]
    ours = summary["softprompt"]
    assert summary["vLLM"] is None and summary["comparison"] is None
    assert 0 < ours["tokens"] <= 4 * 4 and ours["tokens_per_s"] > 0
    (run,) = figures["runs"]
    assert len(run["texts"]) == 4 and sum(run["counts"]) == ours["tokens"]
    assert "2 streams, 4 requests  softprompt" in capsys.readouterr().out


def test_vllm_prefix_cache_counters_are_read_from_its_metrics(tiny_base) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    metrics = (b'# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n'
               b'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 32.0\n'
               b'vllm:prefix_cache_queries_total{engine="0",model_name="m"} 128.0\n'
               b'vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e9\n')

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the handler's API
            self.send_response(200)
            self.end_headers()
            self.wfile.write(metrics)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        vllm = peer.VllmPeer(workload=None, model_dir=None, python=None, cli=None, max_batch_size=1,  # type: ignore[arg-type]
                             max_model_len=512, env={}, extra_args=[])
        counters = vllm.prefix_cache_counters(peer.Running("vLLM", server.server_address[1], None, None))
    finally:
        server.shutdown()
    assert counters == (32.0, 128.0)
    assert peer.hit_rate((0.0, 0.0), counters) == 0.25 and peer.hit_rate(counters, counters) is None
