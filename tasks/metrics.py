"""Service metrics kept in Redis, so every worker's figures reach the scrape of any API instance.

Workers add to their model's hash (keys.metrics_of) when a job ends (tokens, latencies as
histogram buckets); the job scripts count every ending there too (tasks/jobs.py), including
endings no worker saw (reaped, cancelled while queued). The API turns the hashes into Prometheus
metrics with vLLM's names, labelled by model.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

from tasks import keys

# Bucket bounds (seconds), as vLLM uses for the same histograms.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)

# Sequences a worker's loop decoded together in one step; its buckets are batch sizes, not seconds.
BATCH_SIZE_HISTOGRAM = "sequences_per_step"

HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "time_to_first_token_seconds": TTFT_BUCKETS,
    "time_per_output_token_seconds": TPOT_BUCKETS,
    "e2e_request_latency_seconds": LATENCY_BUCKETS,
    "request_queue_time_seconds": LATENCY_BUCKETS,
    BATCH_SIZE_HISTOGRAM: (1, 2, 4, 8, 16, 32, 64, 128, 256),
}


@dataclass(frozen=True)
class JobTimings:
    """What one finished generation contributes to the metrics."""

    queue_seconds: float
    ttft_seconds: float | None  # None when no token was produced
    e2e_seconds: float
    prompt_tokens: int
    generation_tokens: int


def bucket_index(bounds: Sequence[float], value: float) -> int:
    """Index of the first bound >= value; len(bounds) means +Inf."""
    return bisect.bisect_left(bounds, value)


def _observe(pipe: redis.client.Pipeline, key: str, name: str, value: float, times: int = 1) -> None:
    """Count `value` into histogram `name` of hash `key`, `times` times over."""
    pipe.hincrby(key, f"{name}:bucket:{bucket_index(HISTOGRAMS[name], value)}", times)
    pipe.hincrbyfloat(key, f"{name}:sum", value * times)
    pipe.hincrby(key, f"{name}:count", times)


def record(client: redis.Redis, model: str, timings: JobTimings) -> None:
    """Add one job's figures to its model's hash (one round trip)."""
    key = keys.metrics_of(model)
    pipe = client.pipeline(transaction=False)
    _observe(pipe, key, "request_queue_time_seconds", timings.queue_seconds)
    _observe(pipe, key, "e2e_request_latency_seconds", timings.e2e_seconds)
    if timings.ttft_seconds is not None:
        _observe(pipe, key, "time_to_first_token_seconds", timings.ttft_seconds)
        if timings.generation_tokens > 1:
            per_token = (timings.e2e_seconds - timings.ttft_seconds) / (timings.generation_tokens - 1)
            _observe(pipe, key, "time_per_output_token_seconds", per_token)
    pipe.hincrby(key, "prompt_tokens", timings.prompt_tokens)
    pipe.hincrby(key, "generation_tokens", timings.generation_tokens)
    pipe.execute()


def record_batch_sizes(
    client: redis.Redis, model: str, counts: Mapping[int, int], shared_prefill_tokens: int = 0
) -> None:
    """Add a worker's count of steps by batch size, and the prompt tokens its sequences took from
    a sibling's prefill instead of computing, to its model's hash (one round trip)."""
    key = keys.metrics_of(model)
    pipe = client.pipeline(transaction=False)
    for size, steps in counts.items():
        _observe(pipe, key, BATCH_SIZE_HISTOGRAM, size, times=steps)
    if shared_prefill_tokens:
        pipe.hincrby(key, "shared_prefill_tokens", shared_prefill_tokens)
    pipe.execute()


@dataclass(frozen=True)
class Histogram:
    buckets: list[tuple[str, float]]  # cumulative counts by upper bound, "+Inf" last
    sum: float


def histograms(fields: Mapping[str, str]) -> dict[str, Histogram]:
    """The histograms in a metrics hash, with cumulative buckets as Prometheus wants them."""
    out = {}
    for name, bounds in HISTOGRAMS.items():
        counts = [int(fields.get(f"{name}:bucket:{i}", 0)) for i in range(len(bounds) + 1)]
        cumulative, total = [], 0
        for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
            total += count
            cumulative.append((bound, float(total)))
        out[name] = Histogram(cumulative, float(fields.get(f"{name}:sum", 0.0)))
    return out


def outcomes(fields: Mapping[str, str]) -> dict[str, int]:
    """How jobs ended: finish reasons (stop, length, time_limit, cancelled) and error codes."""
    return {k.removeprefix("outcome:"): int(v) for k, v in fields.items() if k.startswith("outcome:")}
