"""The Celery task that runs one job on this worker's engine and reports it as events."""

from __future__ import annotations

import contextlib
import logging
import time

import redis

from model.types import Completion, ContextLengthExceeded, TextDelta
from tasks import events, jobs, keys
from tasks.celery_app import app
from tasks.worker import WorkerRuntime, runtime

log = logging.getLogger(__name__)

# How often the generation loop asks Redis whether the job was cancelled: often enough to stop
# within a fraction of a second, rarely enough to cost nothing per token.
CANCEL_POLL_SECONDS = 0.1


class JobWriter:
    """Appends a job's events and ends it, through the atomic scripts in tasks.jobs."""

    def __init__(self, rt: WorkerRuntime, job_id: str) -> None:
        self._client = rt.redis
        self._job_id = job_id
        self._ttl = rt.settings.job_ttl_seconds
        self._append = rt.redis.register_script(jobs.APPEND_EVENT)

    def claim(self, worker: str) -> bool:
        claim = self._client.register_script(jobs.CLAIM)
        return bool(claim(keys=[keys.job(self._job_id)], args=[worker, repr(time.time())]))

    def emit(self, event: events.Started | events.Delta) -> None:
        self._append(keys=jobs.event_keys(self._job_id), args=[events.encode(event), self._ttl])

    def end(self, event: events.Finished | events.Failed) -> None:
        fields = [x for kv in jobs.terminal_fields(event).items() for x in kv]
        self._append(keys=jobs.event_keys(self._job_id), args=[events.encode(event), self._ttl, *fields])


class CancelWatch:
    """A should_stop callback for the engine that polls the job's cancel flag at a bounded rate."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self._client = client
        self._key = keys.job_cancel(job_id)
        self._next_check = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now >= self._next_check:
            self._next_check = now + CANCEL_POLL_SECONDS
            # If Redis is briefly away, keep generating; the flag is read again on the next poll.
            with contextlib.suppress(redis.RedisError):
                self._cancelled = bool(self._client.exists(self._key))
        return self._cancelled


@app.task(name=keys.GENERATE_TASK)
def generate(spec_json: dict[str, object]) -> None:
    spec = jobs.JobSpec.model_validate(spec_json)
    rt = runtime()
    writer = JobWriter(rt, spec.id)
    if not writer.claim(rt.name):
        log.info("job %s is no longer queued; skipping", spec.id)
        return
    rt.current_job = spec.id
    try:
        _run(rt, spec, writer)
    except Exception:
        log.exception("job %s failed", spec.id)
        writer.end(events.Failed(code="internal_error", message="The generation failed."))
    finally:
        rt.current_job = None


def _run(rt: WorkerRuntime, spec: jobs.JobSpec, writer: JobWriter) -> None:
    if spec.model != rt.settings.model_name:
        writer.end(
            events.Failed(
                code="model_not_found",
                message=f"This worker serves '{rt.settings.model_name}', not '{spec.model}'.",
            )
        )
        return
    try:
        prompt = rt.engine.prepare(spec.to_messages())
    except ContextLengthExceeded as exc:
        writer.end(events.Failed(code="context_length_exceeded", message=str(exc)))
        return
    writer.emit(events.Started(prompt_tokens=len(prompt.token_ids), worker=rt.name))
    sampling = spec.sampling.to_params()
    for item in rt.engine.stream(prompt, sampling, should_stop=CancelWatch(rt.redis, spec.id)):
        if isinstance(item, TextDelta):
            writer.emit(events.Delta(text=item.text))
        elif isinstance(item, Completion):
            writer.end(
                events.Finished(
                    finish_reason=item.finish_reason,
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                )
            )
