"""The API's side of the queue: create and enqueue jobs, follow their events, cancel them.

Async (redis.asyncio) because it runs inside the API's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub

from tasks import events, jobs, keys
from tasks.celery_app import app
from tasks.scripts import AsyncScripts, wait_of
from tasks.settings import Settings

log = logging.getLogger(__name__)

# How long a reader waits on the live channel before it re-reads the log anyway. The log is the
# source of truth; pub/sub only wakes the reader early.
LOG_POLL_SECONDS = 1.0
SUBSCRIBE_ATTEMPTS = 5
# What a repair wake-up carries where a job's own carries its id (the task claims whichever job
# the fair index puts first either way; the id is for logs and Flower).
WAKE_UP = "wake-up"


# What a follower reads when the job's record vanished under it (EventFollower.events).
LOST = events.Failed(
    code="job_lost", message="The queue lost this job (a Redis failover or its expiry); submit it again."
)


class JobNotFound(LookupError):
    """No job with that id (never existed, or expired)."""


class EnqueueFailed(RuntimeError):
    """The broker did not take the task."""


class QueueFull(RuntimeError):
    """MAX_QUEUED jobs are already waiting; nothing was enqueued."""


class KeyShareFull(RuntimeError):
    """The caller's key already has MAX_QUEUED_PER_KEY jobs waiting, or MAX_RUNNING_PER_KEY
    running; nothing was enqueued."""

    def __init__(self, limit: jobs.ShareLimit, count: int) -> None:
        super().__init__(f"this key already has {count} {'waiting' if limit == 'queued' else 'running'} jobs")
        self.limit = limit
        self.count = count


# Most wake-ups the repair sends one model in one reaper pass: a lost list of messages is made
# good over a few passes, without one pass flooding the broker.
REWAKE_PER_PASS = 100


class JobClient:
    def __init__(
        self, client: aioredis.Redis, settings: Settings, weights: Mapping[str, float] | None = None
    ) -> None:
        self._redis = client
        self._settings = settings
        self._ttl = settings.job_ttl_seconds
        self._scripts = AsyncScripts(client, wait_of(settings))
        # Owner tag -> share (API_KEY_WEIGHTS, mapped by the API, which owns the tags); others 1.
        self._weights = dict(weights or {})

    def _weight(self, job: jobs.NewJob) -> float:
        return self._weights.get(jobs.owner_of(job), 1.0)

    async def create(self, job: jobs.NewJob) -> float:
        """Admit the job as queued, then hand its id to Celery (the worker's claim reads the
        spec from the record). Subscribe to its events first. Returns its created_at (Redis's
        clock, as the record has it).

        Raises QueueFull, before anything is enqueued, when MAX_QUEUED jobs of its model are
        waiting, and KeyShareFull when its key is at MAX_QUEUED_PER_KEY or MAX_RUNNING_PER_KEY.
        The message goes to its model's queue, which only that model's workers consume; it is a
        wake-up: the worker claims whichever job the fair index puts first (tasks/jobs.py).
        """
        spec = job.spec
        settings = self._settings
        call = jobs.admit(
            job,
            ttl=self._ttl,
            max_queued=settings.max_queued,
            queue_timeout=settings.queue_timeout_seconds,
            weight=self._weight(job),
            max_queued_per_key=settings.max_queued_per_key,
            max_running_per_key=settings.max_running_per_key,
        )
        created_at = jobs.admitted(await self._scripts.run(call))
        if created_at is None:
            raise QueueFull(f"{settings.max_queued} jobs for '{spec.model}' are already waiting")
        if isinstance(created_at, jobs.OverShare):
            limit = created_at.limit
            count = settings.max_queued_per_key if limit == "queued" else settings.max_running_per_key
            raise KeyShareFull(limit, count)
        log.info("job queued (%d messages, max_tokens=%d)", len(spec.messages), spec.sampling.max_tokens)
        try:
            # send_task talks to the broker synchronously (kombu); keep it off the event loop.
            await asyncio.to_thread(
                app.send_task,
                keys.GENERATE_TASK,
                args=[spec.id],
                task_id=spec.id,
                queue=keys.generate_queue(spec.model),
                # Flower and worker logs show this instead of the arguments: prompts stay private.
                argsrepr=f"<job {spec.id}>",
            )
        except Exception as exc:
            # Another job's wake-up may have claimed it meanwhile: then it runs, and is answered.
            if await self._scripts.run(jobs.withdraw(spec.id)):
                raise EnqueueFailed("the queue did not accept the job") from exc
            log.warning("the queue refused a wake-up, but the job was already claimed: %s", exc)
        return created_at

    async def create_batch_lines(self, lines: list[jobs.NewJob], *, ttl: int) -> None:
        """Queue lines of a batch behind every interactive job, outside MAX_QUEUED.

        Idempotent: a line whose job exists is not recorded again, and a second message for it
        is skipped by the worker's claim, so a restarted API can repeat an enqueue it may or may
        not have finished.
        """
        calls = [jobs.admit_batch_line(j, ttl=ttl, weight=self._weight(j)) for j in lines]
        await self._scripts.run_many(self._redis, calls)

        def send_all() -> None:
            for spec in (j.spec for j in lines):
                app.send_task(
                    keys.GENERATE_TASK,
                    args=[spec.id],
                    task_id=spec.id,
                    queue=keys.generate_queue(spec.model),
                    priority=keys.BATCH_PRIORITY,
                    argsrepr=f"<job {spec.id} of {spec.batch}>",
                )

        try:
            await asyncio.to_thread(send_all)
        except Exception as exc:
            raise EnqueueFailed("the queue did not accept the batch lines") from exc

    async def cancel_many(self, job_ids: list[str]) -> list[str | None]:
        """Cancel jobs in one round trip (a batch winding down); the status each had (None: no
        such job)."""
        statuses = await self._scripts.run_many(self._redis, [jobs.cancel(i, ttl=self._ttl) for i in job_ids])
        return [s if isinstance(s, str) else None for s in statuses]

    async def reap(self) -> int:
        """End jobs whose worker died or whose queue deadline passed; how many were ended."""
        call = jobs.reap(ttl=self._ttl, queue_timeout=self._settings.queue_timeout_seconds)
        return int(await self._scripts.run(call))

    async def rewake(self) -> int:
        """Send the wake-ups that went missing; how many were sent.

        Per model a worker has announced: when more of its jobs could be claimed than messages
        wait in its Celery lists, the difference goes out as wake-ups (at most REWAKE_PER_PASS).
        A message is lost when a Sentinel failover undoes a broker push, or when a wake-up found
        only jobs of owners at MAX_RUNNING_PER_KEY. Messages a worker has taken but not yet run
        are not in the lists, so this may send a few too many: a surplus wake-up finds nothing
        to claim and is acknowledged, which is harmless.
        """
        cap = self._settings.max_running_per_key
        models: list[str] = await self._redis.hkeys(keys.MODELS_SEEN)  # type: ignore[misc,assignment]
        calls = [jobs.wake_deficit(m, max_running_per_key=cap) for m in models]
        replies = await self._scripts.run_many(self._redis, calls) if calls else []
        owed = {m: min(int(w) - int(n), REWAKE_PER_PASS) for m, (w, n) in zip(models, replies, strict=True)}
        owed = {m: n for m, n in owed.items() if n > 0}

        def send_all() -> None:
            for model, n in owed.items():
                for _ in range(n):
                    queue = keys.generate_queue(model)
                    app.send_task(keys.GENERATE_TASK, args=[WAKE_UP], queue=queue, argsrepr="<wake-up>")

        if owed:
            await asyncio.to_thread(send_all)
        return sum(owed.values())

    async def count(self, counter: str) -> None:
        """Add one to a counter of the shared metrics hash."""
        await self._redis.hincrby(keys.METRICS, counter, 1)  # type: ignore[misc]

    async def metrics_fields(self) -> dict[str, str]:
        """The metrics hash of no one model (tasks/metrics.py)."""
        fields: dict[str, str] = await self._redis.hgetall(keys.METRICS)  # type: ignore[misc,assignment]
        return fields

    async def model_figures(self, models: list[str]) -> list[tuple[dict[str, str], int]]:
        """Each model's metrics hash and its waiting interactive jobs, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            pipe.hgetall(keys.metrics_of(model))
            pipe.zcard(keys.queued_of(model))
        replies = await pipe.execute()
        return [(replies[i], int(replies[i + 1])) for i in range(0, len(replies), 2)]

    async def batch_depth(self) -> tuple[int, int]:
        """Batch lines waiting and running, of every model: one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zcard(keys.BATCH_QUEUED)
        pipe.scard(keys.BATCH_RUNNING)
        waiting, running = await pipe.execute()
        return int(waiting), int(running)

    async def record(self, job_id: str) -> jobs.JobRecord:
        fields: dict[str, str] = await self._redis.hgetall(keys.job(job_id))  # type: ignore[misc,assignment]
        if not fields:
            raise JobNotFound(job_id)
        return jobs.JobRecord.from_hash(fields)

    async def log(self, job_id: str) -> list[events.AnyEvent]:
        """Every event the job has published so far."""
        stored = await self._redis.lrange(keys.job_log(job_id), 0, -1)  # type: ignore[misc]
        return [events.decode(i, payload) for i, payload in enumerate(stored)]

    async def cancel(self, job_id: str) -> str | None:
        """Ask for the job to stop. Returns the status it had (None if unknown)."""
        status = await self._scripts.run(jobs.cancel(job_id, ttl=self._ttl))
        return status if isinstance(status, str) else None

    async def delete(self, job_id: str) -> str | None:
        """Delete an ended job; 'deleted', or the status of a job still open (then kept), or None
        if there is no such job."""
        reply = await self._scripts.run(jobs.delete_ended(job_id))
        return reply if isinstance(reply, str) else None

    def subscribe(self, job_id: str) -> EventFollower:
        return EventFollower(self._redis, job_id)


class EventFollower:
    """Reads a job's events in order from a starting point to the terminal event.

    Use as `async with client.subscribe(job_id) as follower:` before the job is enqueued (or
    before reading an existing job), then iterate `follower.events(after=...)`.
    """

    def __init__(self, client: aioredis.Redis, job_id: str) -> None:
        self._redis = client
        self._job_id = job_id
        self._pubsub: PubSub | None = None
        self._stream: AsyncIterator[events.AnyEvent] | None = None
        self._pending: asyncio.Future[events.AnyEvent] | None = None

    async def __aenter__(self) -> EventFollower:
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(keys.job_channel(self._job_id))
        # Wait for Redis to confirm, so nothing published after this returns can be missed.
        for _ in range(SUBSCRIBE_ATTEMPTS):
            msg = await self._pubsub.get_message(timeout=LOG_POLL_SECONDS)
            if msg and msg["type"] == "subscribe":
                return self
        await self.__aexit__(None, None, None)
        raise redis.exceptions.TimeoutError("Redis did not confirm the subscription")

    async def __aexit__(self, *exc: object) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            # Releasing must not fail the caller: with Redis gone the connection is dropped anyway.
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await pubsub.unsubscribe()
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await pubsub.aclose()

    async def next(self, wait: float, after: int = -1) -> events.AnyEvent | None:
        """The next event (the first with seq > after, on the first call), or None once `wait`
        seconds pass; a read that timed out stays pending for the next call, so nothing is lost.
        """
        if self._stream is None:
            self._stream = self.events(after)
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._stream))
        done, _ = await asyncio.wait({self._pending}, timeout=max(wait, 0.0))
        if not done:
            return None
        pending, self._pending = self._pending, None
        return pending.result()

    async def events(self, after: int = -1) -> AsyncIterator[events.AnyEvent]:
        """Every event with seq > after, in order, ending with the terminal one."""
        assert self._pubsub is not None, "use inside 'async with'"
        next_seq = after + 1
        read_log = True
        first = True
        while True:
            if read_log:
                # The log holds everything appended so far: the catch-up path, and the repair
                # path after a quiet spell or a gap in what pub/sub delivered (pub/sub readers
                # lose what was published while their connection was down, as at a failover:
                # redis-py resubscribes, and this re-read catches up).
                pipe = self._redis.pipeline(transaction=False)
                pipe.lrange(keys.job_log(self._job_id), next_seq, -1)
                pipe.exists(keys.job(self._job_id))
                stored, exists = await pipe.execute()
                if not stored and not exists and not first:
                    # The record is gone while its follower waits: a failover lost the write
                    # that admitted it (asynchronous replication), or it expired. Nothing will
                    # ever end it, so its follower ends it here, in the terminal event's shape.
                    yield events.decode(next_seq, events.encode(LOST))
                    return
                first = False
                for payload in stored:
                    event = events.decode(next_seq, payload)
                    next_seq += 1
                    yield event
                    if events.is_terminal(event):
                        return
                read_log = False
            msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=LOG_POLL_SECONDS)
            if msg is None:
                read_log = True
                continue
            live = events.decode_published(msg["data"])
            if live.seq > next_seq:
                read_log = True
            elif live.seq == next_seq:
                next_seq += 1
                yield live
                if events.is_terminal(live):
                    return
