"""Carrying batches from `validating` to their end: every API instance runs this loop.

A batch is driven by one instance at a time, the holder of its lease; when that instance dies
the lease runs out and another takes over where it stopped. Each step does a bounded piece of
work and every piece can be repeated without effect (lines are enqueued idempotently, results
are written once per line), so a step cut short by a crash is simply done again.

    validating   parse and check the input file (api/batches/lines.py)
    in_progress  enqueue lines (behind interactive traffic), collect the lines whose jobs ended,
                 retry a line whose worker died (2 attempts in all), wind down at expiry
    cancelling   stop every open line; queued ones never run
    finalizing   write the output and error files, in input order

A step that keeps raising for another reason than Redis (a bug, a corrupt record) is not tried
for ever: after MAX_STEP_FAILURES in a row the batch ends `failed`, its open lines cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import socket
import time
from dataclasses import dataclass

import redis.exceptions

from api import errors
from api.batches import lines as batch_lines
from api.responses import serving as responses
from tasks import client as queue
from tasks import jobs, logs
from tasks.batches import BatchRecord, BatchStore, Line, LineError
from tasks.client import JobClient, JobNotFound
from tasks.files import FileStore
from tasks.registry import ModelRegistry
from tasks.settings import Settings

log = logging.getLogger(__name__)

TICK_SECONDS = 0.2  # how soon an ended line is collected, and a new batch validated
LEASE_SECONDS = 15  # a dead instance's batches move to another within this
ENQUEUE_CHUNK = 500  # lines handed to the queue per step
COLLECT_CHUNK = 1000  # ended jobs collected per step
MAX_ATTEMPTS = 2  # a line whose worker died runs at most twice
# A batch whose step keeps raising something other than a Redis error (a bug, a corrupt record)
# fails after this many tries in a row on one instance, instead of being retried every tick.
MAX_STEP_FAILURES = 5
# Failures that say nothing about the request, only that its worker went: the line runs again.
RETRIED_FAILURES = frozenset({"worker_lost", "worker_shutdown"})

_ENDING_MESSAGES = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran to the end."),
    "expired": ("batch_expired", "The batch's completion window closed before this request finished."),
}


def file_id_for(batch_id: str, kind: str) -> str:
    """The output (or error) file's id: derived from the batch, so writing it twice is harmless."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Retry:
    """A line to run again: its next job, and which attempt that is."""

    job: jobs.NewJob
    attempt: int


class BatchRunner:
    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        jobs_client: JobClient,
        models: ModelRegistry,
        settings: Settings,
    ) -> None:
        self._store = store
        self._files = files
        self._jobs = jobs_client
        self._models = models
        self._settings = settings
        # Unique to this instance: host name, object address and start second are not (two API
        # containers sharing their host's network, started in the same second, could match).
        self._holder = f"{socket.gethostname()}:{secrets.token_hex(8)}"
        self._step_failures: dict[str, int] = {}  # active batches only: pruned every tick

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                active = await self._store.active()
            except (redis.exceptions.RedisError, OSError) as exc:
                log.warning("batches paused: %s", exc)
                continue
            self._step_failures = {b: n for b, n in self._step_failures.items() if b in active}
            for batch_id in active:  # one at a time, each on its own: one failing stops no other
                try:
                    if await self._store.lease(batch_id, self._holder, LEASE_SECONDS):
                        await self._step_holding_lease(batch_id)
                        self._step_failures.pop(batch_id, None)
                except (redis.exceptions.RedisError, OSError, queue.EnqueueFailed) as exc:
                    log.warning("batch %s paused: %s", batch_id, exc)
                except Exception:  # a bug: log it, and carry the other batches on
                    log.exception("batch %s: step failed", batch_id)
                    await self._step_failed(batch_id)

    async def _step_failed(self, batch_id: str) -> None:
        failures = self._step_failures.get(batch_id, 0) + 1
        self._step_failures[batch_id] = failures
        if failures < MAX_STEP_FAILURES:
            return
        self._step_failures.pop(batch_id)
        try:
            await self._give_up(batch_id)
        except Exception:  # the next MAX_STEP_FAILURES steps try again
            log.exception("batch %s: could not be failed", batch_id)

    async def _give_up(self, batch_id: str) -> None:
        """End a batch that cannot be carried on as `failed`, with `errors` saying so: first the
        status, so that no queued line starts from here on, then its open lines are cancelled.
        What its lines had answered goes with its working sets: writing the files is one of the
        steps that may be what fails."""
        problem = LineError(
            code="internal_error",
            message="The batch could not be carried on; requests that had not ended were cancelled.",
        )
        moved = await self._store.transition(
            batch_id,
            ("validating", "in_progress", "finalizing", "cancelling"),
            "failed",
            failed_at=_now(),
            errors="[" + problem.model_dump_json() + "]",
        )
        if not moved:
            return
        open_jobs: list[str] = []
        try:  # best effort: the claim script already refuses every queued line of a failed batch
            assigned = await self._store.jobs_of(batch_id)
            ended = await self._store.ended_lines(batch_id)
            open_jobs = [job for index, job in sorted(assigned.items()) if index not in ended]
            for start in range(0, len(open_jobs), 1000):
                await self._jobs.cancel_many(open_jobs[start : start + 1000])
        except Exception:
            log.exception("batch %s: its open lines could not all be cancelled", batch_id)
        log.error(
            "batch %s failed after %d failed steps; %d open line(s) cancelled",
            batch_id,
            MAX_STEP_FAILURES,
            len(open_jobs),
        )
        await self._ended(batch_id, "failed")

    async def _step_holding_lease(self, batch_id: str) -> None:
        """One step, with the lease renewed while it runs; a step whose lease is lost stops (every
        step can be cut anywhere and done again, by this instance or the next holder)."""
        step = asyncio.create_task(self.step(batch_id))
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=LEASE_SECONDS / 3)
                if done:
                    step.result()
                    return
                if not await self._store.lease(batch_id, self._holder, LEASE_SECONDS):
                    log.warning("batch %s: lease lost mid-step; another instance carries it on", batch_id)
                    return
        finally:
            step.cancel()

    async def step(self, batch_id: str) -> None:
        logs.job_id_var.set(batch_id)  # every log line about the batch names it
        record = await self._store.get(batch_id)
        if record is None or record.is_terminal:
            await self._store.close(batch_id)
            return
        if record.status == "validating":
            if not await self._validate(record):
                return
            # Straight on to enqueueing: the first lines should not wait for the next tick.
            record = await self._store.get(batch_id)
            if record is None or record.is_terminal:
                return
            await self._advance(record)
        elif record.status == "finalizing":
            await self._finalize(record)
        else:
            await self._advance(record)

    async def _validate(self, record: BatchRecord) -> bool:
        """Check the input file; True if the batch went on to in_progress (or cancelling)."""
        spec = record.spec
        meta = await self._files.get(spec.input_file_id, spec.owner)
        content = await self._files.content(spec.input_file_id) if meta else None
        if content is None:
            problem = LineError(
                code="file_not_found", message="The input file was deleted before it was read."
            )
            await self._fail(record, [problem])
            return False
        # Redis reads stay outside the try: an outage or a failover pauses the batch for the
        # next tick (run_forever), where inside it would fail the batch as an unreadable file.
        models = await self._models.models(fresh=True)
        histories = await self._histories(content, spec.endpoint, spec.owner)
        try:
            parsed = await asyncio.to_thread(
                batch_lines.parse_input, content, spec.endpoint, self._settings, models, spec.owner, histories
            )
        except Exception:  # a bug in validation must fail this batch, not wedge it
            log.exception("batch input could not be validated")
            problem = LineError(code="invalid_file", message="The input file could not be read as JSONL.")
            await self._fail(record, [problem])
            return False
        if parsed.errors:
            await self._fail(record, parsed.errors)
            return False
        await self._store.write_lines(spec.id, parsed.lines, parsed.refused)
        moved = await self._store.transition(spec.id, ("validating",), "in_progress", in_progress_at=_now())
        log.info(
            "batch validated: %d lines, %d refused by the endpoint%s",
            len(parsed.lines),
            len(parsed.refused),
            "" if moved else " (cancelled meanwhile)",
        )
        return True

    async def _histories(self, content: bytes, endpoint: str, owner: str | None) -> batch_lines.Histories:
        """The conversations the lines continue (previous_response_id), each read once, as the
        batch's owner may read them; an id it may not continue maps to the error a request gets."""
        if endpoint != "/v1/responses":
            return {}
        found: dict[str, list[jobs.Message] | errors.APIError] = {}
        for previous in await asyncio.to_thread(batch_lines.previous_response_ids, content):
            try:
                found[previous] = await responses.conversation(self._jobs, previous, owner)
            except errors.APIError as exc:
                found[previous] = exc
        return found

    async def _fail(self, record: BatchRecord, problems: list[LineError]) -> None:
        errors_json = "[" + ",".join(p.model_dump_json() for p in problems) + "]"
        if await self._store.transition(
            record.spec.id, ("validating",), "failed", failed_at=_now(), errors=errors_json
        ):
            log.info("batch failed validation: %s", ", ".join(sorted({p.code for p in problems})))
            await self._ended(record.spec.id, "failed")

    async def _advance(self, record: BatchRecord) -> None:
        batch_id = record.spec.id
        if record.ending is None:
            if record.status == "cancelling":
                record.ending = "cancelled"
            elif await self._store.now() >= record.spec.expires_at:
                record.ending = "expired"
            if record.ending is not None:
                log.info("batch winding down: %s", record.ending)
                await self._store.update(batch_id, ending=record.ending)
        if record.ending is not None and not record.wound_down:
            await self._wind_down(record)
        elif record.ending is None and record.enqueued < record.total:
            await self._enqueue(record)
        await self._collect(record)
        record = await self._store.get(batch_id) or record
        every_line_ended = record.total and record.completed + record.failed >= record.total
        cancelled_before_any = record.status == "cancelling" and not record.total  # while validating
        if every_line_ended or cancelled_before_any:
            await self._all_lines_ended(record)

    async def _enqueue(self, record: BatchRecord) -> None:
        """The next lines onto the queue. Their jobs exist before they are recorded as the lines'
        jobs, and ids follow from (batch, line, attempt), so a step repeated after a crash
        enqueues the same jobs again, which changes nothing."""
        batch_id = record.spec.id
        start = record.enqueued
        lines = await self._store.lines(batch_id, start, ENQUEUE_CHUNK)
        line_jobs = {
            start + offset: self._line_job(record, start + offset, line.job, attempt=1)
            for offset, line in enumerate(lines)
            if line.job is not None
        }
        if line_jobs:
            await self._jobs.create_batch_lines(list(line_jobs.values()), ttl=self._line_ttl(record))
            await self._store.assign(batch_id, {i: (j.spec.id, 1) for i, j in line_jobs.items()})
        await self._store.update(batch_id, enqueued=start + len(lines))

    def _line_ttl(self, record: BatchRecord) -> int:
        """A line's job record must outlive the batch's window, not only JOB_TTL_SECONDS."""
        window_left = max(0, int(record.spec.expires_at - time.time()))
        return window_left + self._settings.job_ttl_seconds

    def _line_job(self, record: BatchRecord, index: int, job: jobs.NewJob, attempt: int) -> jobs.NewJob:
        # Unguessable as the batch id is, and the same on every instance for this attempt.
        digest = hashlib.sha256(f"{record.spec.id}:{index}:{attempt}".encode()).hexdigest()[:32]
        update = {"id": jobs.ID_PREFIXES[job.spec.kind] + digest, "batch": record.spec.id}
        return job.model_copy(update={"spec": job.spec.model_copy(update=update)})

    async def _collect(self, record: BatchRecord) -> None:
        batch_id = record.spec.id
        ended_ids = await self._store.done(batch_id, record.collected, COLLECT_CHUNK)
        if not ended_ids:
            return
        line_of = await self._store.lines_of(batch_id, ended_ids)
        current = await self._store.current_jobs(
            batch_id, sorted({i for i in line_of.values() if i is not None})
        )
        results: dict[int, str] = {}
        failures: dict[int, str] = {}
        retries: dict[int, Retry] = {}
        for job_id in ended_ids:
            index = line_of[job_id]
            if index is None or current.get(index) != job_id:
                continue  # an earlier attempt at a line that was retried
            (line,) = await self._store.lines(batch_id, index, 1)
            outcome = await self._outcome(record, index, line, job_id)
            if isinstance(outcome, Retry):
                retries[index] = outcome
            else:
                status, text = outcome
                (results if status == 200 else failures)[index] = text
        await self._store.record_results(batch_id, results, failures)
        if retries:
            log.warning("retrying %d line(s) whose worker was lost", len(retries))
            ttl = self._line_ttl(record)
            await self._jobs.create_batch_lines([r.job for r in retries.values()], ttl=ttl)
            await self._store.assign(batch_id, {i: (r.job.spec.id, r.attempt) for i, r in retries.items()})
        await self._store.update(batch_id, collected=record.collected + len(ended_ids))

    async def _outcome(
        self, record: BatchRecord, index: int, line: Line, job_id: str
    ) -> tuple[int, str] | Retry:
        """What an ended job means for its line: the output or error line (with its status code;
        200 goes to the output file), or the job to run next and its attempt number when its
        worker was lost."""
        try:
            job = await self._jobs.record(job_id)
        except JobNotFound:
            message = "The record of this request's job was lost."
            return 500, batch_lines.unanswered_line(line.custom_id, "job_lost", message)
        lost = job.status == "failed" and job.error_code in RETRIED_FAILURES
        if job.status == "cancelled" or (lost and record.ending is not None):
            code, message = _ENDING_MESSAGES[record.ending or "cancelled"]
            return 500, batch_lines.unanswered_line(line.custom_id, code, message)
        if lost:
            attempts = await self._store.attempts(record.spec.id, index)
            if attempts < MAX_ATTEMPTS and line.job is not None:
                return Retry(self._line_job(record, index, line.job, attempt=attempts + 1), attempts + 1)
            message = "The worker running this request stopped, on every attempt."
            return 500, batch_lines.unanswered_line(line.custom_id, job.error_code or "worker_lost", message)
        status, body = batch_lines.answer(job, await self._jobs.log(job_id))
        return status, batch_lines.output_line(line.custom_id, job_id, status, body)

    async def _wind_down(self, record: BatchRecord) -> None:
        """Stop every open line: queued ones end at once, running ones between tokens; lines never
        enqueued, or whose job no longer exists, end here. The others' error lines come as their
        jobs report the end."""
        batch_id = record.spec.id
        ended = await self._store.ended_lines(batch_id)
        assigned = await self._store.jobs_of(batch_id)
        open_lines = sorted(index for index in assigned if index not in ended)
        missing: list[int] = []
        for start in range(0, len(open_lines), 1000):
            chunk = open_lines[start : start + 1000]
            statuses = await self._jobs.cancel_many([assigned[i] for i in chunk])
            missing += [i for i, status in zip(chunk, statuses, strict=True) if status is None]
        code, message = _ENDING_MESSAGES[record.ending or "cancelled"]
        never_ran: dict[int, str] = {}
        for start in range(0, record.total, 1000):
            for offset, line in enumerate(await self._store.lines(batch_id, start, 1000)):
                index = start + offset
                if index not in ended and (index not in assigned or index in missing):
                    never_ran[index] = batch_lines.unanswered_line(line.custom_id, code, message)
        await self._store.record_results(batch_id, {}, never_ran)
        await self._store.update(batch_id, wound_down=1, enqueued=record.total)
        log.info("batch wound down: %d open line(s) stopped, %d never ran", len(open_lines), len(never_ran))

    async def _all_lines_ended(self, record: BatchRecord) -> None:
        if record.ending is None:
            if await self._store.transition(
                record.spec.id, ("in_progress",), "finalizing", finalizing_at=_now()
            ):
                await self._finalize(record)
            return
        await self._finalize(record)

    async def _finalize(self, record: BatchRecord) -> None:
        batch_id = record.spec.id
        results, failures = await self._store.outputs(batch_id)
        fields: dict[str, object] = {"completed": len(results), "failed": len(failures)}
        for kind, lines in (("output", results), ("error", failures)):
            if not lines:
                continue
            content = "".join(lines[i] + "\n" for i in sorted(lines)).encode()
            file_id = file_id_for(batch_id, kind)
            meta = self._files.new_record(
                f"{batch_id}_{kind}.jsonl", "batch_output", len(content), record.spec.owner, file_id=file_id
            )
            await self._files.put(meta, content)
            fields[f"{kind}_file_id"] = file_id
        final = record.ending or "completed"
        from_ = ("finalizing",) if final == "completed" else ("in_progress", "cancelling")
        if await self._store.transition(batch_id, from_, final, **{f"{final}_at": _now()}, **fields):
            log.info("batch %s: %d answered, %d in the error file", final, len(results), len(failures))
            await self._ended(batch_id, final)

    async def _ended(self, batch_id: str, status: str) -> None:
        await self._jobs.count(f"batches_ended:{status}")
        await self._store.close(batch_id)


def _now() -> int:
    return int(time.time())
