"""Webhook deliveries' storage: what ended and is to be told to whom, each delivery's state and
attempts, in Redis so that any API instance can carry a delivery on (api/webhooks/runner.py).

An ending is recorded in the ended stream (keys.ENDED) by the script that ends the job or the
batch. The fan-out turns the entries after the cursor (keys.WEBHOOK_CURSOR) into deliveries, one
per event and endpoint, and moves the cursor, in one script that does nothing if another
instance moved the cursor first: each entry is fanned out once, and an instance killed before
that script leaves the entry to the next reader. A delivery is open (`pending`) until an
endpoint answers 2xx (`delivered`) or its retry window closes (`failed`). Sending one takes it
for a while (its due time moves past the send's timeout, CLAIM_DUE): a sender killed mid-send
leaves it due again soon after, for any instance, with the same event id and body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError

from tasks import keys

# Delivery states: `pending` until an endpoint answers 2xx or the retry window closes.
DeliveryStatus = Literal["pending", "delivered", "failed"]
RECENT_DELIVERIES = 1000  # how many deliveries the recent index (for operators) keeps
ATTEMPTS_KEPT = 20  # how many of a delivery's last attempts its record keeps

_CONSTANTS = (
    f"local CURSOR, DUE = '{keys.WEBHOOK_CURSOR}', '{keys.WEBHOOK_DUE}'\n"
    f"local PENDING, RECENT = '{keys.WEBHOOK_PENDING}', '{keys.WEBHOOK_RECENT}'\n"
    f"local COUNTS, PREFIX = '{keys.WEBHOOK_COUNTS}', '{keys.WEBHOOK_PREFIX}'\n"
    f"local RECENT_DELIVERIES, ATTEMPTS_KEPT = {RECENT_DELIVERIES}, {ATTEMPTS_KEPT}\n"
    + """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""
)

# ARGV: the cursor as the caller read it ('' if unset), the new cursor, seconds an open record
# lives, the retry window, then 7 values per delivery: id, event time, event id, type, subject
# id, endpoint id, body. Records the deliveries that do not exist yet and moves the cursor, unless
# it moved meanwhile (another instance fanned these entries out): 1 if this call moved it. An
# event older than the retry window (webhooks were off, or every API down, that long) is passed
# over: its receiver would no longer be retried for it either.
_FAN_OUT = (
    _CONSTANTS
    + """
if (redis.call('GET', CURSOR) or '') ~= ARGV[1] then return 0 end
local now = clock()
for i = 5, #ARGV, 7 do
  local id = ARGV[i]
  local record = PREFIX .. id
  if tonumber(ARGV[i + 1]) + tonumber(ARGV[4]) >= now and redis.call('EXISTS', record) == 0 then
    redis.call('HSET', record, 'status', 'pending', 'attempts', 0, 'created_at', string.format('%.6f', now),
               'event_at', ARGV[i + 1], 'event_id', ARGV[i + 2], 'type', ARGV[i + 3],
               'subject', ARGV[i + 4], 'endpoint', ARGV[i + 5], 'body', ARGV[i + 6])
    redis.call('EXPIRE', record, ARGV[3])
    redis.call('ZADD', DUE, now, id)
    redis.call('ZADD', PENDING, ARGV[i + 1], id)
    redis.call('ZADD', RECENT, now, id)
    redis.call('HINCRBY', COUNTS, 'created', 1)
  end
end
redis.call('ZREMRANGEBYRANK', RECENT, 0, -(RECENT_DELIVERIES + 1))
redis.call('SET', CURSOR, ARGV[2])
return 1
"""
)

# ARGV: most deliveries to take, seconds to hold each. Takes the deliveries due now (oldest
# first), moving each one's due time past the hold, so no other instance sends it meanwhile and a
# sender that dies leaves it due again after the hold. Returns {id, fields...} per delivery.
_CLAIM_DUE = (
    _CONSTANTS
    + """
local now = clock()
local taken = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  local fields = redis.call('HMGET', PREFIX .. id, 'status', 'event_id', 'type', 'subject', 'endpoint',
                            'body', 'attempts')
  if fields[1] == 'pending' then
    redis.call('ZADD', DUE, now + tonumber(ARGV[2]), id)
    table.insert(taken, {id, fields[2], fields[3], fields[4], fields[5], fields[6], fields[7]})
  else  -- its record expired, or it ended and the indexes were not cleaned: drop it
    redis.call('ZREM', DUE, id)
    redis.call('ZREM', PENDING, id)
  end
end
return taken
"""
)

# ARGV: id, '1' if the endpoint answered 2xx, the attempt (JSON), delay before the next attempt,
# retry window seconds, seconds an ended record lives, last status ('' if none), last error.
# Records one attempt of an open delivery: delivered; or due again after the delay; or failed if
# the next attempt would fall after its window (counted from the event, on Redis's clock).
# Returns the status it now has, or false if it was not open (another sender ended it).
_RECORD = (
    _CONSTANTS
    + """
local id = ARGV[1]
local record, attempts = PREFIX .. id, PREFIX .. id .. ':attempts'
if redis.call('HGET', record, 'status') ~= 'pending' then return false end
local now = clock()
redis.call('HINCRBY', record, 'attempts', 1)
redis.call('HSET', record, 'last_status', ARGV[7], 'last_error', ARGV[8],
           'last_at', string.format('%.6f', now))
redis.call('RPUSH', attempts, ARGV[3])
redis.call('LTRIM', attempts, -ATTEMPTS_KEPT, -1)
redis.call('HINCRBY', COUNTS, 'attempts', 1)
local status = 'pending'
if ARGV[2] == '1' then
  status = 'delivered'
elseif now + tonumber(ARGV[4]) > tonumber(redis.call('HGET', record, 'event_at')) + tonumber(ARGV[5]) then
  status = 'failed'
end
if status == 'pending' then
  redis.call('ZADD', DUE, now + tonumber(ARGV[4]), id)
  redis.call('HINCRBY', COUNTS, 'retried', 1)
  redis.call('EXPIRE', attempts, redis.call('TTL', record))
else
  redis.call('HSET', record, 'status', status, 'ended_at', string.format('%.6f', now))
  redis.call('ZREM', DUE, id)
  redis.call('ZREM', PENDING, id)
  redis.call('EXPIRE', record, ARGV[6])
  redis.call('EXPIRE', attempts, ARGV[6])
  redis.call('HINCRBY', COUNTS, status, 1)
end
return status
"""
)


class Ending(BaseModel):
    """An entry of the ended stream: a job's ending (tasks/jobs.py end_job) or a batch's (kind
    `batch`, tasks/batches.py)."""

    id: str
    kind: str
    status: str
    at: float  # Redis's clock
    batch: str | None = None


class Attempt(BaseModel):
    at: float  # when it was sent (the sender's clock)
    status: int | None  # what the endpoint answered; None if it answered nothing in time
    error: str | None  # None: delivered
    seconds: float  # how long it took


class Delivery(BaseModel):
    """One event's delivery to one endpoint, as an operator reads it."""

    id: str
    event_id: str
    type: str
    subject: str
    endpoint: str
    status: DeliveryStatus
    attempts: int
    event_at: float  # when the job or batch ended (Redis's clock, as every time below)
    created_at: float  # when it was fanned out
    last_at: float | None = None
    ended_at: float | None = None  # when it was delivered or failed for good
    last_status: int | None = None
    last_error: str | None = None
    attempt_log: list[Attempt]  # the last ATTEMPTS_KEPT, oldest first


@dataclass(frozen=True)
class NewDelivery:
    """One event for one endpoint, as the fan-out records it."""

    id: str
    event_at: float
    event_id: str
    type: str
    subject: str  # the response's or the batch's id
    endpoint: str  # the endpoint's id (api/webhooks/endpoints.py)
    body: str  # the exact JSON every attempt sends, so the signature of each covers the same bytes


@dataclass(frozen=True)
class Due:
    """A delivery this instance took to send."""

    id: str
    event_id: str
    type: str
    subject: str
    endpoint: str
    body: str
    attempts: int  # before this one


class WebhookStore:
    def __init__(self, client: aioredis.Redis, *, record_ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = record_ttl_seconds  # how long an ended delivery's record is kept
        self._fan_out = client.register_script(_FAN_OUT)
        self._claim = client.register_script(_CLAIM_DUE)
        self._record = client.register_script(_RECORD)

    async def start_cursor(self) -> None:
        """Where the fan-out starts the first time webhooks are on: after the last ending so
        far (endings from before were never promised an event). Later starts keep the cursor."""
        last = cast(list[tuple[str, Any]], await self._redis.xrevrange(keys.ENDED, count=1))
        await self._redis.set(keys.WEBHOOK_CURSOR, last[0][0] if last else "0-0", nx=True)

    async def endings(self, count: int) -> tuple[str, list[tuple[str, Ending | None]]]:
        """The cursor, and up to `count` stream entries after it (None: an entry that is not an
        ending, which the fan-out passes over rather than be stopped by it)."""
        cursor = cast(str | None, await self._redis.get(keys.WEBHOOK_CURSOR)) or ""
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await self._redis.xrange(keys.ENDED, min=_after(cursor or "0-0"), count=count),
        )
        return cursor, [(entry_id, _ending(fields)) for entry_id, fields in entries]

    async def job_fields(self, job_ids: list[str]) -> list[tuple[str | None, str | None]]:
        """For each job: its `meta` JSON and its batch's id, or Nones if its record is gone."""
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), ["meta", "batch"])
        return [(meta, batch) for meta, batch in await pipe.execute()]

    async def batch_specs(self, batch_ids: list[str]) -> list[str | None]:
        pipe = self._redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hget(keys.batch(batch_id), "spec")
        return cast(list[str | None], await pipe.execute())

    async def fan_out(
        self,
        cursor: str,
        new_cursor: str,
        deliveries: list[NewDelivery],
        *,
        open_ttl: int,
        retry_seconds: int,
    ) -> bool:
        args: list[str | int | float] = [cursor, new_cursor, open_ttl, retry_seconds]
        for d in deliveries:
            args += [d.id, f"{d.event_at:.6f}", d.event_id, d.type, d.subject, d.endpoint, d.body]
        return bool(await self._fan_out(keys=[], args=args))

    async def claim_due(self, limit: int, hold_seconds: float) -> list[Due]:
        rows = await self._claim(keys=[], args=[limit, hold_seconds])
        return [Due(r[0], r[1], r[2], r[3], r[4], r[5], attempts=int(r[6] or 0)) for r in rows]

    async def record(
        self,
        delivery_id: str,
        *,
        ok: bool,
        attempt: dict[str, Any],
        delay: float,
        retry_seconds: int,
        status_code: int | None,
        error: str,
    ) -> DeliveryStatus | None:
        reply = await self._record(
            keys=[],
            args=[
                delivery_id,
                "1" if ok else "0",
                json.dumps(attempt, separators=(",", ":")),
                delay,
                retry_seconds,
                self._ttl,
                "" if status_code is None else status_code,
                error,
            ],
        )
        return cast(DeliveryStatus | None, reply)

    async def recent(self, limit: int) -> list[Delivery]:
        """The last `limit` deliveries, newest first, each with its last attempts."""
        ids = cast(list[str], await self._redis.zrange(keys.WEBHOOK_RECENT, 0, limit - 1, desc=True))
        pipe = self._redis.pipeline(transaction=False)
        for delivery_id in ids:
            pipe.hgetall(keys.webhook_delivery(delivery_id))
            pipe.lrange(keys.webhook_attempts(delivery_id), 0, -1)
        replies = await pipe.execute()
        out: list[Delivery] = []
        for delivery_id, fields, attempts in zip(ids, replies[::2], replies[1::2], strict=True):
            if fields:  # its record may have expired before the index dropped it
                known = {k: v for k, v in fields.items() if v != "" and k in Delivery.model_fields}
                log = [Attempt.model_validate_json(a) for a in attempts]
                out.append(Delivery.model_validate({**known, "id": delivery_id, "attempt_log": log}))
        return out

    async def figures(self) -> tuple[dict[str, str], int, float]:
        """Counts by outcome, how many deliveries are open, and the age in seconds of the oldest
        event not yet delivered: an open delivery's, or an ending not yet fanned out."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys.WEBHOOK_COUNTS)
        pipe.zcard(keys.WEBHOOK_PENDING)
        pipe.zrange(keys.WEBHOOK_PENDING, 0, 0, withscores=True)
        pipe.get(keys.WEBHOOK_CURSOR)
        pipe.time()
        counts, pending, oldest, cursor, (seconds, micros) = await pipe.execute()
        now = seconds + micros / 1e6
        ages = [now - oldest[0][1]] if oldest else []
        if cursor is not None:
            waiting = cast(
                list[tuple[str, Any]], await self._redis.xrange(keys.ENDED, min=_after(cursor), count=1)
            )
            if waiting:  # an entry id starts with its time in milliseconds (Redis's clock)
                ages.append(now - int(waiting[0][0].split("-")[0]) / 1000)
        return counts, pending, max([0.0, *ages])


def _ending(fields: dict[str, str]) -> Ending | None:
    try:
        return Ending.model_validate(fields)
    except ValidationError:
        return None


def _after(entry_id: str) -> str:
    """The smallest stream id after `entry_id` (XRANGE's exclusive `(` needs Redis 6.2)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"
