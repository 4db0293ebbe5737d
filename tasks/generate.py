"""The Celery task that runs one job on this worker's engine and reports it as events."""

from __future__ import annotations

import logging
import time
from typing import Literal

import redis

from model.types import Completion, ContextLengthExceeded, TextDelta
from tasks import events, jobs, keys, logs, metrics
from tasks.celery_app import app
from tasks.worker import WorkerRuntime, runtime

log = logging.getLogger(__name__)

# How often the generation loop asks Redis whether to stop: often enough to stop within a
# fraction of a second, rarely enough to cost nothing per token.
STOP_POLL_SECONDS = 0.1

StopReason = Literal["cancelled", "time_limit", "shutdown"]


class JobWriter:
    """Claims a job, appends its events and ends it, through the atomic scripts in tasks.jobs.

    Text deltas are coalesced: one that arrives within `stream_coalesce_seconds` of the last
    written delta waits for the next, and goes out with it. Each event costs a Redis round trip
    here and a pub/sub message, a JSON chunk and an SSE frame downstream; per token, at a hundred
    tokens a second on a small CPU machine, that work takes a large share of the cores the model
    decodes on. The first delta after a pause goes out at once (time to first token is
    unchanged), and pending text is written before any other event, the terminal one included.
    """

    def __init__(self, rt: WorkerRuntime, job_id: str) -> None:
        self._rt = rt
        self._job_id = job_id
        self._keys = jobs.job_keys(job_id)
        self._ttl = rt.settings.job_ttl_seconds
        self._window = rt.settings.stream_coalesce_seconds
        self._pending = ""
        self._last_delta = float("-inf")

    def claim(self) -> bool:
        lease = self._rt.settings.job_lease_seconds
        args: list[str | int] = [self._job_id, self._ttl, self._rt.name, repr(time.time()), lease]
        return bool(self._rt.scripts.claim(keys=self._keys, args=args))

    def delta(self, text: str) -> None:
        self._pending += text
        if time.monotonic() - self._last_delta >= self._window:
            self._flush()

    def write(self, event: events.AnyEvent) -> None:
        self._flush()
        self._append(event)

    def _flush(self) -> None:
        if self._pending:
            text, self._pending = self._pending, ""
            self._append(events.Delta(text=text))
            self._last_delta = time.monotonic()

    def _append(self, event: events.AnyEvent) -> None:
        self._rt.scripts.append(keys=self._keys, args=jobs.append_args(self._job_id, self._ttl, event))


class StopWatch:
    """The engine's should_stop: a cancel request, the time limit, or the worker shutting down.

    Polls Redis at a bounded rate; if Redis is briefly away it keeps generating and asks again.
    """

    def __init__(self, rt: WorkerRuntime, job_id: str) -> None:
        self._client = rt.redis
        self._keys = (keys.job_cancel(job_id), keys.worker_drain(rt.parent_name))
        self._deadline = time.monotonic() + rt.settings.max_generation_seconds
        self._next_check = 0.0
        self.reason: StopReason | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.reason is None and now >= self._deadline:
            self.reason = "time_limit"
        if self.reason is None and now >= self._next_check:
            self._next_check = now + STOP_POLL_SECONDS
            try:
                cancelled, draining = self._client.exists(self._keys[0]), self._client.exists(self._keys[1])
            except redis.RedisError:
                return False
            if cancelled:
                self.reason = "cancelled"
            elif draining:
                self.reason = "shutdown"
        return self.reason is not None


@app.task(name=keys.GENERATE_TASK)
def generate(spec_json: dict[str, object]) -> None:
    spec = jobs.JobSpec.model_validate(spec_json)
    logs.job_id_var.set(spec.id)
    rt = runtime()
    writer = JobWriter(rt, spec.id)
    if time.time() - spec.created_at > rt.settings.queue_timeout_seconds:
        # The reaper ends such jobs too; this covers a message that reaches us first.
        args = jobs.reap_args(rt.settings.job_ttl_seconds, rt.settings.queue_timeout_seconds)
        rt.scripts.reap(keys=[keys.RUNNING, keys.QUEUED], args=args)
        return
    if not writer.claim():
        log.info("job %s is no longer queued (cancelled, expired or already run); skipping", spec.id)
        return
    rt.current_job = spec.id
    try:
        _run(rt, spec, writer)
    except Exception:
        log.exception("job %s failed", spec.id)
        writer.write(events.Failed(code="internal_error", message="The generation failed."))
    finally:
        rt.current_job = None


def _run(rt: WorkerRuntime, spec: jobs.JobSpec, writer: JobWriter) -> None:
    if spec.model != rt.settings.model_name:
        message = f"This worker serves '{rt.settings.model_name}', not '{spec.model}'."
        writer.write(events.Failed(code="model_not_found", message=message))
        return
    try:
        prompt = rt.engine.prepare(spec.to_messages())
    except ContextLengthExceeded as exc:
        writer.write(events.Failed(code="context_length_exceeded", message=str(exc)))
        return
    claimed_at = time.time()
    writer.write(events.Started(prompt_tokens=len(prompt.token_ids), worker=rt.name))
    log.info(
        "generating: %d prompt tokens, waited %.3fs", len(prompt.token_ids), claimed_at - spec.created_at
    )
    watch = StopWatch(rt, spec.id)
    first_token_at: float | None = None
    for item in rt.engine.stream(prompt, spec.sampling.to_params(), should_stop=watch):
        if isinstance(item, TextDelta):
            first_token_at = first_token_at or time.time()
            writer.delta(item.text)
        elif isinstance(item, Completion):
            terminal = _terminal(item, watch.reason)
            writer.write(terminal)
            if isinstance(terminal, events.Finished) and terminal.finish_reason != "cancelled":
                _record_metrics(rt, spec, claimed_at, first_token_at, item)


def _record_metrics(
    rt: WorkerRuntime, spec: jobs.JobSpec, claimed_at: float, first_token_at: float | None, done: Completion
) -> None:
    timings = metrics.JobTimings(
        queue_seconds=claimed_at - spec.created_at,
        ttft_seconds=None if first_token_at is None else first_token_at - spec.created_at,
        e2e_seconds=time.time() - spec.created_at,
        prompt_tokens=done.prompt_tokens,
        generation_tokens=done.completion_tokens,
    )
    try:
        metrics.record(rt.redis, timings)
    except redis.RedisError as exc:  # metrics must never fail a finished job
        log.warning("could not record metrics for %s: %s", spec.id, exc)


def _terminal(done: Completion, stop: StopReason | None) -> events.Finished | events.Failed:
    if done.finish_reason == "cancelled" and stop == "shutdown":
        return events.Failed(
            code="worker_shutdown", message="The worker shut down before the generation finished."
        )
    reason = (
        "time_limit" if done.finish_reason == "cancelled" and stop == "time_limit" else done.finish_reason
    )
    return events.Finished(
        finish_reason=reason,  # type: ignore[arg-type]
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
    )
