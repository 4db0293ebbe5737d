"""Continuous batching through the engine's scheduler, on each backend with 4 slots: sequences
join and leave a running batch, long prompts prefill in chunks, and one sequence's failure or
cancellation leaves the others' text exactly as it would have been."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

import pytest

from model.engine import Engine
from model.generation import Generation, Output
from model.prefill import PrefillPolicy
from model.scheduler import Event, Failure
from model.types import Backend, ChatMessage, Completion, SampledLogprobs, SamplingParams, TextDelta
from tests.unit.conftest import batch_engine

pytestmark = pytest.mark.timeout(120)

SLOTS = 4
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
QUESTIONS = ("Расскажи про космос кратко.", "Hi!", "Напиши поэму о море, длинную и красивую.", "2+2?")


@pytest.fixture(scope="module")
def batched(batch_llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    return batch_engine(batch_llama3_dir, model_cache, backend, SLOTS)


@pytest.fixture(scope="module")
def paced(batch_llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    """Batched, with a prefill policy that puts at most a few dozen tokens in each step (a tiny
    model prefills a whole 600-token prompt within the default half-second step)."""
    policy = PrefillPolicy(stall_seconds=1e-4, first_chunk=32)
    return batch_engine(batch_llama3_dir, model_cache, backend, SLOTS, prefill=policy)


@pytest.fixture(scope="module")
def single(batch_llama3_dir: Path, backend: Backend, model_cache: Path) -> Engine:
    return batch_engine(batch_llama3_dir, model_cache, backend, 1)


def alone(engine: Engine, question: str, sampling: SamplingParams = GREEDY) -> list[Output]:
    return list(engine.stream(engine.prepare([ChatMessage("user", question)]), sampling))


def text(outputs: list[Output] | list[Event]) -> str:
    return "".join(o.text for o in outputs if isinstance(o, TextDelta))


def drive(engine: Engine, steps: int | None = None) -> dict[Hashable, list[Event]]:
    """Step the scheduler until it is idle (or `steps` times); each key's outputs in order."""
    seen: dict[Hashable, list[Event]] = {}
    n = 0
    while not engine.scheduler.idle and (steps is None or n < steps):
        for key, event in engine.scheduler.step():
            seen.setdefault(key, []).append(event)
        n += 1
        assert n < 10_000, "the scheduler never went idle"
    return seen


def submit(engine: Engine, key: Hashable, question: str, sampling: SamplingParams = GREEDY) -> Generation:
    generation = engine.generation(engine.prepare([ChatMessage("user", question)]), sampling)
    engine.scheduler.submit(key, generation)
    return generation


def test_four_at_once_give_each_the_text_it_gets_alone(batched: Engine, single: Engine) -> None:
    expected = {q: alone(single, q) for q in QUESTIONS}
    for q in QUESTIONS:
        submit(batched, q, q)
    seen = drive(batched)
    assert batched.scheduler.last_batch_size <= SLOTS
    for q in QUESTIONS:
        assert text(seen[q]) == text(expected[q]), q
        assert seen[q][-1] == expected[q][-1]  # the same Completion: reason and token counts


def test_more_jobs_than_slots_wait_and_all_finish(batched: Engine, single: Engine) -> None:
    questions = [f"{q} ({i})" for i in range(3) for q in QUESTIONS]  # 12 jobs, 4 slots
    for q in questions:
        submit(batched, q, q)
    seen: dict[Hashable, list[Event]] = {}
    while not batched.scheduler.idle:
        assert batched.scheduler.running <= SLOTS
        for key, event in batched.scheduler.step():
            seen.setdefault(key, []).append(event)
    for q in questions:
        assert isinstance(seen[q][-1], Completion)
        assert text(seen[q]) == text(alone(single, q)), q


def test_join_mid_run_and_cancel_one_leave_the_others_unchanged(batched: Engine, single: Engine) -> None:
    a, b, c = QUESTIONS[0], QUESTIONS[2], QUESTIONS[3]
    submit(batched, "a", a)
    submit(batched, "b", b)
    seen = drive(batched, steps=6)
    submit(batched, "c", c)  # joins while a and b are mid-generation
    for key, event in batched.scheduler.stop("b"):  # leaves mid-generation
        seen.setdefault(key, []).append(event)
    for key, events in drive(batched).items():
        seen.setdefault(key, []).extend(events)
    assert text(seen["a"]) == text(alone(single, a))
    assert text(seen["c"]) == text(alone(single, c))
    cancelled = seen["b"][-1]
    assert isinstance(cancelled, Completion) and cancelled.finish_reason == "cancelled"
    assert text(alone(single, b)).startswith(text(seen["b"]))


def test_a_long_prompt_prefills_in_chunks_without_stalling_running_streams(
    paced: Engine, single: Engine
) -> None:
    batched = paced
    # Enough budget to outlast the prefill, decode-only steps between its chunks included.
    sampling = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    running = [submit(batched, q, q, sampling) for q in ("Hi!", "2+2?")]
    drive(batched, steps=3)  # both are decoding now
    long_question = "Раз два три. " * 120  # ~600 prompt tokens: several prefill chunks
    long = submit(batched, "long", long_question)
    prefill_steps = 0
    seen: dict[Hashable, list[Event]] = {}
    while long.generated == 0:
        before = [g.generated for g in running]
        for key, event in batched.scheduler.step():
            seen.setdefault(key, []).append(event)
        prefill_steps += 1
        # Every step of the long prompt's prefill also decoded a token of each running stream.
        assert [g.generated for g in running] == [n + 1 for n in before]
    assert prefill_steps >= 3  # it was chunked, not swallowed in one step
    for key, events in drive(batched).items():
        seen.setdefault(key, []).extend(events)
    assert text(seen["long"]) == text(alone(single, long_question))


class _BreaksAtToken(Generation):
    """A generation whose own decoding raises at its third token (as a detokenizer bug would)."""

    def feed(self, token: int, logprob: SampledLogprobs | None = None) -> list[Output]:
        if self.generated == 2:
            raise ValueError("broken sequence")
        return super().feed(token, logprob)


def test_a_sequence_that_raises_fails_alone(batched: Engine, single: Engine) -> None:
    for q in QUESTIONS[:3]:
        submit(batched, q, q)
    broken = _BreaksAtToken(
        batched.prepare([ChatMessage("user", "boom")]),
        GREEDY,
        tokenizer=batched.loaded.tokenizer,
        stop_ids=frozenset(),
        context_length=batched.context_length,
    )
    batched.scheduler.submit("broken", broken)
    seen = drive(batched)
    assert isinstance(seen["broken"][-1], Failure)
    for q in QUESTIONS[:3]:
        assert text(seen[q]) == text(alone(single, q))


def test_sampled_sequences_keep_their_own_seeds_in_a_batch(batched: Engine, single: Engine) -> None:
    sampling = [SamplingParams(max_tokens=16, temperature=1.5, top_p=1.0, seed=s) for s in (1, 2, 3)]
    for i, s in enumerate(sampling):
        submit(batched, i, QUESTIONS[0], s)
    seen = drive(batched)
    texts = [text(seen[i]) for i in range(3)]
    assert texts == [text(alone(single, QUESTIONS[0], s)) for s in sampling]
    assert len(set(texts)) == 3  # different seeds, different samples


def test_sequences_outgrowing_the_kv_pool_are_preempted_and_resume(
    batched: Engine, single: Engine, backend: Backend
) -> None:
    if backend != "llama.cpp":
        pytest.skip("only the llama.cpp engine shares one fixed KV pool across its slots")
    # 4 x (about 20 prompt + 400 generated) positions outgrow the 1024 the model's context gives.
    sampling = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    questions = [f"{q} [{i}]" for i, q in enumerate(QUESTIONS)]
    for q in questions:
        submit(batched, q, q, sampling)
    seen = drive(batched)
    for q in questions:
        done = seen[q][-1]
        assert isinstance(done, Completion) and (done.finish_reason, done.completion_tokens) == (
            "length",
            400,
        )
        assert text(seen[q]) == text(alone(single, q, sampling)), q
