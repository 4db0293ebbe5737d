"""The API's side of the queue: create and enqueue jobs, follow their events, cancel them.

Async (redis.asyncio) because it runs inside the API's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from tasks import events, jobs, keys
from tasks.celery_app import app

log = logging.getLogger(__name__)

# How long a reader waits on the live channel before it re-reads the log anyway. The log is the
# source of truth; pub/sub only wakes the reader early.
LOG_POLL_SECONDS = 1.0


class JobNotFound(LookupError):
    """No job with that id (never existed, or expired)."""


class EnqueueFailed(RuntimeError):
    """The broker did not take the task."""


class JobClient:
    def __init__(self, client: aioredis.Redis, job_ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = job_ttl_seconds
        self._cancel = client.register_script(jobs.CANCEL)

    async def create(self, spec: jobs.JobSpec) -> None:
        """Record the job as queued, then hand it to Celery. Subscribe to its events first."""
        await self._redis.hset(  # type: ignore[misc]
            keys.job(spec.id),
            mapping={"status": "queued", "spec": spec.model_dump_json()},
        )
        await self._redis.expire(keys.job(spec.id), self._ttl)
        try:
            # send_task talks to the broker synchronously (kombu); keep it off the event loop.
            await asyncio.to_thread(
                app.send_task,
                keys.GENERATE_TASK,
                args=[spec.model_dump(mode="json")],
                task_id=spec.id,
                queue=keys.GENERATE_QUEUE,
            )
        except Exception as exc:
            await self._redis.delete(keys.job(spec.id))
            raise EnqueueFailed("the queue did not accept the job") from exc

    async def record(self, job_id: str) -> jobs.JobRecord:
        fields: dict[str, str] = await self._redis.hgetall(keys.job(job_id))  # type: ignore[misc,assignment]
        if not fields:
            raise JobNotFound(job_id)
        return jobs.JobRecord.from_hash(fields)

    async def cancel(self, job_id: str) -> str | None:
        """Ask for the job to stop. Returns the status it had (None if unknown)."""
        status = await self._cancel(
            keys=[*jobs.event_keys(job_id), keys.job_cancel(job_id)],
            args=[self._ttl, events.encode(jobs.cancelled_event()), repr(time.time())],
        )
        return status if isinstance(status, str) else None

    def subscribe(self, job_id: str) -> EventFollower:
        return EventFollower(self._redis, job_id)

    async def workers(self) -> list[dict[str, Any]]:
        """Workers whose heartbeat is fresh, with the model each one holds."""
        names: list[str] = sorted(await self._redis.smembers(keys.WORKERS))  # type: ignore[misc,arg-type]
        if not names:
            return []
        values = await self._redis.mget([keys.worker(n) for n in names])
        stale = [n for n, v in zip(names, values, strict=True) if v is None]
        if stale:
            await self._redis.srem(keys.WORKERS, *stale)  # type: ignore[misc]
        return [json.loads(v) for v in values if v is not None]


class EventFollower:
    """Reads a job's events in order from a starting point to the terminal event.

    Use as `async with client.subscribe(job_id) as follower:` before the job is enqueued (or
    before reading an existing job), then iterate `follower.events(after=...)`.
    """

    def __init__(self, client: aioredis.Redis, job_id: str) -> None:
        self._redis = client
        self._job_id = job_id
        self._pubsub: PubSub | None = None

    async def __aenter__(self) -> EventFollower:
        self._pubsub = self._redis.pubsub()
        channel = keys.job_channel(self._job_id)
        await self._pubsub.subscribe(channel)
        # Wait for Redis to confirm, so nothing published after this returns can be missed.
        while True:
            msg = await self._pubsub.get_message(timeout=LOG_POLL_SECONDS)
            if msg and msg["type"] == "subscribe":
                return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pubsub is not None:
            try:
                await self._pubsub.unsubscribe()
            finally:
                await self._pubsub.aclose()

    async def events(
        self, after: int = -1
    ) -> AsyncIterator[events.Started | events.Delta | events.Finished | events.Failed]:
        """Every event with seq > after, in order, ending with the terminal one."""
        assert self._pubsub is not None, "use inside 'async with'"
        next_seq = after + 1
        log_key = keys.job_log(self._job_id)
        while True:
            msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=LOG_POLL_SECONDS)
            batch: list[events.AnyEvent] = []
            live = events.decode_published(msg["data"]) if msg else None
            if live is None or live.seq > next_seq:
                # A quiet channel or a gap: the log has everything up to now.
                stored = await self._redis.lrange(log_key, next_seq, -1)  # type: ignore[misc]
                batch = [events.decode(next_seq + i, p) for i, p in enumerate(stored)]
            elif live.seq == next_seq:
                batch = [live]
            for event in batch:
                if event.seq != next_seq:
                    continue
                next_seq += 1
                yield event
                if events.is_terminal(event):
                    return
