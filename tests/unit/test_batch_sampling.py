"""The batched token choice (model/batch_sampling.py's pick_rows) against the per-row `pick` and
direct computations: greedy, top-k 1, penalties and logit bias, grammar refusals and logprobs the
same row by row; truncation as transformers' warpers; draws distributed as the truncated softmax;
a seeded row's tokens the same alone and in any batch, through SlotBatch on a tiny random Llama."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from api.serving import structured
from bench.dynamic_batch import pick, row_logprobs
from model.batch_sampling import pick_rows
from model.engine import Engine
from model.grammar import Constraint, Grammars
from model.penalties import Penalties, penalties_for
from model.slot_batch import SlotBatch
from model.torch_sampling import Sampler, draw, truncate
from model.types import SampledLogprobs, SamplingParams
from tests.tiny_llama import TinyLlamas
from tests.unit.conftest import batch_engine

pytestmark = pytest.mark.timeout(120)

WIDTH = 4096
PROMPT = (5, 9, 9, 40, 41)
EOT = 128009


@dataclass
class Row:
    """What a batch runner's sequence brings to the choice (model/torch_sampling.py's Picking)."""

    sampler: Sampler
    constraint: Constraint | None
    penalties: Penalties | None
    top_logprobs: int | None


def row(sampling: SamplingParams, width: int = WIDTH, constraint: Constraint | None = None) -> Row:
    return Row(
        Sampler(sampling),
        constraint,
        penalties_for(sampling, PROMPT, 0, width),
        sampling.top_logprobs if sampling.logprobs else None,
    )


def logits_of(generator: torch.Generator, rows: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(rows, width, generator=generator) * 3


def assert_same_logprobs(got: SampledLogprobs | None, want: SampledLogprobs | None) -> None:
    if want is None:
        assert got is None
        return
    assert got is not None
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    assert [t for t, _ in got[1]] == [t for t, _ in want[1]]
    assert [v for _, v in got[1]] == pytest.approx([v for _, v in want[1]], abs=1e-5)


# Every sampled row is seeded, so the per-row path draws the same uniforms from the same generators.
MIXED = {
    "greedy": SamplingParams(max_tokens=8, temperature=0.0),
    "greedy logprobs": SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=5),
    # The bias wins the argmax at once; the frequency penalty takes it back after a few repeats.
    "greedy penalties": SamplingParams(
        max_tokens=8,
        temperature=0.0,
        frequency_penalty=4.0,
        presence_penalty=2.0,
        repetition_penalty=1.5,
        logit_bias=((7, 25.0), (100, -100.0)),
    ),
    "top-1 at t2": SamplingParams(max_tokens=8, temperature=2.0, top_k=1, seed=1),
    "t0.7 top-p": SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=2),
    "t1.3 top-k min-p": SamplingParams(
        max_tokens=8,
        temperature=1.3,
        top_k=50,
        min_p=0.05,
        seed=3,
        logprobs=True,
        top_logprobs=3,
        logit_bias=((11, 8.0),),
    ),
    "t0.9 repetition logprobs 0": SamplingParams(
        max_tokens=8, temperature=0.9, seed=4, repetition_penalty=1.3, logprobs=True, top_logprobs=0
    ),
    "top-p 0": SamplingParams(max_tokens=8, temperature=1.0, top_p=0.0, seed=5),
}


def test_the_batch_chooses_what_pick_chooses_row_by_row() -> None:
    names = sorted(MIXED)
    batched = {2 * i: row(MIXED[n]) for i, n in enumerate(names)}  # odd rows ride along, unused
    alone = {2 * i: row(MIXED[n]) for i, n in enumerate(names)}
    generator = torch.Generator().manual_seed(0)
    tokens: dict[str, list[int]] = {n: [] for n in names}
    for _ in range(8):
        logits = logits_of(generator, 2 * len(names))
        kept = logits.clone()
        got = pick_rows(batched, logits)
        assert torch.equal(logits, kept), "the batch's logits are left as they were"
        for i, name in enumerate(names):
            want = pick(alone[2 * i], logits[2 * i : 2 * i + 1])
            assert got[2 * i][0] == want[0], name
            assert_same_logprobs(got[2 * i][1], want[1])
            tokens[name].append(want[0])
    assert set(got) == set(batched)
    # The cases do what they say: the bias, then the penalty, decides the greedy row...
    assert tokens["greedy penalties"][0] == 7 and 7 not in tokens["greedy penalties"][-3:]
    # ...and the sampled rows really sample.
    assert len(set(tokens["t0.7 top-p"])) > 1


@pytest.mark.parametrize("beside", [None, "t0.7 top-p", "greedy logprobs"])
def test_greedy_rows_take_the_argmax_of_the_penalized_logits(beside: str | None) -> None:
    """Against a dense computation: logit_bias, then repetition, frequency and presence; next to a
    plain greedy row, and with or without a sampled row or one reporting logprobs."""
    sampling = MIXED["greedy penalties"]
    rows = {0: row(sampling), 2: row(SamplingParams(max_tokens=8, temperature=0))}
    if beside is not None:
        rows[1] = row(MIXED[beside])
    generator = torch.Generator().manual_seed(1)
    out: list[int] = []
    for _ in range(8):
        logits = logits_of(generator, 3)
        dense = logits[0].double().clone()
        for token, bias in sampling.logit_bias:
            dense[token] += bias
        seen = torch.tensor(sorted(set(PROMPT) | set(out)))
        dense[seen] = torch.where(dense[seen] > 0, dense[seen] / 1.5, dense[seen] * 1.5)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=WIDTH).double()
        dense -= 4.0 * counts + 2.0 * (counts > 0).double()
        got = pick_rows(rows, logits)
        assert got[0][0] == int(dense.argmax())
        assert got[2][0] == int(logits[2].argmax())
        out.append(got[0][0])


def test_logprobs_equal_the_per_row_log_softmax() -> None:
    """`row_logprobs` (bench/dynamic_batch.py) on each row's own (penalized) logits, at its logprob temperature."""
    specs = [
        SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=2),
        SamplingParams(max_tokens=4, temperature=0.6, seed=9, logprobs=True, top_logprobs=7),
        SamplingParams(max_tokens=4, temperature=1.7, seed=8, logprobs=True, top_logprobs=0),
        SamplingParams(max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=20, logit_bias=((3, 9.0),)),
    ]
    rows = {i: row(s) for i, s in enumerate(specs)}
    logits = logits_of(torch.Generator().manual_seed(2), len(specs))
    got = pick_rows(rows, logits)
    for i, sampling in enumerate(specs):
        token, logprobs = got[i]
        adjusted = logits[i].clone()
        if sampling.logit_bias:
            adjusted[3] += 9.0
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        assert_same_logprobs(logprobs, row_logprobs(adjusted, temperature, token, sampling.top_logprobs))
        assert logprobs is not None and len(logprobs[1]) == sampling.top_logprobs


# --- grammar: check first, and a refusal draws again among the allowed tokens, for that row alone ---


@pytest.fixture(scope="module")
def grammars(llama3_tokenizer: Any) -> Grammars:
    return Grammars(llama3_tokenizer, frozenset({EOT}))


GRAMMAR_ROWS = {
    "greedy": SamplingParams(max_tokens=8, temperature=0.0),
    "sampled": SamplingParams(max_tokens=8, temperature=1.0, seed=1),
    "flat top-p": SamplingParams(max_tokens=8, temperature=5.0, top_p=0.95, seed=2),
    "greedy logprobs": SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=4),
    "sampled logprobs": SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=True, top_logprobs=4),
}


def test_grammar_refusals_are_drawn_again_as_pick_does(grammars: Grammars) -> None:
    grammar = structured.grammar_for_schema({"enum": ["Привет", "Пока", "Да"]}, "response_format")
    width = 128256
    names = sorted(GRAMMAR_ROWS)

    def rows() -> dict[int, Row]:
        return {i: row(GRAMMAR_ROWS[n], width, grammars.constraint(grammar)) for i, n in enumerate(names)}

    batched, alone = rows(), rows()
    plain = SamplingParams(max_tokens=8, temperature=0.8, seed=4)
    batched[len(names)], alone[len(names)] = row(plain, width), row(plain, width)
    generator = torch.Generator().manual_seed(3)
    masks = grammars.masks
    done: set[int] = set()
    for _ in range(12):
        logits = logits_of(generator, len(names) + 1, width)
        got = pick_rows({r: s for r, s in batched.items() if r not in done}, logits)
        for r, (token, logprobs) in got.items():
            want = pick(alone[r], logits[r : r + 1])
            assert token == want[0], names[r] if r < len(names) else "plain"
            assert_same_logprobs(logprobs, want[1])
            if logprobs is not None:  # a token the grammar forbids is never listed
                assert logprobs[1] and all(v > -1000 for _, v in logprobs[1])
            if token == EOT:
                done.add(r)
        if done >= set(range(len(names))):
            break
    assert done >= set(range(len(names))), "every grammar row ended its enum"
    # Random logits almost never pick a token the grammar allows: refusals, each drawn again.
    assert grammars.masks - masks > len(names)


# --- truncation and the draw ----------------------------------------------------------------------


def settings_of(sampling: SamplingParams, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw`'s settings and keys for `rows` draws of one sampler (its next `rows` keys)."""
    sampler = Sampler(sampling)
    keys = torch.tensor([sampler.key() for _ in range(rows)])
    return torch.tensor([sampler.settings] * rows, dtype=torch.float32), keys


def warped(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """transformers' own warpers, as the per-row Sampler applied them before: the truncated
    softmax over one row."""
    scores = logits[None].float() / sampling.temperature
    if sampling.top_k > 0:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)  # type: ignore[arg-type]
    if sampling.top_p < 1.0:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)  # type: ignore[arg-type]
    if sampling.min_p > 0.0:
        scores = MinPLogitsWarper(sampling.min_p)(None, scores)  # type: ignore[arg-type]
    return torch.softmax(scores[0].double(), dim=-1)


def truncated(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    probs, order = truncate(logits[None], settings_of(sampling)[0])
    out = torch.zeros(logits.shape[-1], dtype=torch.float64).scatter(0, order[0], probs[0].double())
    return out / out.sum()


WARPED = [
    SamplingParams(max_tokens=1, temperature=0.7),
    SamplingParams(max_tokens=1, temperature=0.7, top_k=5),
    SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8),
    SamplingParams(max_tokens=1, temperature=1.5, min_p=0.2),
    SamplingParams(max_tokens=1, temperature=0.7, top_k=8, top_p=0.9, min_p=0.05),
    SamplingParams(max_tokens=1, temperature=2.0, top_k=3000, top_p=0.5),
    SamplingParams(max_tokens=1, temperature=0.3, top_p=0.0),  # only the best stays
]


@pytest.mark.parametrize(
    "sampling", WARPED, ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}"
)
def test_truncation_is_transformers_warpers(sampling: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(4)
    for logits in logits_of(generator, 4, 2000):
        want, got = warped(logits, sampling), truncated(logits, sampling)
        assert torch.equal(got > 0, want > 0), "the same tokens kept"
        assert torch.allclose(got, want, atol=1e-6)


def test_top_k_keeps_ties_with_the_kth_as_transformers_does() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 2.0, 3.0])  # the third best ties three ways
    for sampling in (
        SamplingParams(max_tokens=1, top_k=3),
        SamplingParams(max_tokens=1, top_k=2, min_p=0.9),
        SamplingParams(max_tokens=1, min_p=1.0),  # the best, tied twice
    ):
        assert torch.equal(truncated(logits, sampling) > 0, warped(logits, sampling) > 0)


# Shuffled, so the vocabulary's order is not the sorted one.
SMALL = torch.tensor([2.5, -0.5, 3.0, 0.0, 1.4, -3.0, 2.6, 1.0, -1.0, 2.0, 0.5, -2.0])
DRAWS = 40_000


@pytest.mark.parametrize(
    "sampling", WARPED[:5], ids=lambda s: f"t{s.temperature}-k{s.top_k}-p{s.top_p}-m{s.min_p}"
)
def test_draws_follow_the_truncated_softmax(sampling: SamplingParams) -> None:
    """With a fixed seed (so the test is deterministic) each token's frequency over DRAWS draws is
    within 5 standard deviations of its probability under the warpers; truncated ones never come."""
    seeded = SamplingParams(
        max_tokens=1,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        seed=11,
    )
    tokens = draw(SMALL.expand(DRAWS, -1), *settings_of(seeded, DRAWS))
    frequency = torch.bincount(tokens, minlength=SMALL.numel()).double() / DRAWS
    expected = warped(SMALL, sampling)
    assert (expected > 0).sum() > 1  # each case leaves a real choice
    for p, f in zip(expected.tolist(), frequency.tolist(), strict=True):
        if p == 0.0:
            assert f == 0.0
        else:
            assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / DRAWS)


def test_a_seed_repeats_its_draws_and_another_seed_does_not() -> None:
    logits = logits_of(torch.Generator().manual_seed(5), 1)[0]

    def draws(seed: int) -> list[int]:
        sampling = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, seed=seed)
        return draw(logits.expand(32, -1), *settings_of(sampling, 32)).tolist()

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


# --- through SlotBatch: a seeded row's tokens do not depend on the batch around it ---------------

SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=21, ignore_eos=True)
OTHERS = [
    SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=1.0, logit_bias=((300, 5.0),)),
    SamplingParams(
        max_tokens=12, temperature=1.4, top_k=40, min_p=0.02, seed=3, logprobs=True, top_logprobs=2
    ),
    SamplingParams(max_tokens=12, temperature=0.6, repetition_penalty=1.2),  # unseeded
]


@pytest.fixture(scope="module")
def runner(tiny_llamas: TinyLlamas, model_cache: Path) -> SlotBatch:
    path, _ = tiny_llamas.random(context_length=1024, seed=2, initializer_range=0.1)
    engine: Engine = batch_engine(path, model_cache, "transformers", 4)
    assert isinstance(engine.loaded.runner, SlotBatch)
    return engine.loaded.runner


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 128000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def sample(
    runner: SlotBatch, jobs: Sequence[tuple[list[int], SamplingParams]], steps: int = 12
) -> list[list[int]]:
    """Each job's tokens over `steps` steps, all of them added at once (slots in job order)."""
    slots = [runner.add(ids, sampling, len(ids) + steps + 1) for ids, sampling in jobs]
    got: list[list[int]] = [[] for _ in jobs]
    try:
        while min(len(t) for t in got) < steps:
            out = runner.step()
            assert not out.failed
            for i, slot in enumerate(slots):
                if slot in out.tokens and len(got[i]) < steps:
                    got[i].append(out.tokens[slot])
    finally:
        for slot in slots:
            runner.drop(slot)
    return got


def test_a_seeded_row_says_the_same_alone_and_in_any_batch(runner: SlotBatch) -> None:
    ids = prompt(20, 1)
    (alone,) = sample(runner, [(ids, SEEDED)])
    others = [(prompt(7 + 9 * i, 10 + i), s) for i, s in enumerate(OTHERS)]
    first = sample(runner, [others[0], (ids, SEEDED), *others[1:]])[1]  # in slot 1 of 4
    last = sample(runner, [*others[:2], (ids, SEEDED)])[2]  # slot 2 of 3, other neighbours
    assert first == alone and last == alone
    assert sample(runner, [(ids, SEEDED)])[0] == alone  # the seed repeats
    reseeded = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=22, ignore_eos=True)
    assert sample(runner, [(ids, reseeded)])[0] != alone
    greedy = sample(runner, [(ids, SamplingParams(max_tokens=12, temperature=0.0))])[0]
    assert alone != greedy  # it really samples


def test_slot_batch_greedy_rows_beside_sampled_ones_say_what_generate_says(
    runner: SlotBatch, tiny_llamas: TinyLlamas
) -> None:
    _, model = tiny_llamas.random(context_length=1024, seed=2, initializer_range=0.1)
    assert isinstance(model, LlamaForCausalLM)
    ids = prompt(15, 2)
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    got = sample(runner, [(prompt(9, 3), OTHERS[1]), (ids, greedy), (prompt(30, 4), SEEDED)])[1]
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert got == out[0, len(ids) :].tolist()
    assert np.unique(got).size > 1


class BrokenGrammar(Constraint):
    """A real grammar whose checks raise, as an llguidance error would (fault injection)."""

    def accept(self, token: int) -> bool:
        raise RuntimeError("matcher in an error state")

    def bias(self, vocab_size: int) -> npt.NDArray[np.float32]:
        raise RuntimeError("matcher in an error state")


def test_a_row_whose_grammar_raises_fails_alone(grammars: Grammars) -> None:
    grammar = structured.grammar_for_schema({"enum": ["Да", "Нет"]}, "response_format")
    width = 128256
    real = grammars.constraint(grammar)
    broken = BrokenGrammar(real._matcher, real._stop_ids, grammars)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, seed=5)
    with_logprobs = SamplingParams(max_tokens=8, temperature=0.9, seed=6, logprobs=True, top_logprobs=2)
    healthy = {2: row(sampled, width), 3: row(with_logprobs, width)}
    batched = {0: row(sampled, width, broken), 1: row(with_logprobs, width, broken)} | {
        r: row(s, width) for r, s in ((2, sampled), (3, with_logprobs))
    }
    logits = logits_of(torch.Generator().manual_seed(8), 4, width)
    failed: dict[int, str] = {}
    got = pick_rows(batched, logits, failed)
    assert set(failed) == {0, 1} and all("matcher in an error state" in why for why in failed.values())
    assert set(got) == {2, 3}
    for r, seq in healthy.items():
        want = pick(seq, logits[r : r + 1])
        assert got[r][0] == want[0]
        assert_same_logprobs(got[r][1], want[1])
    with pytest.raises(RuntimeError, match="error state"):
        pick_rows({0: row(sampled, width, broken)}, logits[:1])
