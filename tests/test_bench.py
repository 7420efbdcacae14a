"""`softprompt bench` end to end on the tiny model: every method runs, reports, and our two paths agree.

No timing is asserted: a loaded CI machine makes any threshold flaky. What must hold is that every
method produced exactly the asked tokens, and that our engine gives the same greedy ids offline
and over gRPC.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt.client.cli import main as cli_main
from softprompt.server.bench import METHODS, main


def test_bench_runs_every_method_on_the_tiny_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    argv = ["--model", str(tiny_model_dir), "--requests", "4", "--tasks", "2", "--virtual-tokens", "3",
            "--new-tokens", "4", "--input-tokens", "8", "--json", str(out)]
    assert main(argv) == 0

    figures = json.loads(out.read_text())
    assert set(figures["methods"]) == set(METHODS)
    for key, method in figures["methods"].items():
        assert method["tokens_per_s"] > 0, key
        assert method["generated_tokens"] == 4 * 4, key
        assert all(len(ids) == 4 for ids in method["outputs"]), key
    assert figures["outputs_identical"] is True
    printed = capsys.readouterr().out
    assert "outputs identical ((d), (e), (f)): yes" in printed and "vs (a)" in printed
    assert "(f)/(e): serving while a training job runs" in printed
    # The probe raises unless every request right after a RegisterPrompt was served the new version.
    assert figures["methods"]["e"]["extra"]["registration"]["rounds"] == 10
    assert "each was served by the very next request" in printed


def test_cli_hands_bench_its_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    monkeypatch.setattr("softprompt.server.bench.main", lambda argv: received.append(argv) or 0)
    assert cli_main(["bench", "--requests", "2", "--help"]) == 0
    assert received == [["--requests", "2", "--help"]]
