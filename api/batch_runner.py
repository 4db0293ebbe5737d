"""Carrying batches from `validating` to their end: every API instance runs this loop.

A batch is driven by one instance at a time, the holder of its lease; when that instance dies
the lease runs out and another takes over where it stopped. Each step does a bounded piece of
work and every piece can be repeated without effect (lines are enqueued idempotently, results
are written once per line), so a step cut short by a crash is simply done again.

    validating   parse and check the input file (api/batch_lines.py)
    in_progress  enqueue lines (behind interactive traffic), collect the lines whose jobs ended,
                 retry a line whose worker died (2 attempts in all), wind down at expiry
    cancelling   stop every open line; queued ones never run
    finalizing   write the output and error files, in input order
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time

import redis.exceptions

from api import batch_lines
from tasks import client as queue
from tasks import jobs, logs
from tasks.batches import BatchRecord, BatchStore, Line, LineError
from tasks.client import JobClient, JobNotFound
from tasks.files import FileStore
from tasks.settings import Settings

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
LEASE_SECONDS = 15  # a dead instance's batches move to another within this
ENQUEUE_CHUNK = 500  # lines handed to the queue per step
COLLECT_CHUNK = 1000  # ended jobs collected per step
MAX_ATTEMPTS = 2  # a line whose worker died runs at most twice

_ENDING_MESSAGES = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran to the end."),
    "expired": ("batch_expired", "The batch's completion window closed before this request finished."),
}


def file_id_for(batch_id: str, kind: str) -> str:
    """The output (or error) file's id: derived from the batch, so writing it twice is harmless."""
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


class BatchRunner:
    def __init__(
        self, store: BatchStore, files: FileStore, jobs_client: JobClient, settings: Settings
    ) -> None:
        self._store = store
        self._files = files
        self._jobs = jobs_client
        self._settings = settings
        self._holder = f"{socket.gethostname()}:{id(self):x}:{time.time():.0f}"

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                for batch_id in await self._store.active():
                    if await self._store.lease(batch_id, self._holder, LEASE_SECONDS):
                        await self.step(batch_id)
            except (redis.exceptions.RedisError, OSError, queue.EnqueueFailed) as exc:
                log.warning("batches paused: %s", exc)
            except Exception:  # a bug: log it, and keep carrying the other batches
                log.exception("batch step failed")

    async def step(self, batch_id: str) -> None:
        logs.job_id_var.set(batch_id)  # every log line about the batch names it
        record = await self._store.get(batch_id)
        if record is None or record.is_terminal:
            await self._store.close(batch_id)
            return
        if record.status == "validating":
            await self._validate(record)
        elif record.status == "finalizing":
            await self._finalize(record)
        else:
            await self._advance(record)

    async def _validate(self, record: BatchRecord) -> None:
        spec = record.spec
        meta = await self._files.get(spec.input_file_id, spec.owner)
        content = await self._files.content(spec.input_file_id) if meta else None
        if content is None:
            problem = LineError(
                code="file_not_found", message="The input file was deleted before it was read."
            )
            await self._fail(record, [problem])
            return
        parsed = await asyncio.to_thread(
            batch_lines.parse_input, content, spec.endpoint, self._settings, spec.owner
        )
        if parsed.errors:
            await self._fail(record, parsed.errors)
            return
        await self._store.write_lines(spec.id, parsed.lines, parsed.refused)
        moved = await self._store.transition(spec.id, ("validating",), "in_progress", in_progress_at=_now())
        log.info(
            "batch validated: %d lines, %d refused by the endpoint%s",
            len(parsed.lines),
            len(parsed.refused),
            "" if moved else " (cancelled meanwhile)",
        )

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
            elif time.time() >= record.spec.expires_at:
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
        batch_id = record.spec.id
        start = record.enqueued
        lines = await self._store.lines(batch_id, start, ENQUEUE_CHUNK)
        assigned = await self._store.jobs_of(batch_id)
        specs: dict[int, jobs.JobSpec] = {}
        for offset, line in enumerate(lines):
            if line.job is not None:
                index = start + offset
                # A line enqueued before a restart keeps its job; enqueueing it again is a no-op.
                specs[index] = self._line_job(record, index, line.job, assigned.get(index))
        new = {i: s.id for i, s in specs.items() if i not in assigned}
        if new:
            await self._store.assign(batch_id, new)
        if specs:
            await self._jobs.create_batch_lines(list(specs.values()))
        await self._store.update(batch_id, enqueued=start + len(lines))

    def _line_job(
        self, record: BatchRecord, index: int, job: dict[str, object], job_id: str | None
    ) -> jobs.JobSpec:
        prefix = "chatcmpl-" if record.spec.endpoint == "/v1/chat/completions" else "resp_"
        return jobs.JobSpec.model_validate(
            {
                **job,
                "id": job_id or jobs.new_job_id(prefix),
                "created_at": time.time(),
                "batch": record.spec.id,
                "batch_line": index,
            }
        )

    async def _collect(self, record: BatchRecord) -> None:
        batch_id = record.spec.id
        ended_ids = await self._store.done(batch_id, record.collected, COLLECT_CHUNK)
        if not ended_ids:
            return
        current = await self._store.jobs_of(batch_id)
        lines_by_index: dict[int, Line] = {}
        results: dict[int, str] = {}
        failures: dict[int, str] = {}
        retries: dict[int, jobs.JobSpec] = {}
        for job_id in ended_ids:
            try:
                job = await self._jobs.record(job_id)
            except JobNotFound:
                log.warning("job %s of the batch has no record left", job_id)
                continue
            index = job.spec.batch_line
            if index is None or current.get(index) != job_id:
                continue  # an earlier attempt at a line that was retried
            if index not in lines_by_index:
                (lines_by_index[index],) = await self._store.lines(batch_id, index, 1)
            custom_id = lines_by_index[index].custom_id
            if job.status == "cancelled" or (job.status == "failed" and record.ending is not None):
                code, message = _ENDING_MESSAGES.get(
                    record.ending or "cancelled", _ENDING_MESSAGES["cancelled"]
                )
                failures[index] = batch_lines.unanswered_line(custom_id, code, message)
            elif job.status == "failed" and job.error_code == "worker_lost":
                if await self._store.attempts(batch_id, index) < MAX_ATTEMPTS:
                    job_json = lines_by_index[index].job or {}
                    retries[index] = self._line_job(record, index, job_json, None)
                else:
                    message = "The worker running this request stopped, on every attempt."
                    failures[index] = batch_lines.unanswered_line(custom_id, "worker_lost", message)
            else:
                status, body = batch_lines.answer(
                    record.spec.endpoint, job.spec, await self._jobs.log(job_id)
                )
                line = batch_lines.output_line(custom_id, job_id, status, body)
                (results if status == 200 else failures)[index] = line
        await self._store.record_results(batch_id, results, failures)
        if retries:
            log.warning("retrying %d line(s) whose worker was lost", len(retries))
            await self._store.assign(batch_id, {i: s.id for i, s in retries.items()})
            await self._jobs.create_batch_lines(list(retries.values()))
        await self._store.update(batch_id, collected=record.collected + len(ended_ids))

    async def _wind_down(self, record: BatchRecord) -> None:
        """Stop every open line: queued ones end at once, running ones between tokens; lines never
        enqueued end here. Their error lines come as their jobs report the end."""
        batch_id = record.spec.id
        ended = await self._store.ended_lines(batch_id)
        assigned = await self._store.jobs_of(batch_id)
        open_jobs = [job_id for index, job_id in assigned.items() if index not in ended]
        for start in range(0, len(open_jobs), 1000):
            await self._jobs.cancel_many(open_jobs[start : start + 1000])
        code, message = _ENDING_MESSAGES[record.ending or "cancelled"]
        never_ran: dict[int, str] = {}
        for start in range(record.enqueued, record.total, 1000):
            for offset, line in enumerate(await self._store.lines(batch_id, start, 1000)):
                index = start + offset
                if index not in ended and index not in assigned:
                    never_ran[index] = batch_lines.unanswered_line(line.custom_id, code, message)
        await self._store.record_results(batch_id, {}, never_ran)
        await self._store.update(batch_id, wound_down=1, enqueued=record.total)
        log.info("batch wound down: %d open line(s) stopped, %d never ran", len(open_jobs), len(never_ran))

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
