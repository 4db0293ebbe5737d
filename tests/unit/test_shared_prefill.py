"""A request's `n` choices share their prompt's prefill, on each backend: siblings of one prompt
take its KV from the first instead of computing it again, and each still says exactly what it
says alone (greedy or with its own seed), whether the first ends early or they outnumber the slots.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from pathlib import Path

import pytest

from model.engine import Engine
from model.generation import Generation
from model.prefill import PrefillPolicy
from model.scheduler import Failure
from model.types import Backend, ChatMessage, Completion, Prompt, SamplingParams
from tests.unit.conftest import batch_engine

pytestmark = pytest.mark.timeout(120)

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
QUESTION = "Расскажи про космос кратко."
LONG_QUESTION = "Раз два три. " * 120  # ~600 prompt tokens: prefilled in chunks beside a decoding one


@pytest.fixture(scope="module")
def batched(batch_llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    # Prompts go in small chunks, one every step (a tiny model would take a whole prompt in the
    # default half-second step), so a sibling can be stopped mid-prefill.
    policy = PrefillPolicy(stall_seconds=1e-4, share=1.0, first_chunk=32)
    return batch_engine(batch_llama3_dir, model_cache, backend, 4, prefill=policy)


@pytest.fixture(scope="module")
def two_slots(batch_llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    return batch_engine(batch_llama3_dir, model_cache, backend, 2)


@pytest.fixture(scope="module")
def single(batch_llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    return batch_engine(batch_llama3_dir, model_cache, backend, 1)


def prompt_of(engine: Engine, question: str) -> Prompt:
    return engine.prepare([ChatMessage("user", question)])


def alone(engine: Engine, question: str, sampling: SamplingParams) -> list[int]:
    """The tokens one generation samples with nothing else running."""
    generation = engine.generation(prompt_of(engine, question), sampling)
    engine.scheduler.submit("alone", generation)
    drive(engine)
    return generation.tokens


def drive(engine: Engine, steps: int | None = None) -> dict[Hashable, Completion]:
    """Step until idle (or `steps` times); each key's Completion."""
    done: dict[Hashable, Completion] = {}
    n = 0
    while not engine.scheduler.idle and (steps is None or n < steps):
        for key, event in engine.scheduler.step():
            assert not isinstance(event, Failure), event
            if isinstance(event, Completion):
                done[key] = event
        n += 1
        assert n < 5_000, "the scheduler never went idle"
    return done


def siblings(engine: Engine, prompt: Prompt, samplings: list[SamplingParams]) -> list[Generation]:
    """Choices of one request, as tasks/slots.py submits them: one Prompt object, keys (job, i)."""
    generations = [engine.generation(prompt, s) for s in samplings]
    for i, generation in enumerate(generations):
        engine.scheduler.submit(("job", i), generation)
    return generations


def shared(engine: Engine) -> int:
    return engine.loaded.runner.shared_prefill_tokens


def test_greedy_siblings_share_the_prefill_and_say_what_one_says_alone(
    batched: Engine, single: Engine
) -> None:
    expected = alone(single, QUESTION, GREEDY)
    prompt = prompt_of(batched, QUESTION)
    before = shared(batched)
    generations = siblings(batched, prompt, [GREEDY] * 3)
    done = drive(batched)
    assert [g.tokens for g in generations] == [expected] * 3
    assert [done["job", i].completion_tokens for i in range(3)] == [GREEDY.max_tokens] * 3
    assert shared(batched) - before == 2 * (len(prompt.token_ids) - 1)


def test_sampled_siblings_keep_their_own_seeds(batched: Engine, single: Engine) -> None:
    samplings = [
        SamplingParams(max_tokens=16, temperature=1.5, top_p=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)
    ]
    expected = [alone(single, QUESTION, s) for s in samplings]
    prompt = prompt_of(batched, QUESTION)
    before = shared(batched)
    generations = siblings(batched, prompt, samplings)
    drive(batched)
    assert [g.tokens for g in generations] == expected
    assert len({tuple(t) for t in expected}) == 3  # different seeds, different samples
    assert shared(batched) - before == 2 * (len(prompt.token_ids) - 1)


def test_siblings_finish_when_the_first_is_stopped_mid_prefill(batched: Engine, single: Engine) -> None:
    expected = alone(single, LONG_QUESTION, GREEDY)
    other = alone(single, "Hi!", GREEDY)
    background = batched.generation(prompt_of(batched, "Hi!"), GREEDY)
    batched.scheduler.submit("other", background)
    drive(batched, steps=2)  # it decodes, so the long prompt goes in chunks
    prompt = prompt_of(batched, LONG_QUESTION)
    head = len(prompt.token_ids) - 1
    before = shared(batched)
    generations = siblings(batched, prompt, [GREEDY] * 3)
    drive(batched, steps=1)  # the first has prefilled one chunk; the others wait for the rest
    assert generations[0].generated == 0 and shared(batched) == before
    stopped = batched.scheduler.stop(("job", 0))
    assert isinstance(stopped[-1][1], Completion) and stopped[-1][1].finish_reason == "cancelled"
    done = drive(batched)
    assert [g.tokens for g in generations[1:]] == [expected] * 2
    assert {done["job", 1].finish_reason, done["job", 2].finish_reason} == {"length"}
    assert background.tokens == other
    # The second took the chunk the first had and prefilled the rest; the third took it all.
    assert head < shared(batched) - before < 2 * head


def test_a_sibling_whose_first_ends_before_any_prefill_prefills_alone(
    batched: Engine, single: Engine
) -> None:
    question = "Что такое звезда?"  # asked nowhere else: no slot holds its prompt
    expected = alone(single, question, GREEDY)
    runner = batched.loaded.runner
    assert batched.scheduler.idle
    ids = prompt_of(batched, question).token_ids
    before = shared(batched)
    first = runner.add(ids, GREEDY, len(ids) + 32)
    follower = runner.add(ids, GREEDY, 32, share_from=first)
    runner.drop(first)  # before a single step: it takes only what llama.cpp's slot kept of a prior prompt
    tokens: list[int] = []
    while len(tokens) < GREEDY.max_tokens:
        out = runner.step()
        assert not out.failed and not out.preempted
        if follower in out.tokens:
            tokens.append(out.tokens[follower])
    runner.drop(follower)
    assert tokens == expected
    assert shared(batched) - before < len(ids) - 1


def test_more_siblings_than_slots_all_finish_and_late_ones_share_from_a_decoding_one(
    two_slots: Engine, single: Engine
) -> None:
    # Choice budgets differ here (a request's do not) so that the third is admitted while the
    # second is still decoding and takes the prompt's KV from its running sequence.
    samplings = [
        SamplingParams(max_tokens=m, temperature=1.0, top_p=1.0, seed=7 + m, ignore_eos=True)
        for m in (6, 24, 12)
    ]
    expected = [alone(single, QUESTION, s) for s in samplings]
    prompt = prompt_of(two_slots, QUESTION)
    before = shared(two_slots)
    generations = siblings(two_slots, prompt, samplings)
    done = drive(two_slots)
    assert [g.tokens for g in generations] == expected
    assert [done["job", i].completion_tokens for i in range(3)] == [6, 24, 12]
    assert shared(two_slots) - before == 2 * (len(prompt.token_ids) - 1)


def test_siblings_outgrowing_the_kv_pool_are_preempted_and_resume(
    batched: Engine, single: Engine, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    if backend != "llama.cpp":
        pytest.skip("only the llama.cpp engine shares one fixed KV pool across its slots")
    # 3 x (about 20 prompt + 400 generated) positions outgrow the 1024 the model's context
    # gives, even with the prompt's cells held once: the newest is put out, and resumes alone.
    sampling = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    expected = alone(single, QUESTION, sampling)
    generations = siblings(batched, prompt_of(batched, QUESTION), [sampling] * 3)
    with caplog.at_level(logging.INFO, logger="model.scheduler"):
        done = drive(batched)
    assert any("preempted" in r.message for r in caplog.records)
    assert [g.tokens for g in generations] == [expected] * 3
    assert all(done["job", i].completion_tokens == 400 for i in range(3))
