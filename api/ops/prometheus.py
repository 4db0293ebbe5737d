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
class ModelFigures:
    """One model's share of the metrics: its hash (tasks/metrics.py) and its queue."""

    fields: dict[str, str]
    waiting: int  # interactive jobs of the model waiting in the queue
    running: int  # jobs its workers are generating (their heartbeats' count)


@dataclass(frozen=True)
class Snapshot:
    models: dict[str, ModelFigures]
    workers: list[dict[str, Any]]
    fields: dict[str, str] | None = None  # the figures of no one model (batches ended)
    batch_waiting: int = 0
    batch_running: int = 0
    batches: dict[str, int] | None = None  # batches not yet ended, by status
    webhooks: WebhookFigures | None = None


@dataclass(frozen=True)
class WebhookFigures:
    """Webhook deliveries (tasks/webhooks.py): counts by outcome, and what is still open."""

    counts: dict[str, str]  # created, delivered, failed, retried (failed attempts), attempts
    pending: int
    oldest_pending_seconds: float


class _SnapshotCollector(Collector):
    """Every per-request series carries `model_name`, one series per model, as vLLM's do."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._s = snapshot

    def collect(self) -> Iterator[Metric]:
        parts = (
            self._queues,
            self._batches,
            self._latencies,
            self._tokens,
            self._outcomes,
            self._workers,
            self._webhooks,
        )
        for part in parts:
            yield from part()

    def _gauge(self, name: str, help_text: str, value: float) -> Metric:
        gauge = GaugeMetricFamily(name, help_text)
        gauge.add_metric([], value)
        return gauge

    def _per_model(self, family: GaugeMetricFamily | CounterMetricFamily, value: Any) -> Metric:
        for model, figures in sorted(self._s.models.items()):
            family.add_metric([model], float(value(figures)))
        return family

    def _counter(self, name: str, help_text: str, field: str) -> Metric:
        counter = CounterMetricFamily(name, help_text, labels=["model_name"])
        return self._per_model(counter, lambda f: f.fields.get(field, 0))

    def _queues(self) -> Iterator[Metric]:
        s = self._s
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Requests waiting in the queue.", labels=["model_name"]
        )
        yield self._per_model(waiting, lambda f: f.waiting)
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Requests being generated.", labels=["model_name"]
        )
        yield self._per_model(running, lambda f: f.running)
        yield self._gauge(
            "llmq_batch_lines_waiting",
            "Batch lines queued (behind every interactive request).",
            s.batch_waiting,
        )
        yield self._gauge("llmq_batch_lines_running", "Batch lines being generated.", s.batch_running)

    def _batches(self) -> Iterator[Metric]:
        s = self._s
        batches = GaugeMetricFamily("llmq_batches", "Batches not yet ended, by status.", labels=["status"])
        for status in ("validating", "in_progress", "finalizing", "cancelling"):
            batches.add_metric([status], (s.batches or {}).get(status, 0))
        ended = CounterMetricFamily("llmq_batches_ended", "Batches that ended, by status.", labels=["status"])
        for status in ("completed", "failed", "expired", "cancelled"):
            ended.add_metric([status], float((s.fields or {}).get(f"batches_ended:{status}", 0)))
        yield from (batches, ended)

    def _latencies(self) -> Iterator[Metric]:
        help_texts = {f"vllm:{name}": text for name, text in _HELP.items()}
        help_texts["llmq_sequences_per_step"] = (
            "Histogram of sequences decoded together in one step of a worker's loop."
        )
        families = {
            name: HistogramMetricFamily(name, text, labels=["model_name"])
            for name, text in help_texts.items()
        }
        for model, figures in sorted(self._s.models.items()):
            for name, hist in metrics.histograms(figures.fields).items():
                wire = "llmq_sequences_per_step" if name == metrics.BATCH_SIZE_HISTOGRAM else f"vllm:{name}"
                families[wire].add_metric([model], hist.buckets, hist.sum)
        yield from families.values()

    def _tokens(self) -> Iterator[Metric]:
        yield self._counter(
            "llmq_shared_prefill_tokens",
            "Prompt tokens a sequence took from a sibling's prefill (n choices, equal prompts) "
            "instead of computing them.",
            "shared_prefill_tokens",
        )
        yield self._counter("vllm:prompt_tokens", "Prefill tokens processed.", "prompt_tokens")
        yield self._counter("vllm:generation_tokens", "Tokens generated.", "generation_tokens")

    def _outcomes(self) -> Iterator[Metric]:
        success = CounterMetricFamily(
            "vllm:request_success",
            "Finished requests by finish reason.",
            labels=["model_name", "finished_reason"],
        )
        failures = CounterMetricFamily(
            "llmq_request_failures", "Failed requests by error code.", labels=["model_name", "code"]
        )
        for model, figures in sorted(self._s.models.items()):
            totals: dict[str, int] = {}
            for outcome, count in metrics.outcomes(figures.fields).items():
                if outcome in _FINISHED_REASONS:
                    reason = _FINISHED_REASONS[outcome]
                    totals[reason] = totals.get(reason, 0) + count
                else:
                    failures.add_metric([model, outcome], count)
            for reason, count in sorted(totals.items()):
                success.add_metric([model, reason], count)
        yield from (success, failures)

    def _workers(self) -> Iterator[Metric]:
        workers = self._s.workers
        yield self._gauge(
            "llmq_workers_alive", "Workers with a fresh heartbeat and a loaded model.", len(workers)
        )
        yield self._gauge(
            "llmq_slots",
            "Generations the live workers can run at once (WORKER_SLOTS summed).",
            sum(int(w.get("slots", 1)) for w in workers),
        )
        info = GaugeMetricFamily(
            "llmq_worker_info",
            "One series per live worker, describing its model.",
            labels=["worker", "model_name", "engine", "device", "dtype", "quantization"],
        )
        for w in workers:
            fields = ("name", "model", "engine", "device", "dtype", "quantization")
            info.add_metric([str(w.get(k) or "none") for k in fields], 1)
        yield info

    def _webhooks(self) -> Iterator[Metric]:
        w = self._s.webhooks or WebhookFigures({}, 0, 0.0)
        deliveries = CounterMetricFamily(
            "llmq_webhook_deliveries",
            "Webhook deliveries (one event to one endpoint) that ended, by outcome.",
            labels=["outcome"],
        )
        for outcome in ("delivered", "failed"):
            deliveries.add_metric([outcome], float(w.counts.get(outcome, 0)))
        yield deliveries
        retried = CounterMetricFamily(
            "llmq_webhook_attempts_failed", "Webhook attempts not answered 2xx in time, then retried."
        )
        retried.add_metric([], float(w.counts.get("retried", 0)))
        yield retried
        yield self._gauge("llmq_webhook_deliveries_pending", "Webhook deliveries not yet ended.", w.pending)
        yield self._gauge(
            "llmq_webhook_oldest_pending_seconds",
            "Age of the oldest event not yet delivered (0 when none waits).",
            w.oldest_pending_seconds,
        )


def render(snapshot: Snapshot) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)
