"""Batches (the Batch API's storage): the batch record, its lines, the jobs running them, and
their results, all in Redis so any API instance can carry a batch on (api/batches/runner.py).

Statuses, as OpenAI's: validating -> in_progress -> finalizing -> completed; or failed (at
validation), expired (the completion window closed), cancelling -> cancelled. Every line ends
exactly once, in `results` (the output file) or `errors` (the error file): both are hashes keyed
by line index and written with HSETNX, so a line that is collected twice still counts once.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from tasks import jobs, keys

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
TERMINAL: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
Endpoint = Literal["/v1/chat/completions", "/v1/responses"]


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(16)}"


class BatchSpec(BaseModel):
    """What the batch was created with; written once."""

    id: str
    endpoint: Endpoint
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None = None
    created_at: int
    expires_at: int
    owner: str | None = None  # api.edge.auth.owner_tag; other keys see 404


class LineError(BaseModel):
    """A problem with the input file found at validation (OpenAI's `errors.data` items)."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


# A line's job, as validated, has this id: each attempt at the line gets its own when it is
# enqueued (api/batches/runner.py derives it from the batch, the line and the attempt).
LINE_JOB_ID = "pending"


class Line(BaseModel):
    """One input line, validated: the job to run for it, or None if the endpoint refused it (the
    error line is then written at validation)."""

    custom_id: str
    job: jobs.NewJob | None = None


class BatchRecord(BaseModel):
    spec: BatchSpec
    status: BatchStatus
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[LineError] = Field(default_factory=list)
    total: int = 0
    enqueued: int = 0  # lines [0, enqueued) have been handed to the queue
    collected: int = 0  # entries [0, collected) of the done list have been collected
    completed: int = 0
    failed: int = 0
    # Set when the batch winds down early: "cancelled" or "expired"; every open line then ends
    # with that as its error code.
    ending: str | None = None
    wound_down: bool = False  # every open job has been asked to stop

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


# ARGV: from statuses (comma-separated), to status, batch id, then field/value pairs. Moves the
# batch only if its status is one of `from`; 1 if it moved. A move to a terminal status records the ending
# in the ended stream in the same step (kind `batch`), as end_job does a job's, so no batch ends
# without the entry its webhook is made from.
_TRANSITION = (
    f"local ENDED, ENDED_MAXLEN = '{keys.ENDED}', {jobs.ENDED_MAXLEN}\n"
    f"local TERMINAL = {{{', '.join(f'{s}=true' for s in sorted(TERMINAL))}}}\n"
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == status then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 4))
if TERMINAL[ARGV[2]] then
  local t = redis.call('TIME')
  local at = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000)
  redis.call('XADD', ENDED, 'MAXLEN', '~', ENDED_MAXLEN, '*', 'id', ARGV[3], 'kind', 'batch',
             'status', ARGV[2], 'at', at)
end
return 1
"""
)

# ARGV: holder, seconds. Takes or renews the lease if free or already this holder's; 1 if held.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

_PARTS = ("lines", "jobs", "line_of", "attempts", "results", "errors", "done", "lease")


class BatchStore:
    def __init__(self, client: aioredis.Redis, ttl_seconds: int) -> None:
        self._redis = client
        self._ttl = ttl_seconds  # an ended batch's record lives as long as its files
        self._transition = client.register_script(_TRANSITION)
        self._lease = client.register_script(_LEASE)

    async def now(self) -> int:
        """Redis's clock, in seconds. A batch's window is read by the claim script, on Redis's
        clock, and by any API instance: one clock for all of them."""
        seconds, _ = await self._redis.time()
        return int(seconds)

    async def new_spec(self, window_seconds: int, **fields: Any) -> BatchSpec:
        created_at = await self.now()
        return BatchSpec(
            id=new_batch_id(), created_at=created_at, expires_at=created_at + window_seconds, **fields
        )

    async def create(self, spec: BatchSpec) -> None:
        pipe = self._redis.pipeline(transaction=True)
        # expires_at on its own too: the claim script reads it to keep lines of an expired batch
        # from starting.
        record = {"spec": spec.model_dump_json(), "status": "validating", "expires_at": str(spec.expires_at)}
        pipe.hset(keys.batch(spec.id), mapping=record)  # type: ignore[arg-type]
        pipe.zadd(keys.batches_of(spec.owner), {spec.id: spec.created_at})
        pipe.sadd(keys.BATCHES_ACTIVE, spec.id)
        await pipe.execute()

    async def get(self, batch_id: str) -> BatchRecord | None:
        fields: dict[str, str] = await self._redis.hgetall(keys.batch(batch_id))  # type: ignore[misc,assignment]
        if not fields:
            return None
        data: dict[str, Any] = {k: v for k, v in fields.items() if k not in ("spec", "errors")}
        record = BatchRecord(
            spec=BatchSpec.model_validate_json(fields["spec"]),
            errors=[LineError.model_validate(e) for e in _json_list(fields.get("errors"))],
            **data,
        )
        if not record.is_terminal:  # live counts
            pipe = self._redis.pipeline(transaction=False)
            pipe.hlen(self.part(batch_id, "results"))
            pipe.hlen(self.part(batch_id, "errors"))
            record.completed, record.failed = await pipe.execute()
        return record

    async def owned(self, owner: str | None, *, newest_first: bool = True) -> list[str]:
        ids = await self._redis.zrange(keys.batches_of(owner), 0, -1, desc=newest_first)
        return cast(list[str], ids)

    async def forget(self, owner: str | None, batch_ids: list[str]) -> None:
        """Drop ids whose record expired from the owner's index."""
        if batch_ids:
            await self._redis.zrem(keys.batches_of(owner), *batch_ids)

    async def active(self) -> list[str]:
        ids = await self._redis.smembers(keys.BATCHES_ACTIVE)  # type: ignore[misc]
        return sorted(cast(set[str], ids))

    async def active_statuses(self) -> dict[str, int]:
        """How many batches not yet ended are in each status."""
        ids = await self.active()
        pipe = self._redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hget(keys.batch(batch_id), "status")
        counts: dict[str, int] = {}
        for status in await pipe.execute():
            if status is not None:
                counts[status] = counts.get(status, 0) + 1
        return counts

    async def transition(self, batch_id: str, from_: tuple[str, ...], to: str, **fields: Any) -> bool:
        pairs = [str(x) for kv in fields.items() for x in kv]
        args = [",".join(from_), to, batch_id, *pairs]
        moved = await self._transition(keys=[keys.batch(batch_id)], args=args)
        return bool(moved)

    async def update(self, batch_id: str, **fields: Any) -> None:
        await self._redis.hset(keys.batch(batch_id), mapping={k: str(v) for k, v in fields.items()})  # type: ignore[misc]

    async def lease(self, batch_id: str, holder: str, seconds: int) -> bool:
        return bool(await self._lease(keys=[self.part(batch_id, "lease")], args=[holder, seconds]))

    def part(self, batch_id: str, name: str) -> str:
        assert name in _PARTS
        return keys.batch_part(batch_id, name)

    async def write_lines(self, batch_id: str, lines: list[Line], refused: dict[int, str]) -> None:
        """The validated lines and the error lines of those the endpoint refused, in one go.

        Repeatable: a second validation of the same file writes the same lines, and error lines
        are only added (HSETNX), so nothing another instance collected meanwhile is lost."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.part(batch_id, "lines"))
        for start in range(0, len(lines), 1000):
            chunk = lines[start : start + 1000]
            pipe.rpush(self.part(batch_id, "lines"), *[x.model_dump_json() for x in chunk])
        for line, text in refused.items():
            pipe.hsetnx(self.part(batch_id, "errors"), str(line), text)
        pipe.hset(keys.batch(batch_id), "total", str(len(lines)))
        await pipe.execute()

    async def lines(self, batch_id: str, start: int, count: int) -> list[Line]:
        raw = await self._redis.lrange(self.part(batch_id, "lines"), start, start + count - 1)  # type: ignore[misc]
        return [Line.model_validate_json(x) for x in raw]

    async def done(self, batch_id: str, start: int, count: int) -> list[str]:
        ids = await self._redis.lrange(self.part(batch_id, "done"), start, start + count - 1)  # type: ignore[misc]
        return cast(list[str], ids)

    async def jobs_of(self, batch_id: str) -> dict[int, str]:
        """line -> the job now running it (every line assigned so far: for winding down)."""
        raw: dict[str, str] = await self._redis.hgetall(self.part(batch_id, "jobs"))  # type: ignore[misc,assignment]
        return {int(k): v for k, v in raw.items()}

    async def current_jobs(self, batch_id: str, lines: list[int]) -> dict[int, str | None]:
        """For these lines, the job now running each (None: none assigned yet)."""
        if not lines:
            return {}
        values = await self._redis.hmget(self.part(batch_id, "jobs"), [str(i) for i in lines])  # type: ignore[misc]
        return dict(zip(lines, cast(list[str | None], values), strict=True))

    async def lines_of(self, batch_id: str, job_ids: list[str]) -> dict[str, int | None]:
        """For these jobs, the line each was assigned to (None: not a job of this batch)."""
        if not job_ids:
            return {}
        values = await self._redis.hmget(self.part(batch_id, "line_of"), job_ids)  # type: ignore[misc]
        return {j: (int(v) if v is not None else None) for j, v in zip(job_ids, values, strict=True)}

    async def assign(self, batch_id: str, jobs: dict[int, tuple[str, int]]) -> None:
        """Record the job (and which attempt it is) now running each of these lines."""
        if not jobs:
            return
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self.part(batch_id, "jobs"), mapping={str(k): v[0] for k, v in jobs.items()})
        pipe.hset(self.part(batch_id, "line_of"), mapping={v[0]: str(k) for k, v in jobs.items()})
        pipe.hset(self.part(batch_id, "attempts"), mapping={str(k): str(v[1]) for k, v in jobs.items()})
        await pipe.execute()

    async def attempts(self, batch_id: str, line: int) -> int:
        value = await self._redis.hget(self.part(batch_id, "attempts"), str(line))  # type: ignore[misc]
        return int(value or 0)

    async def ended_lines(self, batch_id: str) -> set[int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hkeys(self.part(batch_id, "results"))
        pipe.hkeys(self.part(batch_id, "errors"))
        results, errors = await pipe.execute()
        return {int(x) for x in results} | {int(x) for x in errors}

    async def record_results(self, batch_id: str, results: dict[int, str], errors: dict[int, str]) -> None:
        """Each line's output or error line, unless that line already has one (HSETNX)."""
        pipe = self._redis.pipeline(transaction=True)
        for line, text in results.items():
            pipe.hsetnx(self.part(batch_id, "results"), str(line), text)
        for line, text in errors.items():
            pipe.hsetnx(self.part(batch_id, "errors"), str(line), text)
        await pipe.execute()

    async def outputs(self, batch_id: str) -> tuple[dict[int, str], dict[int, str]]:
        """Every line's output or error line; read in pages, as a batch may hold 50,000."""
        out: list[dict[int, str]] = []
        for part in ("results", "errors"):
            lines: dict[int, str] = {}
            async for key, value in self._redis.hscan_iter(self.part(batch_id, part), count=1000):
                lines[int(key)] = value
            out.append(lines)
        return out[0], out[1]

    async def close(self, batch_id: str) -> None:
        """The batch has ended: drop its working sets, keep its record as long as its files."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(*[self.part(batch_id, p) for p in _PARTS])
        pipe.srem(keys.BATCHES_ACTIVE, batch_id)
        pipe.expire(keys.batch(batch_id), self._ttl)
        await pipe.execute()


def _json_list(text: str | None) -> list[Any]:
    if not text:
        return []
    value = json.loads(text)
    return value if isinstance(value, list) else []
