"""The transformers engine's batched decode, on the worker's runner (SlotBatch, the default) and on the
earlier DynamicCache runner that bench/kv_cache.py measures it against (TorchBatch,
bench/dynamic_batch.py): every sequence in a batch says exactly what it says alone, whoever joins or
leaves, however long a newcomer's prompt, in float32 and (the default runner) in NF4. The baseline is
tested because the benchmark's new/old ratios mean something only if the old path is correct."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.dynamic_batch import TorchBatch, with_dynamic_batch
from model.engine import Engine
from model.generation import Generation
from model.loading import load_model
from model.scheduler import PREFILL_CHUNK_TOKENS, Failure
from model.slot_batch import SlotBatch
from model.types import ChatMessage, Completion, Prompt, SamplingParams, TextDelta
from tests import needs
from tests.tiny_llama import TinyLlamas
from tests.unit.conftest import batch_engine

pytestmark = pytest.mark.timeout(60)

SLOTS = 4
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
# Different lengths, so every batch mixes rows with different amounts of left padding.
QUESTIONS = (
    "Hi.",
    "Расскажи про космос кратко, пожалуйста.",
    "Write a short poem about the sea, the wind and a lighthouse keeper who counts the waves at night.",
    "2+2?",
)


@pytest.fixture(scope="module")
def random_llama3(tiny_llamas: TinyLlamas) -> Path:
    """A tiny Llama with random weights and the real Llama-3 tokenizer: its attention really mixes
    positions, so a wrong mask, position or padded row changes the greedy tokens."""
    # 1024 positions: room for a prompt of several prefill chunks. The same model as
    # tests/unit/conftest.py's batch_llama3_dir for transformers, built once.
    path, _ = tiny_llamas.random(context_length=1024, seed=2, initializer_range=0.1)
    return path


@pytest.fixture(scope="module", params=["SlotBatch", "TorchBatch"])
def engine(request: pytest.FixtureRequest, random_llama3: Path, model_cache: Path) -> Engine:
    """The model as a worker loads it, on its own runner or on the bench's baseline in its place."""
    engine = batch_engine(random_llama3, model_cache, "transformers", SLOTS)
    assert isinstance(engine.loaded.runner, SlotBatch), "SlotBatch is the transformers engine's default"
    if request.param == "SlotBatch":
        return engine
    dynamic = Engine(with_dynamic_batch(engine.loaded))
    assert isinstance(dynamic.loaded.runner, TorchBatch)
    return dynamic


@dataclass
class Run:
    """What each generation said, and how many tokens it had after each step."""

    text: dict[Hashable, str] = field(default_factory=dict)
    done: dict[Hashable, Completion] = field(default_factory=dict)
    tokens_after_step: list[dict[Hashable, int]] = field(default_factory=list)


def drive(
    engine: Engine,
    jobs: dict[Hashable, tuple[Prompt, SamplingParams]],
    *,
    join_at: dict[Hashable, int] | None = None,
    stop_at: dict[Hashable, int] | None = None,
) -> Run:
    """Run jobs through the engine's scheduler: each submitted before step `join_at[key]` (default
    0), and cancelled before step `stop_at[key]`, until all have ended."""
    join_at, stop_at = join_at or {}, stop_at or {}
    scheduler = engine.scheduler
    assert scheduler.idle
    run = Run()
    generations: dict[Hashable, Generation] = {}
    for step in range(1000):
        if len(run.done) == len(jobs):
            return run
        for key, (prompt, sampling) in jobs.items():
            if join_at.get(key, 0) == step:
                generations[key] = engine.generation(prompt, sampling)
                scheduler.submit(key, generations[key])
        events = []
        for key, at in stop_at.items():
            if at == step:
                events += scheduler.stop(key)
        events += scheduler.step()
        for key, event in events:
            assert not isinstance(event, Failure), event
            if isinstance(event, TextDelta):
                run.text[key] = run.text.get(key, "") + event.text
            else:
                run.done[key] = event
        run.tokens_after_step.append({k: g.generated for k, g in generations.items() if k not in run.done})
    raise AssertionError("the generations did not end")


def alone(engine: Engine, prompt: Prompt, sampling: SamplingParams) -> tuple[str, Completion]:
    run = drive(engine, {"only": (prompt, sampling)})
    return run.text.get("only", ""), run.done["only"]


def prompts(engine: Engine) -> list[Prompt]:
    return [engine.prepare([ChatMessage("user", q)]) for q in QUESTIONS]


def assert_same_as_alone(
    engine: Engine, run: Run, jobs: dict[Hashable, tuple[Prompt, SamplingParams]]
) -> None:
    for key, (prompt, sampling) in jobs.items():
        text, done = alone(engine, prompt, sampling)
        assert (run.text.get(key, ""), run.done[key]) == (text, done), key


def test_greedy_batch_of_four_says_what_each_says_alone(engine: Engine) -> None:
    jobs: dict[Hashable, tuple[Prompt, SamplingParams]] = {
        i: (p, GREEDY) for i, p in enumerate(prompts(engine))
    }
    assert len({len(p.token_ids) for p, _ in jobs.values()}) == len(jobs), "lengths must differ"
    run = drive(engine, jobs)
    assert max(len(step) for step in run.tokens_after_step) == SLOTS, "all four must have run together"
    assert all(done.completion_tokens > 1 for done in run.done.values())
    assert_same_as_alone(engine, run, jobs)


def test_joining_and_leaving_mid_batch_leaves_the_others_unchanged(engine: Engine) -> None:
    """The longest prompt leaves mid-batch (its columns are trimmed), two join mid-generation."""
    hi, space, longest, sum_ = prompts(engine)
    jobs: dict[Hashable, tuple[Prompt, SamplingParams]] = {
        "longest": (longest, GREEDY),
        "first": (space, GREEDY),
        "second": (sum_, GREEDY),
        "last": (hi, GREEDY),
    }
    run = drive(engine, jobs, join_at={"second": 5, "last": 12}, stop_at={"longest": 9})
    assert run.done["longest"].finish_reason == "cancelled"
    text, _ = alone(engine, longest, GREEDY)
    assert text.startswith(run.text.get("longest", ""))
    assert_same_as_alone(engine, run, {k: v for k, v in jobs.items() if k != "longest"})


def test_long_prompt_prefills_in_chunks_while_the_others_keep_decoding(engine: Engine) -> None:
    long_prompt = engine.prepare([ChatMessage("user", "Tell me everything about the ocean. " * 80)])
    # All but the last prompt token are prefilled; the last is the first decode step's input.
    chunks = math.ceil((len(long_prompt.token_ids) - 1) / PREFILL_CHUNK_TOKENS)
    assert chunks >= 3
    budget = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    jobs: dict[Hashable, tuple[Prompt, SamplingParams]] = {
        "a": (prompts(engine)[0], budget),
        "b": (prompts(engine)[1], budget),
        "long": (long_prompt, GREEDY),
    }
    joins = 3
    run = drive(engine, jobs, join_at={"long": joins})
    for step in range(joins, joins + chunks + 1):
        before, after = run.tokens_after_step[step - 1], run.tokens_after_step[step]
        assert all(after[k] == before[k] + 1 for k in ("a", "b")), f"a stream stalled at step {step}"
    first_token = next(i for i, counts in enumerate(run.tokens_after_step) if counts.get("long", 0) > 0)
    assert first_token == joins + chunks, "one prefill chunk per step, then its first decode step"
    assert_same_as_alone(engine, run, jobs)


def test_one_token_prompts_join_a_batch_with_no_kv_of_their_own(engine: Engine) -> None:
    """A one-token prompt has nothing to prefill: its row is padding only until it decodes, alone,
    beside another such row (no layers at all yet), or joining rows that already hold KV."""
    bos = Prompt((engine.loaded.tokenizer.bos_token_id,))
    jobs: dict[Hashable, tuple[Prompt, SamplingParams]] = {
        "bos": (bos, GREEDY),
        "bos again": (bos, GREEDY),
        "question": (prompts(engine)[1], GREEDY),
        "late bos": (bos, GREEDY),
    }
    run = drive(engine, jobs, join_at={"late bos": 4})
    assert run.tokens_after_step[0] == {"bos": 1, "bos again": 1, "question": 0}
    assert_same_as_alone(engine, run, jobs)


def test_seeded_sampling_in_a_batch_matches_the_same_seed_alone(engine: Engine) -> None:
    jobs: dict[Hashable, tuple[Prompt, SamplingParams]] = {
        i: (p, SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=100 + i))
        for i, p in enumerate(prompts(engine))
    }
    run = drive(engine, jobs)
    assert len(set(run.text.values())) == len(jobs), "different seeds and prompts, different texts"
    assert_same_as_alone(engine, run, jobs)


def test_nf4_on_cpu_quantizes_and_batches_like_alone(random_llama3: Path, model_cache: Path) -> None:
    bnb = needs.module("bitsandbytes", "a dependency on Linux: pip install -e .")
    loaded = load_model(
        str(random_llama3),
        engine="transformers",
        device="cpu",
        dtype="float32",
        use_4bit=True,
        slots=SLOTS,
        cache_dir=model_cache,
        quantize_on_cpu=True,
    )
    assert loaded.quantization == "bnb-nf4"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    engine = Engine(loaded)
    jobs: dict[Hashable, tuple[Prompt, SamplingParams]] = {
        i: (p, GREEDY) for i, p in enumerate(prompts(engine))
    }
    run = drive(engine, jobs)
    assert_same_as_alone(engine, run, jobs)


def test_use_4bit_without_the_test_switch_stays_unquantized_on_cpu(
    random_llama3: Path, model_cache: Path
) -> None:
    loaded = load_model(
        str(random_llama3),
        engine="transformers",
        device="cpu",
        dtype="float32",
        use_4bit=True,
        slots=1,
        cache_dir=model_cache,
    )
    assert loaded.quantization is None
