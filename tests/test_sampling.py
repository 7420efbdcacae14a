"""The sampler on hand-made logits: greedy, temperature, top-k and top-p against their definitions, seeded
rows reproducible and independent of their batch; then through the engine with the tiny model."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from helpers import TEXTS, engine_rows, run_to_end
from softprompt.server.core.engine import Engine, Sequence
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.sampling import RowSampler, seeded_generator, unseeded_generator

CPU = torch.device("cpu")


def sampler(params: list[DecodingOptions], shared_seed: int = 0) -> RowSampler:
    """A RowSampler as the engine builds one; the unseeded rows' generator is fixed so that tests repeat."""
    shared = torch.Generator().manual_seed(shared_seed)
    return RowSampler(params, [seeded_generator(p, CPU) for p in params], shared, CPU)


def draws(logits: list[float], params: DecodingOptions, n: int = 6000) -> Counter[int]:
    """Token counts of n unseeded draws from one row's logits (200 identical rows per step)."""
    rows = 200
    sample = sampler([params] * rows)
    batch = torch.tensor([logits] * rows)
    counts: Counter[int] = Counter()
    for _ in range(n // rows):
        counts.update(sample(batch).tolist())
    return counts


def assert_frequencies(counts: Counter[int], expected: list[float]) -> None:
    """Every token's frequency within 5 standard errors of `expected`; tokens of probability 0 never drawn."""
    n = sum(counts.values())
    for token, p in enumerate(expected):
        freq = counts[token] / n
        if p == 0.0:
            assert counts[token] == 0, f"token {token} has probability 0 but was drawn {counts[token]} times"
        else:
            se = math.sqrt(p * (1 - p) / n)
            assert abs(freq - p) <= 5 * se + 1e-9, f"token {token}: frequency {freq:.4f}, expected {p:.4f}"
    assert set(counts) <= set(range(len(expected)))


def softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    return torch.tensor(logits, dtype=torch.float64).div(temperature).softmax(-1).tolist()


def renormalized(probs: list[float], keep: set[int]) -> list[float]:
    total = sum(probs[i] for i in keep)
    return [p / total if i in keep else 0.0 for i, p in enumerate(probs)]


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    params = [DecodingOptions(), DecodingOptions(temperature=1.0), DecodingOptions(), DecodingOptions(temperature=2.0, seed=3),
              DecodingOptions(top_k=3, top_p=0.5), DecodingOptions()]  # top_k/top_p without temperature: still greedy
    tokens = sampler(params)(logits)
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)
    greedy = [0, 2, 4, 5]
    assert tokens[greedy].tolist() == logits.argmax(-1)[greedy].tolist()
    assert sampler([DecodingOptions()] * 6)(logits).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    logits = [0.0, 1.0, 2.0]
    counts = draws(logits, DecodingOptions(temperature=temperature), n=20000)
    assert_frequencies(counts, softmax(logits, temperature))


def test_tiny_temperature_concentrates_on_the_argmax():
    logits = [0.0, 1.0, 2.0, 1.9]
    for temperature in (1e-3, 1e-46):  # the second rounds to a float32 zero
        assert draws(logits, DecodingOptions(temperature=temperature), n=2000) == Counter({2: 2000})


def test_top_k_samples_only_the_k_best_in_their_proportions():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(40, generator=g) * 0.3).tolist()  # flat: without top-k most draws fall outside
    best = set(torch.tensor(logits).topk(5).indices.tolist())
    counts = draws(logits, DecodingOptions(temperature=1.0, top_k=5), n=20000)
    assert set(counts) == best
    assert_frequencies(counts, renormalized(softmax(logits), best))


def test_top_k_keeps_ties_with_the_kth_and_ignores_k_beyond_the_vocabulary():
    logits = [3.0, 2.0, 2.0, 1.0, 0.0]
    assert set(draws(logits, DecodingOptions(temperature=5.0, top_k=2), n=4000)) == {0, 1, 2}
    assert set(draws(logits, DecodingOptions(temperature=5.0, top_k=5), n=4000)) == set(range(5))
    assert set(draws(logits, DecodingOptions(temperature=5.0, top_k=99), n=4000)) == set(range(5))


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_samples_only_the_nucleus_in_its_proportions(top_p, nucleus):
    """The nucleus: the most likely tokens until the ones before the next reach top_p (1 = off)."""
    probs = [0.5, 0.3, 0.15, 0.05]
    counts = draws([math.log(p) for p in probs], DecodingOptions(temperature=1.0, top_p=top_p), n=12000)
    assert set(counts) == nucleus
    assert_frequencies(counts, renormalized(probs, nucleus))


def test_top_p_keeps_every_token_tied_with_the_last_one_kept():
    probs = [0.4, 0.2, 0.2, 0.2]  # 0.5 is reached inside the tie: which tied token is "first" is arbitrary
    counts = draws([math.log(p) for p in probs], DecodingOptions(temperature=1.0, top_p=0.5), n=6000)
    assert_frequencies(counts, probs)


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = [math.log(p) for p in probs]
    assert set(draws(logits, DecodingOptions(temperature=1.0, top_p=0.5))) == {0, 1}  # 0.4 before token 1
    assert set(draws(logits, DecodingOptions(temperature=1.0, top_k=2, top_p=0.5))) == {0}  # 4/7 before token 1


def test_top_p_counts_the_weight_of_ties_beyond_the_sorted_best():
    """top_k 2 keeps the five tokens tied at the 2nd best, though only the 2 best are sorted: the nucleus
    must see all of their weight (e^2 / (e^2 + 5) = 0.596 < 0.6 keeps the ties; e^2 / (e^2 + 1) would not)."""
    logits = [2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    counts = draws(logits, DecodingOptions(temperature=1.0, top_k=2, top_p=0.6), n=12000)
    assert_frequencies(counts, softmax(logits))


def test_temperature_applies_before_top_p():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    # At temperature 1 the nucleus of 0.7 is {0, 1}; at 0.25 token 0 alone holds 0.88 of the probability.
    assert softmax(logits, 0.25)[0] > 0.7
    assert set(draws(logits, DecodingOptions(temperature=0.25, top_p=0.7))) == {0}


def random_logits(steps: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=g) * 2 for _ in range(steps)]


def run_rows(params: list[DecodingOptions], steps: list[torch.Tensor], row_of: dict[int, torch.Tensor] | None = None,
             shared_seed: int = 0) -> list[list[int]]:
    """Every row's tokens over the steps; row i sees `steps` (its own logits if in `row_of`)."""
    sample = sampler(params, shared_seed)
    out: list[list[int]] = [[] for _ in params]
    for t, logits in enumerate(steps):
        batch = torch.stack([row_of[i][t] if row_of and i in row_of else logits for i in range(len(params))])
        for i, token in enumerate(sample(batch).tolist()):
            out[i].append(token)
    return out


SEEDED = DecodingOptions(temperature=0.9, top_k=30, top_p=0.9, seed=7)
OTHERS = [DecodingOptions(), DecodingOptions(temperature=1.3), DecodingOptions(temperature=0.7, top_p=0.8),
          DecodingOptions(temperature=1.0, top_k=60, seed=11), DecodingOptions(temperature=2.0, top_k=5, top_p=0.95)]


def test_a_seeded_row_repeats_and_samples_the_same_tokens_whatever_shares_its_batch():
    steps = random_logits(60, vocab=200, seed=3)
    alone = run_rows([SEEDED], steps)[0]
    assert run_rows([SEEDED], steps)[0] == alone  # across runs
    assert len(set(alone)) > 10  # sampled, not a constant
    others = random_logits(60, vocab=200, seed=4)
    # Every position among rows that sort the whole vocabulary (top-p without top-k) or other widths, seeded,
    # unseeded and greedy; the other rows see other logits.
    for position in range(len(OTHERS) + 1):
        params = OTHERS[:position] + [SEEDED] + OTHERS[position:]
        row_of = {i: others for i in range(len(params)) if i != position}
        assert run_rows(params, steps, row_of, shared_seed=position)[position] == alone, f"at position {position}"


def test_different_seeds_sample_differently():
    steps = random_logits(40, vocab=200, seed=3)
    a = run_rows([DecodingOptions(temperature=1.0, seed=1)], steps)[0]
    b = run_rows([DecodingOptions(temperature=1.0, seed=2)], steps)[0]
    assert a != b


def test_unseeded_rows_differ_between_runs_even_under_a_global_seed():
    steps = random_logits(40, vocab=200, seed=3)

    def run() -> list[int]:
        torch.manual_seed(0)  # the shared generator is the engine's own, not torch's global one
        params = [DecodingOptions(temperature=1.0)]
        sample = RowSampler(params, [None], unseeded_generator(CPU), CPU)
        return [sample(logits[None])[0].item() for logits in steps]

    assert run() != run()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="2 rows of parameters but 1 generators"):
        RowSampler([DecodingOptions()] * 2, [None], unseeded_generator(CPU), CPU)
    with pytest.raises(ValueError, match=r"expected logits of shape \[2, vocab\], got \[3, 10\]"):
        sampler([DecodingOptions()] * 2)(torch.zeros(3, 10))


# ---------------------------------------------------------------- through the engine


def test_seeded_sampling_is_batch_invariant(tiny_base):
    """A seeded row alone, and with greedy and unseeded rows that join and leave, samples the same tokens."""
    engine = Engine(tiny_base)
    params = DecodingOptions(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.9, seed=1234)

    def seeded() -> Sequence:
        seq = Sequence(request_id=0, input_ids=tiny_base.tokenizer(TEXTS[1]).input_ids, params=params)
        engine.start(seq)
        return seq

    alone = seeded()
    run_to_end(engine, engine.prefill([alone])[0])

    mixed = seeded()
    greedy = engine_rows(engine, tiny_base, 2)
    unseeded = Sequence(request_id=9, input_ids=tiny_base.tokenizer(TEXTS[0]).input_ids,
                        params=DecodingOptions(max_new_tokens=12, temperature=1.0))
    engine.start(unseeded)
    batch, _ = engine.prefill([greedy[0], mixed])
    engine.decode(batch)
    batch = engine.filter(batch, [1])  # the greedy row leaves...
    late, _ = engine.prefill([unseeded, greedy[1]])
    run_to_end(engine, engine.concatenate([late, batch]))  # ...and others join in front of it
    assert mixed.generated == alone.generated
    greedy_alone = Sequence(request_id=0, input_ids=alone.input_ids, params=DecodingOptions(max_new_tokens=10))
    engine.start(greedy_alone)
    run_to_end(engine, engine.prefill([greedy_alone])[0])
    assert alone.generated != greedy_alone.generated  # it did sample


def test_the_sampling_benchmark_reports_every_configuration(capsys):
    from softprompt.benchmarks.sampling import CONFIGS, main

    assert main(["--rows", "3", "--vocab", "20", "--steps", "2", "--seeded"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sampling 3 rows x 20 vocab on cpu, 2 steps, seeded rows"
    assert [line.split()[0] for line in lines[1:]] == list(CONFIGS)
    assert all(line.endswith("us/row/step") for line in lines[1:])
