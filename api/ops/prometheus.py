"""Prometheus exposition of the shared metrics (tasks/metrics.py), with vLLM's metric names so
existing vLLM dashboards work: one scrape of any API instance shows every worker's figures."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks import metrics

# Our finish reasons in vLLM's `finished_reason` vocabulary.
_FINISHED_REASONS = {"stop": "stop", "length": "length", "time_limit": "length", "cancelled": "abort"}

_HELP = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds (from request arrival).",
    "time_per_output_token_seconds": "Histogram of mean time per output token in seconds, per request.",
    "e2e_request_latency_seconds": "Histogram of end to end request latency in seconds.",
    "request_queue_time_seconds": "Histogram of time spent waiting in the queue in seconds.",
}


@dataclass(frozen=True)
class Snapshot:
    fields: dict[str, str]
    waiting: int
    running: int
    workers: list[dict[str, Any]]
    batch_waiting: int = 0
    batch_running: int = 0
    batches: dict[str, int] | None = None  # batches not yet ended, by status


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot, model: str) -> None:
        self._s = snapshot
        self._model = model

    def collect(self) -> Iterator[Metric]:
        s, model = self._s, [self._model]
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting in the queue.", labels=["model_name"]
        )
        waiting.add_metric(model, s.waiting)
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests being generated.", labels=["model_name"]
        )
        running.add_metric(model, s.running)
        yield from (waiting, running)
        batch_waiting = GaugeMetricFamily(
            "llmq_batch_lines_waiting", "Batch lines queued (behind every interactive request)."
        )
        batch_waiting.add_metric([], s.batch_waiting)
        batch_running = GaugeMetricFamily("llmq_batch_lines_running", "Batch lines being generated.")
        batch_running.add_metric([], s.batch_running)
        batches = GaugeMetricFamily("llmq_batches", "Batches not yet ended, by status.", labels=["status"])
        for status in ("validating", "in_progress", "finalizing", "cancelling"):
            batches.add_metric([status], (s.batches or {}).get(status, 0))
        ended = CounterMetricFamily("llmq_batches_ended", "Batches that ended, by status.", labels=["status"])
        for status in ("completed", "failed", "expired", "cancelled"):
            ended.add_metric([status], float(s.fields.get(f"batches_ended:{status}", 0)))
        yield from (batch_waiting, batch_running, batches, ended)

        histograms = metrics.histograms(s.fields)
        batch = histograms.pop(metrics.BATCH_SIZE_HISTOGRAM)
        for name, hist in histograms.items():
            family = HistogramMetricFamily(f"vllm:{name}", _HELP[name], labels=["model_name"])
            family.add_metric(model, hist.buckets, hist.sum)
            yield family
        per_step = HistogramMetricFamily(
            "llmq_sequences_per_step",
            "Histogram of sequences decoded together in one step of a worker's loop.",
            labels=["model_name"],
        )
        per_step.add_metric(model, batch.buckets, batch.sum)
        yield per_step
        shared = CounterMetricFamily(
            "llmq_shared_prefill_tokens",
            "Prompt tokens a sequence took from a sibling's prefill (n choices, equal prompts) "
            "instead of computing them.",
            labels=["model_name"],
        )
        shared.add_metric(model, float(s.fields.get("shared_prefill_tokens", 0)))
        yield shared

        for name, help_text in (
            ("prompt_tokens", "Prefill tokens processed."),
            ("generation_tokens", "Tokens generated."),
        ):
            counter = CounterMetricFamily(f"vllm:{name}", help_text, labels=["model_name"])
            counter.add_metric(model, float(s.fields.get(name, 0)))
            yield counter

        success = CounterMetricFamily(
            "vllm:request_success",
            "Finished requests by finish reason.",
            labels=["model_name", "finished_reason"],
        )
        failures = CounterMetricFamily(
            "llmq_request_failures", "Failed requests by error code.", labels=["model_name", "code"]
        )
        totals: dict[str, int] = {}
        for outcome, count in metrics.outcomes(s.fields).items():
            if outcome in _FINISHED_REASONS:
                reason = _FINISHED_REASONS[outcome]
                totals[reason] = totals.get(reason, 0) + count
            else:
                failures.add_metric([*model, outcome], count)
        for reason, count in sorted(totals.items()):
            success.add_metric([*model, reason], count)
        yield from (success, failures)

        alive = GaugeMetricFamily("llmq_workers_alive", "Workers with a fresh heartbeat and a loaded model.")
        alive.add_metric([], len(s.workers))
        slots = GaugeMetricFamily(
            "llmq_slots", "Generations the live workers can run at once (WORKER_SLOTS summed)."
        )
        slots.add_metric([], sum(int(w.get("slots", 1)) for w in s.workers))
        yield from (alive, slots)
        info = GaugeMetricFamily(
            "llmq_worker_info",
            "One series per live worker, describing its model.",
            labels=["worker", "model_name", "engine", "device", "dtype", "quantization"],
        )
        for w in s.workers:
            fields = ("name", "model", "engine", "device", "dtype", "quantization")
            labels = [str(w.get(k) or "none") for k in fields]
            info.add_metric(labels, 1)
        yield info


def render(snapshot: Snapshot, model: str) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, model))
    return generate_latest(registry)
