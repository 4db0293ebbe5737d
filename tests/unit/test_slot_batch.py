"""The transformers engine's default decode path (SlotBatch over a SlotCache): greedy tokens equal
transformers' own `generate` for sequences of different lengths joining and leaving mid-run, long
prompts prefilled in chunks, a preempted sequence resuming and siblings sharing a prompt; the KV
store is allocated once, each row written at its own positions and left alone by the others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from bench.dynamic_batch import TorchBatch, with_dynamic_batch
from model import slot_attention
from model.decode_graphs import row_bucket, width_bucket
from model.engine import Engine
from model.scheduler import PREFILL_CHUNK_TOKENS
from model.slot_batch import SlotBatch
from model.slot_cache import CHUNK_POSITIONS, SlotCache, capacity_for
from model.types import SamplingParams
from tests.tiny_llama import TinyLlamas
from tests.unit.conftest import batch_engine

pytestmark = pytest.mark.timeout(120)

SLOTS = 4
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llamas: TinyLlamas) -> tuple[Path, LlamaForCausalLM]:
    """The batching tests' tiny random Llama (sharp attention: a wrong position, mask or row
    changes the greedy tokens), and the same weights in memory for `generate`."""
    return tiny_llamas.random(context_length=1024, seed=2, initializer_range=0.1)


@pytest.fixture(scope="module")
def engine(reference: tuple[Path, LlamaForCausalLM], model_cache: Path) -> Engine:
    return batch_engine(reference[0], model_cache, "transformers", SLOTS)


def runner_of(engine: Engine) -> SlotBatch:
    runner = engine.loaded.runner
    assert isinstance(runner, SlotBatch), "SlotBatch is the transformers engine's default"
    return runner


@pytest.fixture(scope="module")
def static_runner(engine: Engine) -> SlotBatch:
    """The same model with the CUDA graphs' shapes (rows and columns rounded up to buckets, the
    padding rows masked), run eagerly: what a captured graph computes, checked on the CPU."""
    return SlotBatch(engine.loaded.model, torch.device("cpu"), SLOTS, 1024, static_shapes=True)


@pytest.fixture(params=["eager", "rows apart", "static shapes"])
def runner(
    request: pytest.FixtureRequest, engine: Engine, static_runner: SlotBatch, monkeypatch: pytest.MonkeyPatch
) -> SlotBatch:
    """eager: one masked attention call per layer (these rows' lengths are too close to split);
    rows apart: every decode step attends one call per row, each over its own columns; static
    shapes: what a CUDA graph computes."""
    if request.param == "rows apart":
        monkeypatch.setattr(slot_attention, "ROWS_APART_PADDING", 0)
    return static_runner if request.param == "static shapes" else runner_of(engine)


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128000, (length,), generator=generator).tolist()


def generated(model: LlamaForCausalLM, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return list(out[0, len(ids) :].tolist())


@dataclass
class Job:
    ids: list[int]
    join: int = 0  # the step before which it is added
    leave: int | None = None  # the step before which it is dropped, if it does not run to the end
    share: str | None = None  # a job of the same prompt whose prefill it takes


def run(runner: SlotBatch, jobs: dict[str, Job], tokens: int = GREEDY.max_tokens) -> dict[str, list[int]]:
    """Drive the runner as the scheduler does: each job added at its step, dropped when it has
    `tokens` or at its leave step; what each sampled."""
    slots: dict[str, int] = {}
    got: dict[str, list[int]] = {key: [] for key in jobs}
    for step in range(500):
        for key, job in jobs.items():
            if job.join == step:
                share = slots.get(job.share) if job.share is not None else None
                slots[key] = runner.add(job.ids, GREEDY, len(job.ids) + tokens, share_from=share)
            if job.leave == step and key in slots:
                runner.drop(slots.pop(key))
        if not slots and step > max(job.join for job in jobs.values()):
            return got
        out = runner.step()
        assert not out.failed and not out.preempted
        for key, slot in list(slots.items()):
            if slot in out.tokens:
                got[key].append(out.tokens[slot])
                if len(got[key]) == tokens:
                    runner.drop(slots.pop(key))
    raise AssertionError("the jobs did not end")


def test_rows_joining_and_leaving_mid_run_say_what_generate_says(
    runner: SlotBatch, reference: tuple[Path, LlamaForCausalLM]
) -> None:
    model = reference[1]
    jobs = {
        "one token": Job(prompt(1, 1)),
        "short": Job(prompt(5, 2)),
        "middle": Job(prompt(37, 3), join=2),
        "leaves": Job(prompt(90, 4), leave=6),
        "late": Job(prompt(20, 5), join=7),  # takes the slot "leaves" freed, over its old KV
    }
    got = run(runner, jobs)
    for key, job in jobs.items():
        expected = generated(model, job.ids, GREEDY.max_tokens)
        assert got[key] == expected[: len(got[key])], key
    assert len(got["leaves"]) < GREEDY.max_tokens
    assert all(len(got[k]) == GREEDY.max_tokens for k in jobs if k != "leaves")


def test_long_prompts_prefilled_in_chunks_beside_decoding_rows(
    runner: SlotBatch, reference: tuple[Path, LlamaForCausalLM]
) -> None:
    model = reference[1]
    long = prompt(3 * PREFILL_CHUNK_TOKENS + 40, 6)
    jobs = {"decoding": Job(prompt(9, 7)), "long": Job(long, join=1), "longer": Job(prompt(700, 8), join=3)}
    got = run(runner, jobs)
    for key, job in jobs.items():
        assert got[key] == generated(model, job.ids, GREEDY.max_tokens), key


def test_a_preempted_sequence_resumes_from_its_tokens(
    runner: SlotBatch, reference: tuple[Path, LlamaForCausalLM]
) -> None:
    """What the scheduler does on preemption: drop the sequence, add it again later with its
    prompt and the tokens it had; it goes on as if never interrupted."""
    model = reference[1]
    ids = prompt(30, 9)
    first = run(runner, {"before": Job(ids, leave=5), "other": Job(prompt(12, 10))})["before"]
    assert 0 < len(first) < GREEDY.max_tokens
    rest = run(runner, {"after": Job(ids + first), "other": Job(prompt(50, 11))})["after"]
    assert first + rest == generated(model, ids, len(first) + GREEDY.max_tokens)


def test_siblings_take_the_prompt_kv_from_another_row(
    runner: SlotBatch, reference: tuple[Path, LlamaForCausalLM]
) -> None:
    model = reference[1]
    ids = prompt(400, 12)
    before = runner.shared_prefill_tokens
    jobs = {
        "decoding": Job(prompt(6, 13)),
        "first": Job(ids, join=1),
        "second": Job(ids, join=1, share="first"),
        "late": Job(ids, join=4, share="first"),  # after the first's prompt is in: copied from its row
    }
    got = run(runner, jobs)
    expected = generated(model, ids, GREEDY.max_tokens)
    assert [got[k] for k in ("first", "second", "late")] == [expected] * 3
    assert runner.shared_prefill_tokens - before == 2 * (len(ids) - 1)


def test_the_store_is_written_in_place_and_rows_keep_their_own_kv(
    engine: Engine, reference: tuple[Path, LlamaForCausalLM]
) -> None:
    """Decode steps write into the same allocation (no per-step copy); a row's columns hold
    exactly the KV the model computes for its sequence alone; dropping a row leaves every
    other row's KV as it was."""
    model = reference[1]
    runner = runner_of(engine)
    a, b = prompt(40, 14), prompt(15, 15)
    slot_a = runner.add(a, GREEDY, 64)
    slot_b = runner.add(b, GREEDY, 64)
    runner.step()  # both prompts in, nothing decodes yet
    layer = runner.cache.layers[0]
    assert layer.keys is not None
    storage = layer.keys.data_ptr()
    tokens_a: list[int] = []
    for _ in range(4):
        tokens_a.append(runner.step().tokens[slot_a])
    assert layer.keys.data_ptr() == storage, "a decode step reallocated the store"

    kept = layer.keys[slot_a, :, : len(a) + 3].clone()
    runner.drop(slot_b)
    tokens_a.append(runner.step().tokens[slot_a])
    assert torch.equal(layer.keys[slot_a, :, : len(a) + 3], kept)
    runner.drop(slot_a)

    with torch.inference_mode():
        alone = model(torch.tensor([a + tokens_a[:-1]]), use_cache=True).cache
    expected = alone.layers[0].keys[0]
    assert torch.allclose(layer.keys[slot_a, :, : expected.shape[1]], expected, atol=1e-5)


def test_capacity_grows_in_whole_chunks_at_least_doubling_up_to_the_context() -> None:
    assert capacity_for(1, 0, 1024) == CHUNK_POSITIONS
    assert capacity_for(CHUNK_POSITIONS, CHUNK_POSITIONS, 1024) == CHUNK_POSITIONS  # fits: unchanged
    assert capacity_for(CHUNK_POSITIONS + 1, CHUNK_POSITIONS, 1024) == 2 * CHUNK_POSITIONS
    assert capacity_for(700, 0, 1024) == 768
    assert capacity_for(769, 768, 1024) == 1024  # doubling capped at the context
    with pytest.raises(ValueError):
        capacity_for(1025, 1024, 1024)


def test_plans_write_each_row_at_its_own_position_and_mask_the_rest() -> None:
    cache = SlotCache(layers=1, slots=4, max_positions=1024)
    mask = cache.plan_decode(writes=[5, 0, 9], attends=[5, 0, 9], device=torch.device("cpu"))
    assert cache.plan is not None and cache.plan.width == 10 and cache.plan.rows == slice(0, 3)
    assert cache.plan.positions.flatten().tolist() == [5, 0, 9]
    assert mask.shape == (3, 1, 1, 10)
    assert mask[:, 0, 0].sum(dim=1).tolist() == [6, 1, 10]
    assert cache.capacity == CHUNK_POSITIONS

    mask = cache.plan_prefill(slot=2, start=3, count=4, device=torch.device("cpu"))
    assert cache.plan.rows == slice(2, 3) and cache.plan.positions.tolist() == [[3, 4, 5, 6]]
    assert mask.shape == (1, 1, 4, 7)
    assert mask[0, 0].sum(dim=1).tolist() == [4, 5, 6, 7]  # causal, over the row's earlier columns


def test_the_default_is_slot_batch_and_the_benchs_dynamic_cache_baseline_agrees(engine: Engine) -> None:
    """load_model's transformers runner is SlotBatch (runner_of asserts it); the earlier DynamicCache
    runner that bench/kv_cache.py measures it against, over the same weights, samples the same."""
    slot_batch = runner_of(engine)
    runner = with_dynamic_batch(engine.loaded).runner
    assert isinstance(runner, TorchBatch) and runner is not slot_batch
    ids = prompt(25, 16)
    slot = runner.add(ids, GREEDY, 64)
    tokens: list[int] = []
    while len(tokens) < GREEDY.max_tokens:
        out = runner.step()
        if slot in out.tokens:
            tokens.append(out.tokens[slot])
    runner.drop(slot)
    assert tokens == run(slot_batch, {"x": Job(ids)})["x"]


def test_buckets_round_rows_and_columns_up_for_a_few_graphs() -> None:
    assert [row_bucket(n, 64) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert row_bucket(5, 6) == 6  # never more rows than slots
    assert [width_bucket(w, 8192) for w in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 8192]
    assert width_bucket(3000, 2048) == 2048  # never past the context


def test_static_shapes_pad_rows_that_do_not_decode_without_touching_their_kv(
    static_runner: SlotBatch,
) -> None:
    """Three rows decode in a bucket of four: the fourth, mid-prefill, rides along; its prompt
    KV is the same as if it had prefilled alone."""
    runner = static_runner
    decoding = [runner.add(prompt(n, 20 + n), GREEDY, n + 16) for n in (3, 8, 5)]
    runner.step()
    long = runner.add(prompt(600, 30), GREEDY, 620)
    runner.step()  # the three decode (4 rows: the bucket), the long one prefills a chunk
    layer = runner.cache.layers[0]
    assert layer.keys is not None
    assert long == 3 and row_bucket(3, SLOTS) == 4  # the decode forward's bucket takes its row in
    kept = layer.keys[long, :, :PREFILL_CHUNK_TOKENS].clone()
    runner.step()
    assert torch.equal(layer.keys[long, :, :PREFILL_CHUNK_TOKENS], kept)
    for slot in (*decoding, long):
        runner.drop(slot)


def test_graphs_are_asked_for_on_cuda_only(engine: Engine) -> None:
    cpu = SlotBatch(engine.loaded.model, torch.device("cpu"), 2, 1024, graphs=True)
    assert cpu.graphs is None


def test_a_row_that_fills_the_context_fails_alone(engine: Engine) -> None:
    """A sequence at the context's end fails by itself; the others (a newer one too) go on."""
    runner = SlotBatch(engine.loaded.model, torch.device("cpu"), SLOTS, 48)
    old = runner.add(prompt(40, 1), GREEDY, 48)
    failed: dict[int, str] = {}
    new = None
    for step in range(20):
        if old in failed:
            break
        failed.update(runner.step().failed)
        if step == 2:  # the old row is past 43 of its 48 columns: a newer row joins
            new = runner.add(prompt(5, 2), GREEDY, 48)
    assert new is not None and set(failed) == {old} and "context is full" in failed[old]
    runner.drop(old)
    assert new in runner.step().tokens or new in runner.step().tokens  # the newer row decodes on


def test_rows_attend_apart_only_when_the_padding_they_skip_repays_the_calls() -> None:
    pad = slot_attention.ROWS_APART_PADDING
    assert not slot_attention.rows_apart([1800])  # one row: nothing to skip
    assert not slot_attention.rows_apart([1800] * 4)  # equal lengths: one call reads nothing extra
    assert not slot_attention.rows_apart([50, 50 + pad])  # pad/2 a row on average
    assert slot_attention.rows_apart([50, 50 + 2 * pad])  # pad a row
    assert slot_attention.rows_apart([1800, 50, 50, 50])


def test_the_cpu_runner_attends_through_the_row_splitting_sdpa(
    engine: Engine, static_runner: SlotBatch
) -> None:
    model = runner_of(engine)._model
    assert model.config._attn_implementation == slot_attention.SLOT_SDPA
    assert runner_of(engine)._rows_apart and not static_runner._rows_apart  # graphs need one call


def test_a_model_that_ignores_the_slot_cache_is_refused_not_answered_from(
    reference: tuple[Path, LlamaForCausalLM],
) -> None:
    # What an older transformers does with `cache=`: takes it as an unknown keyword and builds
    # its own cache, so the tokens would come from a one-token context, silently.
    model = reference[1]

    class Forgetful(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config, self.dtype = model.config, model.dtype

        def set_attn_implementation(self, name: str) -> None:
            pass  # keeps the shared test model's SDPA

        def forward(self, cache: object = None, **kwargs: object) -> object:
            return model(**kwargs)

    runner = SlotBatch(Forgetful(), torch.device("cpu"), 2, 1024)
    runner.add(prompt(1, 9), GREEDY, 20)  # one token: the first forward is a decode step
    with pytest.raises(RuntimeError, match="did not use the slot cache"):
        runner.step()


def test_a_grow_that_runs_out_of_memory_partway_still_counts_as_a_reallocation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CUDA graphs recorded over the old tensors are dropped by `generation` (model/decode_graphs.py):
    # a grow failing after the first layer leaves the capacity as it was but that layer's tensors new.
    cache = SlotCache(3, 2, 4 * CHUNK_POSITIONS)
    cache.reserve(1)
    layers = cache._slot_layers()
    for layer in layers:
        layer.lazy_initialization(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    before, first = cache.generation, layers[0].keys

    def out_of_memory(capacity: int) -> None:
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(layers[1], "grow", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.reserve(CHUNK_POSITIONS + 1)
    assert cache.capacity == CHUNK_POSITIONS
    assert layers[0].keys is not first and layers[0].keys.shape[2] == 2 * CHUNK_POSITIONS
    assert cache.generation != before
