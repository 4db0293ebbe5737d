"""What one request and one batch measured, and the summaries the report prints."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestSample:
    """One streamed generation as its client saw it (seconds from sending the request)."""

    ttft_s: float
    total_s: float
    completion_tokens: int
    queue_wait_s: float | None = None
    job_id: str | None = None
    error: str | None = None

    @property
    def decode_tps(self) -> float | None:
        """Tokens after the first over the time after the first."""
        span = self.total_s - self.ttft_s
        if self.error or self.completion_tokens < 2 or span <= 0:
            return None
        return (self.completion_tokens - 1) / span


@dataclass
class BatchResult:
    """`concurrency` clients streaming at once; one per system, concurrency and round."""

    system: str
    concurrency: int
    round: int
    wall_s: float
    samples: list[RequestSample] = field(default_factory=list)

    @property
    def aggregate_tps(self) -> float:
        tokens = sum(s.completion_tokens for s in self.samples if not s.error)
        return tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "aggregate_tps": self.aggregate_tps,
            "samples": [{**asdict(s), "decode_tps": s.decode_tps} for s in self.samples],
        }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    p95: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), percentile(values, 95), len(values))


@dataclass(frozen=True)
class Summary:
    """Everything the table shows for one system at one concurrency, over all rounds."""

    system: str
    concurrency: int
    ttft_s: Spread | None
    decode_tps: Spread | None
    aggregate_tps: Spread | None
    queue_wait_s: Spread | None
    requests: int
    errors: int

    @classmethod
    def of(cls, batches: list[BatchResult]) -> Summary:
        samples = [s for b in batches for s in b.samples]
        ok = [s for s in samples if not s.error]
        return cls(
            system=batches[0].system,
            concurrency=batches[0].concurrency,
            ttft_s=Spread.of([s.ttft_s for s in ok]),
            decode_tps=Spread.of([d for s in ok if (d := s.decode_tps) is not None]),
            aggregate_tps=Spread.of([b.aggregate_tps for b in batches]),
            queue_wait_s=Spread.of([s.queue_wait_s for s in ok if s.queue_wait_s is not None]),
            requests=len(samples),
            errors=len(samples) - len(ok),
        )
