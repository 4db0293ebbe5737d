"""The Celery task: claim one job, render its prompt, and hand it to this worker's decode loop.

Each pool thread runs one of these at a time (celeryconfig.py: one thread per slot), so a
worker holds at most WORKER_SLOTS claimed jobs, and a queued job waits in Redis for whichever
worker frees a slot first. The message is a wake-up: it names the job it was sent for (for logs
and Flower), but the task claims whichever job of its model the fair index puts first
(tasks/jobs.py CLAIM_NEXT), so one key's long queue cannot hold back another key's request.
"""

from __future__ import annotations

import logging
import time

from model.types import ContextLengthExceeded
from tasks import events, jobs, keys, logs
from tasks.celery_app import app
from tasks.slots import DeltaBuffer, SlotJob, SlotLoop
from tasks.worker import WorkerRuntime, runtime

log = logging.getLogger(__name__)

# A pool thread waits this much longer than MAX_GENERATION_SECONDS for its job to end; the loop
# enforces that limit itself, so this only bounds a wait that should never be reached.
END_WAIT_MARGIN_SECONDS = 60.0
# How many times a wake-up calls CLAIM_NEXT when each call ends its quota of expired jobs
# without claiming one; what is left waits for the reaper and the next wake-up.
CLAIM_ROUNDS = 4


@app.task(name=keys.GENERATE_TASK)
def generate(job_id: str) -> None:
    logs.job_id_var.set(job_id)
    rt = runtime()
    settings = rt.settings
    claimed = _claim_next(rt) or _claim_unindexed(rt, job_id)
    if claimed is None:
        # A redelivered or surplus wake-up (its job ran on another's), or one whose job waits
        # for its key's running cap to free (that job's end sends it another).
        log.info("job %s is no longer queued, or waits for its key's cap; nothing to take", job_id)
        return
    spec = claimed.spec
    logs.job_id_var.set(spec.id)
    try:
        _run(rt, claimed)
    finally:
        if settings.max_running_per_key and spec.batch is None:
            try:
                _wake_owner(rt, claimed.owner)
            except Exception as exc:  # Redis or the broker away: the API's repair pass sends it
                log.warning("could not wake a worker for the next job of this key: %s", exc)


def _claim_next(rt: WorkerRuntime) -> jobs.Claimed | None:
    settings = rt.settings
    call = jobs.claim_next(
        settings.model_name,
        ttl=settings.job_ttl_seconds,
        worker=rt.name,
        lease_seconds=settings.job_lease_seconds,
        queue_timeout=settings.queue_timeout_seconds,
        max_running_per_key=settings.max_running_per_key,
    )
    for _ in range(CLAIM_ROUNDS):
        reply = rt.scripts.run(call)
        if not jobs.claim_again(reply):
            return jobs.claimed(reply)
    return None


def _claim_unindexed(rt: WorkerRuntime, job_id: str) -> jobs.Claimed | None:
    """A job an API from before the fair index queued has no `owner` field and is in no index:
    its own message claims it by id, as before, so an upgrade need not wait for the queue to drain."""
    if rt.redis.hget(keys.job(job_id), "status") != "queued" or rt.redis.hexists(keys.job(job_id), "owner"):
        return None
    settings = rt.settings
    call = jobs.claim(
        job_id,
        ttl=settings.job_ttl_seconds,
        worker=rt.name,
        lease_seconds=settings.job_lease_seconds,
        queue_timeout=settings.queue_timeout_seconds,
    )
    return jobs.claimed(rt.scripts.run(call))


def _wake_owner(rt: WorkerRuntime, owner: str) -> None:
    """A job of `owner` ended, freeing one of its MAX_RUNNING_PER_KEY places: wake a worker for
    its oldest waiting job, whose own wake-up may have come and gone while the owner was at its
    cap (a surplus wake-up is harmless; the API's repair pass also catches what this misses)."""
    oldest: list[str] = rt.redis.zrange(keys.owner_queued(owner), 0, 0)  # type: ignore[assignment]
    model = rt.redis.hget(keys.job(oldest[0]), "model") if oldest else None
    if model:
        queue = keys.generate_queue(str(model))
        app.send_task(keys.GENERATE_TASK, args=[oldest[0]], queue=queue, argsrepr=f"<job {oldest[0]}>")


def _run(rt: WorkerRuntime, claimed: jobs.Claimed) -> None:
    settings = rt.settings
    spec = claimed.spec
    # The wait is Redis's measure; taking it from this host's clock keeps the metrics' spans on
    # one clock, whatever the API's host says the time is.
    created_at = time.time() - claimed.waited_seconds
    if spec.batch is not None:  # a batch line's log lines name its batch too
        logs.job_id_var.set(f"{spec.batch}/{spec.id}")
    try:
        job = _prepare(rt, claimed, created_at)
    except Exception:
        log.exception("job %s failed", spec.id)
        job = None
        _write(rt, spec.id, events.Failed(code="internal_error", message="The generation failed."))
    if job is None:
        return
    SlotLoop.current().submit(job)
    if not job.done.wait(settings.max_generation_seconds + END_WAIT_MARGIN_SECONDS):
        log.error("job %s did not end in time; failing it", spec.id)
        _write(rt, spec.id, events.Failed(code="internal_error", message="The generation did not end."))


def _prepare(rt: WorkerRuntime, claimed: jobs.Claimed, created_at: float) -> SlotJob | None:
    """The job ready for the loop, its Started event written; None if it ended here instead."""
    spec = claimed.spec
    if spec.model != rt.settings.model_name:
        message = f"This worker serves '{rt.settings.model_name}', not '{spec.model}'."
        _write(rt, spec.id, events.Failed(code="model_not_found", message=message))
        return None
    try:
        prompt = rt.engine.prepare(spec.to_messages(), spec.tools, truncate=spec.truncate)
    except ContextLengthExceeded as exc:
        _write(rt, spec.id, events.Failed(code="context_length_exceeded", message=str(exc)))
        return None
    if unknown := [t for t in spec.sampling.logit_bias if not 0 <= t < rt.engine.vocab_size]:
        message = f"logit_bias names token {unknown[0]}, which is not in this model's vocabulary."
        _write(rt, spec.id, events.Failed(code="invalid_logit_bias", message=message))
        return None
    if spec.sampling.grammar:
        # Compiled here, on this pool thread, not on the decode loop, where a complex schema's
        # compile would stall every running sequence; the loop then finds it cached.
        try:
            rt.engine.grammars.constraint(spec.sampling.grammar)
        except ValueError as exc:
            _write(rt, spec.id, events.Failed(code="invalid_grammar", message=str(exc)[:300]))
            return None
    claimed_at = time.time()
    _write(rt, spec.id, events.Started(prompt_tokens=len(prompt.token_ids), worker=rt.name))
    log.info("generating: %d prompt tokens, waited %.3fs", len(prompt.token_ids), claimed.waited_seconds)
    return SlotJob(
        spec=spec,
        prompt=prompt,
        created_at=created_at,
        claimed_at=claimed_at,
        deadline=time.monotonic() + rt.settings.max_generation_seconds,
        buffers=[
            DeltaBuffer(rt.settings.stream_coalesce_seconds, i, spec.sampling.logprobs)
            for i in range(spec.sampling.n)
        ],
    )


def _write(rt: WorkerRuntime, job_id: str, event: events.AnyEvent) -> None:
    rt.scripts.run(jobs.append(job_id, event, ttl=rt.settings.job_ttl_seconds))
