"""The worker's one decode loop: every running job of this worker advances in the same step.

Celery's pool threads (one per slot, celeryconfig.py) each claim a job, render its prompt and hand
it here, then wait for it to end. This loop alone drives the engine's scheduler, so one model
copy serves every slot. Per step, Redis sees one pipeline carrying the events of every job that
produced text, and every STOP_POLL_SECONDS one MGET of all running jobs' cancel flags; the
heartbeat thread renews all their leases in one round trip (tasks/worker.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Literal, cast

import redis

from model.scheduler import Event
from model.types import Completion, Prompt, TextDelta, TokenLogprob
from tasks import events, jobs, keys, logs, metrics
from tasks.worker import WorkerRuntime

log = logging.getLogger(__name__)

# How often the loop asks Redis which running jobs were cancelled: often enough to stop within a
# fraction of a second, rarely enough to cost nothing per token.
STOP_POLL_SECONDS = 0.1
# How long an idle loop waits for a job before looking at its flags again.
IDLE_WAIT_SECONDS = 0.5
# How often the loop adds its count of sequences per step to the shared metrics.
METRICS_FLUSH_SECONDS = 2.0
# Bounds the wait for the loop thread's warm-up (two tokens; minutes only for a large model on a
# slow CPU), so a hung warm-up stops the worker instead of keeping it half-started.
WARM_UP_TIMEOUT_SECONDS = 600.0

StopReason = Literal["cancelled", "time_limit", "shutdown"]


class DeltaBuffer:
    """Coalesces a choice's text deltas: one that arrives within `window` seconds of the last
    written delta waits for the next and goes out with it (its logprobs entries with it).

    Each event costs a Redis call here and a pub/sub message, a JSON chunk and an SSE frame
    downstream; per token, at a hundred tokens a second on a small CPU machine, that work takes a
    large share of the cores the model decodes on. The first delta after a pause goes out at once
    (time to first token is unchanged), and pending text goes before any other event.
    """

    def __init__(self, window: float, index: int = 0, logprobs: bool = False) -> None:
        self._window = window
        self._index = index
        self._logprobs: list[events.TokenLogprob] | None = [] if logprobs else None
        self._pending = ""
        self._last = float("-inf")

    def add(self, delta: TextDelta, now: float) -> events.Delta | None:
        self._pending += delta.text
        if self._logprobs is not None:
            self._logprobs += [_wire_logprob(entry) for entry in delta.logprobs]
        return self.take(now) if now - self._last >= self._window else None

    def take(self, now: float) -> events.Delta | None:
        if not self._pending and not self._logprobs:
            return None
        logprobs, self._logprobs = self._logprobs, [] if self._logprobs is not None else None
        text, self._pending, self._last = self._pending, "", now
        return events.Delta(text=text, index=self._index, logprobs=logprobs)


def _wire_logprob(entry: TokenLogprob) -> events.TokenLogprob:
    top = [events.TopLogprob(token=t.token, bytes=list(t.bytes), logprob=t.logprob) for t in entry.top]
    return events.TokenLogprob(
        token=entry.token, bytes=list(entry.bytes), logprob=entry.logprob, top_logprobs=top
    )


@dataclass
class SlotJob:
    """A claimed job on its way through the loop, and how its pool thread learns it ended.

    A job with n > 1 runs its choices as n sequences of the batch, keyed (job id, index); it
    ends when the last one does.
    """

    spec: jobs.JobSpec
    prompt: Prompt
    created_at: float  # this host's wall clock: when the job was admitted (generate.py)
    claimed_at: float  # wall clock, for the queue-time metric
    deadline: float  # monotonic: MAX_GENERATION_SECONDS after the claim
    buffers: list[DeltaBuffer]  # one per choice
    done: threading.Event = field(default_factory=threading.Event)
    stop_reason: StopReason | None = None
    first_token_at: float | None = None
    ended: dict[int, Completion] = field(default_factory=dict)  # by choice, as each one ends

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [(self.spec.id, i) for i in range(len(self.buffers))]


class SlotLoop:
    _instance: SlotLoop | None = None

    def __init__(self, rt: WorkerRuntime) -> None:
        self._rt = rt
        self._scheduler = rt.engine.scheduler
        # Bounded by the slots: only the pool's threads put here, one job each.
        self._inbox: queue.Queue[SlotJob] = queue.Queue(maxsize=rt.engine.slots)
        self._jobs: dict[str, SlotJob] = {}
        self._next_poll = 0.0
        self._batch_sizes: Counter[int] = Counter()
        self._next_metrics = time.monotonic() + METRICS_FLUSH_SECONDS
        self._shared_reported = 0  # the runner's shared_prefill_tokens already in the metrics

    @classmethod
    def start(cls, rt: WorkerRuntime) -> SlotLoop:
        """Start the loop's thread, which warms the engine up before its first step; return once
        it has (or raise what the warm-up raised).

        Every forward pass, the warm-up's included, runs on this one thread: llama.cpp and torch
        compute through OpenMP, which gives each thread that calls it a team of its own, and a
        model warmed up on the main thread and then decoded here ran at about 0.65x its speed
        (docs/benchmarks.md, "Where one stream's time goes")."""
        loop = cls(rt)
        warmed: Future[None] = Future()
        threading.Thread(target=loop._run, args=(warmed,), name="decode-loop", daemon=True).start()
        warmed.result(timeout=WARM_UP_TIMEOUT_SECONDS)
        cls._instance = loop
        return loop

    @classmethod
    def current(cls) -> SlotLoop:
        if cls._instance is None:
            raise RuntimeError("the decode loop is not running in this process")
        return cls._instance

    def submit(self, job: SlotJob) -> None:
        self._inbox.put(job, timeout=60)  # never blocks in practice: one job per pool thread

    def _run(self, warmed: Future[None]) -> None:
        try:
            self._rt.engine.warm_up()
        except BaseException as exc:  # the worker stops: it must not take jobs it cannot run
            warmed.set_exception(exc)
            return
        warmed.set_result(None)
        while True:
            try:
                self._once()
            except Exception:  # the loop must outlive any one bad step; its jobs end failed
                log.exception("the decode loop failed a step; ending its running jobs")
                failed = events.Failed(code="internal_error", message="The generation failed.")
                for job_id in list(self._jobs):
                    self._stop(job_id)
                    self._try_write(job_id, failed)
                    self._release(job_id)

    def _once(self) -> None:
        self._admit(block=self._scheduler.idle)
        now = time.monotonic()
        if now >= self._next_metrics:
            self._flush_metrics(now)
        if self._scheduler.idle:
            return
        outputs = self._poll_stops(now) + self._scheduler.step()
        if self._scheduler.last_batch_size:
            self._batch_sizes[self._scheduler.last_batch_size] += 1
        now = time.monotonic()
        writes: list[tuple[str, events.AnyEvent]] = []
        endings: dict[str, events.Finished | events.Failed] = {}
        for key, event in outputs:
            job_id, index = cast(tuple[str, int], key)  # submitted as (job id, choice index)
            job = self._jobs.get(job_id)
            if job is None or job_id in endings and isinstance(endings[job_id], events.Failed):
                continue  # a sibling choice already failed the job
            if isinstance(event, TextDelta):
                job.first_token_at = job.first_token_at or time.time()
                if (delta := job.buffers[index].add(event, now)) is not None:
                    writes.append((job_id, delta))
            elif isinstance(event, Completion):
                job.ended[index] = event
                if len(job.ended) == len(job.buffers):
                    endings[job_id] = terminal = _terminal(job.ended, job.stop_reason)
                    if isinstance(terminal, events.Finished) and terminal.finish_reason != "cancelled":
                        self._record_metrics(job, terminal)
            else:
                log.warning("job %s failed in the engine: %s", job_id, event.message)
                self._stop(job_id)  # its other choices end with it
                endings[job_id] = events.Failed(code="internal_error", message="The generation failed.")
        self._write(writes, endings, now)

    def _admit(self, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=IDLE_WAIT_SECONDS) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._start(job)
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _start(self, job: SlotJob) -> None:
        """Hand the job's choices to the scheduler. A job that cannot start (its grammar fell out
        of the worker's cache and no longer compiles, say) fails alone: an exception here would
        otherwise reach _run, which fails every running job."""
        self._jobs[job.spec.id] = job
        self._rt.running.add(job.spec.id)
        try:
            params = job.spec.sampling.to_params()
            for i, key in enumerate(job.keys):
                # Choices differ by seed: a seeded request gives n distinct, reproducible ones.
                seed = None if params.seed is None else params.seed + i
                self._scheduler.submit(
                    key, self._rt.engine.generation(job.prompt, replace(params, seed=seed))
                )
        except Exception:
            log.exception("job %s could not start", job.spec.id)
            self._stop(job.spec.id)  # choices already submitted leave with it
            failed = events.Failed(code="internal_error", message="The generation failed.")
            self._try_write(job.spec.id, failed)
            self._release(job.spec.id)

    def _poll_stops(self, now: float) -> list[tuple[Hashable, Event]]:
        """Stop the jobs that were cancelled (one MGET for all), ran out of time, or must end for
        a shutdown; what the scheduler releases for them (held text, the Completion)."""
        stops: dict[str, StopReason] = {}
        if self._rt.draining.is_set():
            stops = dict.fromkeys(self._jobs, "shutdown")
        stops |= {job_id: "time_limit" for job_id, job in self._jobs.items() if now >= job.deadline}
        if now >= self._next_poll and self._jobs:
            self._next_poll = now + STOP_POLL_SECONDS
            ids = list(self._jobs)
            try:
                flags = self._rt.redis.mget([keys.job_cancel(i) for i in ids])
            except redis.RedisError:  # Redis briefly away: keep generating and ask again
                flags = [None] * len(ids)
            stops |= {i: "cancelled" for i, flag in zip(ids, flags, strict=True) if flag and i not in stops}
        released: list[tuple[Hashable, Event]] = []
        for job_id, reason in stops.items():
            job = self._jobs[job_id]
            if job.stop_reason is None:
                job.stop_reason = reason
                released += self._stop(job_id)
        return released

    def _stop(self, job_id: str) -> list[tuple[Hashable, Event]]:
        """End every choice of the job now; what the scheduler releases for them."""
        job = self._jobs.get(job_id)
        released: list[tuple[Hashable, Event]] = []
        for key in job.keys if job else []:
            released += self._scheduler.stop(key)
        return released

    def _write(
        self,
        writes: list[tuple[str, events.AnyEvent]],
        endings: dict[str, events.Finished | events.Failed],
        now: float,
    ) -> None:
        """One pipeline: the step's text deltas, then each ending job's held text and its end."""
        for job_id in endings:
            for buffer in self._jobs[job_id].buffers:
                if (delta := buffer.take(now)) is not None:
                    writes.append((job_id, delta))
        writes += list(endings.items())
        if not writes:
            return
        ttl = self._rt.settings.job_ttl_seconds
        try:
            self._rt.scripts.run_many([jobs.append(job_id, event, ttl=ttl) for job_id, event in writes])
        except redis.RedisError as exc:
            # Without Redis a job's events cannot be kept in order: end every job that had
            # something to say (best effort; if that fails too, its lease lapses and the reaper
            # ends it), so none runs on for nobody.
            log.warning("could not write events: %s", exc)
            for job_id in {j for j, _ in writes}:
                if job_id in self._jobs:
                    self._stop(job_id)
                    endings[job_id] = events.Failed(
                        code="internal_error", message="Lost the connection to the queue."
                    )
                    self._try_write(job_id, endings[job_id])
        for job_id in endings:
            self._release(job_id)

    def _try_write(self, job_id: str, event: events.AnyEvent) -> None:
        try:
            self._rt.scripts.run(jobs.append(job_id, event, ttl=self._rt.settings.job_ttl_seconds))
        except redis.RedisError as exc:
            log.warning("could not end job %s: %s", job_id, exc)

    def _release(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        self._rt.running.discard(job_id)
        if job is not None:
            job.done.set()

    def _record_metrics(self, job: SlotJob, done: events.Finished) -> None:
        spec = job.spec
        timings = metrics.JobTimings(
            queue_seconds=job.claimed_at - job.created_at,
            ttft_seconds=None if job.first_token_at is None else job.first_token_at - job.created_at,
            e2e_seconds=time.time() - job.created_at,
            prompt_tokens=done.prompt_tokens,
            generation_tokens=done.completion_tokens,
        )
        token = logs.job_id_var.set(spec.id)
        try:
            metrics.record(self._rt.redis, self._rt.settings.model_name, timings)
        except redis.RedisError as exc:  # metrics must never fail a finished job
            log.warning("could not record metrics: %s", exc)
        finally:
            logs.job_id_var.reset(token)

    def _flush_metrics(self, now: float) -> None:
        self._next_metrics = now + METRICS_FLUSH_SECONDS
        if not self._batch_sizes:
            return
        counts, self._batch_sizes = self._batch_sizes, Counter()
        shared = self._rt.engine.loaded.runner.shared_prefill_tokens
        try:
            metrics.record_batch_sizes(
                self._rt.redis, self._rt.settings.model_name, counts, shared - self._shared_reported
            )
            self._shared_reported = shared
        except redis.RedisError as exc:
            log.warning("could not record batch sizes: %s", exc)


def _terminal(ended: dict[int, Completion], stop: StopReason | None) -> events.Finished | events.Failed:
    """The job's end once every choice has ended: each one's reason, their tokens together."""
    reasons = [ended[i].finish_reason for i in range(len(ended))]
    if "cancelled" in reasons and stop == "shutdown":
        return events.Failed(
            code="worker_shutdown", message="The worker shut down before the generation finished."
        )
    if stop == "time_limit":
        reasons = ["time_limit" if r == "cancelled" else r for r in reasons]  # type: ignore[misc]
    # The job ends as its most interrupted choice: cancelled or out of time if any choice was
    # stopped so, though choice 0 may have finished on its own first.
    job_reason = next((r for r in reasons if r in ("cancelled", "time_limit")), reasons[0])
    return events.Finished(
        finish_reason=job_reason,  # type: ignore[arg-type]
        prompt_tokens=ended[0].prompt_tokens,
        completion_tokens=sum(c.completion_tokens for c in ended.values()),
        choices=reasons if len(reasons) > 1 else [],  # type: ignore[arg-type]
    )
