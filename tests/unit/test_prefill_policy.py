"""The prefill policy (model/prefill.py) driven by simulated step times: big chunks, each step
within the stall bound, spaced so prefill takes its share of the time, on a CPU-like cost (small
chunks cost more per token) and a GPU-like one (prefill nearly free beside a decode step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from model.prefill import PrefillPace, PrefillPolicy

DECODE_S = 0.015  # a decode-only step of a few streams


def cpu_cost(tokens: int) -> float:
    """Seconds `tokens` prompt tokens add to a step: a fixed cost per call spread over the chunk,
    as a CPU's matrix kernels run small batches less efficiently."""
    return 0.03 + 0.003 * tokens


def gpu_cost(tokens: int) -> float:
    return 0.002 + 0.00002 * tokens


@dataclass
class Run:
    steps: list[tuple[int, float]]  # (prompt tokens fed, step seconds)

    @property
    def prefill_s(self) -> float:
        return sum(s for t, s in self.steps if t)

    @property
    def total_s(self) -> float:
        return sum(s for _, s in self.steps)

    @property
    def chunks(self) -> list[int]:
        return [t for t, _ in self.steps if t]


def prefill_beside_streams(pace: PrefillPace, prompt: int, cost: Callable[[int], float]) -> Run:
    """Steps while streams decode until `prompt` tokens are in, after a few decode-only steps."""
    for _ in range(5):
        pace.observe(DECODE_S, decoded=3, prefilled=0)
    steps, left = [], prompt
    while left:
        assert len(steps) < 10_000
        tokens = min(pace.chunk(), left)
        seconds = DECODE_S + (cost(tokens) if tokens else 0.0)
        pace.observe(seconds, decoded=3, prefilled=tokens)
        steps.append((tokens, seconds))
        left -= tokens
    return Run(steps)


def test_on_a_cpu_chunks_grow_to_the_stall_bound_and_prefill_takes_its_share() -> None:
    policy = PrefillPolicy(stall_seconds=0.5, share=0.75)
    run = prefill_beside_streams(PrefillPace(policy), 3500, cpu_cost)
    assert run.chunks[0] == policy.first_chunk
    # Once measured, each chunk fills a step of about the stall bound, never more.
    assert all(s <= policy.stall_seconds * 1.05 for _, s in run.steps)
    fills = (policy.stall_seconds - DECODE_S - cpu_cost(0)) / (cpu_cost(1) - cpu_cost(0))
    assert min(run.chunks[1:-1]) >= 0.9 * fills  # big: near the most that fits in the bound
    # Decode-only steps between chunks: the streams run at their own pace a quarter of the time.
    fed = [t for t, _ in run.steps]
    assert all(after == 0 for before, after in zip(fed, fed[1:], strict=False) if before)
    assert run.prefill_s / run.total_s == pytest.approx(0.75, abs=0.05)
    # Against the whole prompt in one step: slower by about 1 / share, not by the small-chunk cost.
    assert run.total_s / (DECODE_S + cpu_cost(3500)) < 1.5


@pytest.mark.parametrize("share", [0.5, 0.9])
def test_the_share_moves_the_balance(share: float) -> None:
    run = prefill_beside_streams(PrefillPace(PrefillPolicy(share=share)), 3500, cpu_cost)
    assert run.prefill_s / run.total_s == pytest.approx(share, abs=0.05)


def test_a_share_of_one_puts_a_chunk_in_every_step() -> None:
    run = prefill_beside_streams(PrefillPace(PrefillPolicy(share=1.0)), 3500, cpu_cost)
    assert all(t for t, _ in run.steps)


def test_on_a_gpu_chunks_reach_the_batch_and_prefill_rides_nearly_every_step() -> None:
    policy = PrefillPolicy()
    run = prefill_beside_streams(PrefillPace(policy), 20_000, gpu_cost)
    assert max(run.chunks) == policy.max_chunk
    decode_only = sum(1 for t, _ in run.steps if not t)
    assert decode_only <= 2 * len(run.chunks)  # a few decode steps at most per chunk


def test_a_prompt_alone_does_not_leave_the_next_streams_owed_a_pause() -> None:
    pace = PrefillPace()
    prefill_beside_streams(pace, 300, cpu_cost)
    assert pace.chunk() == 0  # the streams are owed their time after the last chunk
    pace.observe(0.4, decoded=0, prefilled=2048)  # then a prompt with nothing else decoding
    assert pace.chunk() > 0


@pytest.mark.parametrize("kwargs", [{"stall_seconds": 0}, {"share": 0}, {"share": 1.5}])
def test_a_policy_out_of_range_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PrefillPolicy(**kwargs)


def test_a_chunk_that_cost_nothing_measurable_leaves_the_estimate_as_it_was() -> None:
    pace = PrefillPace(PrefillPolicy(stall_seconds=0.5, share=1.0))
    pace.observe(0.01, decoded=3, prefilled=0)
    assert pace.chunk() == pace.policy.first_chunk
    pace.observe(0.005, decoded=3, prefilled=64)  # faster than the decode-only step before it
    assert pace.chunk() == pace.policy.first_chunk  # no estimate yet: still the first guess
    pace.observe(0.01 + 64 * 0.002, decoded=3, prefilled=64)  # 2 ms a token
    sized = pace.chunk()
    pace.observe(0.009, decoded=3, prefilled=sized)  # noise: cheaper than decoding alone
    assert pace.chunk() == sized == int((0.5 - 0.01) / 0.002)
