"""`softprompt bench` end to end on the tiny model: every method runs, reports, and our two paths agree.

No timing is asserted: a loaded CI machine makes any threshold flaky. What must hold is that every
method produced exactly the asked tokens, and that our engine gives the same greedy ids offline
and over gRPC, and the same text over the HTTP API.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import engine_rows, reference_greedy, run_to_end
from softprompt.benchmarks.cli import main, parse_settings
from softprompt.benchmarks.methods import METHODS
from softprompt.client.cli import main as cli_main
from softprompt.server.core.engine import Engine, StepTimings


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
        assert key == "i" or all(len(ids) == 4 for ids in method["outputs"]), key
    # The HTTP API streams text, not ids: (i) is compared with (e) by the text of each request.
    http, grpc = figures["methods"]["i"], figures["methods"]["e"]
    assert http["outputs"] is None and http["texts"] == grpc["texts"] and len(grpc["texts"]) == 4
    assert figures["outputs_identical"] is True
    printed = capsys.readouterr().out
    assert "outputs identical ((d), (e), (f) by ids; (i) by text against (e)): yes" in printed and "vs (a)" in printed
    assert "(i)/(e) HTTP streams vs gRPC streams:" in printed
    assert "(f)/(e): serving while a training job runs" in printed
    # The probe raises unless every request right after a RegisterPrompt was served the new version.
    assert figures["methods"]["e"]["extra"]["registration"]["rounds"] == 10
    assert "each was served by the very next request" in printed


def test_skip_takes_letters_names_and_aliases() -> None:
    assert parse_settings(["--skip", "http,a,peft"]).skip == {"i", "a", "c"}
    with pytest.raises(SystemExit):
        parse_settings(["--skip", "websocket"])


def test_cli_hands_bench_its_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    monkeypatch.setattr("softprompt.benchmarks.cli.main", lambda argv: received.append(argv) or 0)
    assert cli_main(["bench", "--requests", "2", "--help"]) == 0
    assert received == [["--requests", "2", "--help"]]


def test_engine_options_the_bench_uses(tiny_base) -> None:
    """ignore_eos runs a row past an end-of-sequence token to max_new_tokens; StepTimings counts every step part."""
    timings = StepTimings()
    engine = Engine(tiny_base, ignore_eos=True, timings=timings)
    seq = engine_rows(engine, tiny_base, 1, max_new=5)[0]
    expected = reference_greedy(tiny_base.model, seq.prompt, seq.input_ids, 5, frozenset())
    engine.eos_ids = frozenset({expected[0]})  # the row's first token ends a sequence, unless ignored
    batch, events = engine.prefill([seq])
    assert events[0].finish_reason is None
    run_to_end(engine, batch)
    assert seq.generated == expected and seq.finish_reason == "length"
    calls = {part: n for part, (n, seconds) in timings.snapshot().items()}
    assert calls == {"prefill": 1, "decode": 4, "mixed": 0, "emit": 5, "filter": 4, "concatenate": 0}
    engine.step(None, engine_rows(engine, tiny_base, 1, max_new=5))  # a mixed step (here prefill alone)
    assert timings.snapshot()["mixed"][0] == 1 and timings.snapshot()["emit"][0] == 6
    assert all(seconds >= 0 for _, seconds in timings.snapshot().values())


@pytest.mark.parametrize("mixed", [False, True], ids=["apart", "mixed"])
def test_churn_benchmark_reports_both_runs(mixed: bool, tiny_model_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Rows 6 and lifetime 4 make 1.5 rows finish and join per step, each replaced, and every figure positive;
    mixed, the joiners are prefilled in the next step's forward, which makes their first tokens."""
    from softprompt.benchmarks.churn import main as churn_main

    out = tmp_path / "churn.json"
    argv = ["--model", str(tiny_model_dir), "--rows", "6", "--lifetime", "4", "--steps", "6",
            "--virtual-tokens", "3", "--tasks", "2", "--threads", "1", "--json", str(out),
            "--mixed-steps" if mixed else "--no-mixed-steps"]
    assert churn_main(argv) == 0
    figures = json.loads(out.read_text())
    still, churn = figures["no_churn"], figures["churn"]
    assert still["finished_per_step"] == 0 and still["decode_tokens"] == 6 * 6
    assert churn["finished_per_step"] == churn["joined_per_step"] == 1.5
    for run in (still, churn):
        assert run["decode_tokens_per_s"] > 0 and run["seconds"] > 0 and run["tokens_per_s"] > 0
        assert run["ms_per_step"]["decode"] > 0 and run["mean_width"] > 0
    assert churn["ms_per_step"]["filter"] > 0
    made = round(churn["tokens_per_s"] * churn["seconds"])
    if mixed:  # 6 rows make a token every step; a step with joiners decodes fewer rows
        assert churn["ms_per_step"]["mixed"] > 0 and churn["ms_per_step"]["prefill"] == 0
        assert made == 6 * 6 and churn["decode_tokens"] < 6 * 6
    else:  # 6 rows decode every step, and the joiners' prefills make 1.5 first tokens a step
        assert churn["ms_per_step"]["prefill"] > 0 and churn["ms_per_step"]["mixed"] == 0
        assert churn["mean_rows"] == 6 and churn["decode_tokens"] == 6 * 6 and made == 6 * 6 + 9
    assert figures["ratio"] > 0 and figures["ratio_without_prefill"] > 0 and figures["threads"] == 1
    assert "churn / no churn:" in capsys.readouterr().out


def test_churn_benchmark_refuses_a_batch_that_cannot_churn_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    from softprompt.benchmarks.churn import main as churn_main

    with pytest.raises(SystemExit):
        churn_main(["--rows", "8", "--lifetime", "43"])
    assert "--rows (8) must be at least --lifetime (43)" in capsys.readouterr().err


def test_mixed_methods_benchmark_serves_the_same_rows_in_both_arms(tiny_model_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21's mixing benchmark: the mixed arm has prefix-tuned, prompt-tuned and bare rows, the other arm
    the same rows all prompt-tuned, and both generate the same tokens (else their rates do not compare)."""
    from softprompt.benchmarks.mixed_methods import main as mixed_main

    out = tmp_path / "mixed.json"
    argv = ["--model", str(tiny_model_dir), "--rows", "8", "--tasks", "4", "--virtual-tokens", "3",
            "--input-tokens", "8", "--new-tokens", "3", "--rounds", "2", "--json", str(out)]
    assert mixed_main(argv) == 0
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert rows["mixed"] == {"tokens": 8 * 3, "prefix_rows": 4, "prompt_rows": 2}
    assert rows["prompt"] == {"tokens": 8 * 3, "prefix_rows": 0, "prompt_rows": 6}
    assert figures["ratio"] > 0 and len(figures["per_round"]) == 2
    assert "mixed / prompt only:" in capsys.readouterr().out
