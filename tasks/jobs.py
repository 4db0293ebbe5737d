"""The job record: what was asked, where it stands, how it ended; and the Redis scripts that
move it between states atomically.

States: queued -> in_progress -> completed | incomplete | failed | cancelled. A job reaches
exactly one terminal state: the scripts below refuse to append to, or end, a job that has
already ended, whoever (worker, API, a later reaper) tries.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from model.types import ChatMessage
from model.types import ToolCall as ModelToolCall
from tasks import events, keys, quotas
from tasks.sampling import Sampling

JobStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
# What the job answers: a chat completion or a Response. A line of a batch is one of these too;
# its batch is a separate field (JobSpec.batch), as a line is answered as its endpoint answers.
JobKind = Literal["chat", "response"]
# The id prefix of each kind, as OpenAI's ids have them.
ID_PREFIXES: dict[JobKind, str] = {"chat": "chatcmpl-", "response": "resp_"}


def new_job_id(kind: JobKind) -> str:
    """An unguessable id: the kind's prefix and 128 random bits."""
    return f"{ID_PREFIXES[kind]}{secrets.token_hex(16)}"


def estimated_prompt_tokens(spec: JobSpec) -> int:
    """The prompt's size before any tokenizer has seen it: a character count over four, as
    OpenAI's rule of thumb. The fair index charges it when the job is claimed, and the job's end
    settles the difference from the real count (the job record's `estimate` field)."""
    return math.ceil(sum(len(m.content) for m in spec.messages) / 4)


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: str  # JSON text, as the client sent it (checked to be an object by the API)


class Message(BaseModel):
    role: str
    content: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None


class ResponseOptions(BaseModel):
    """What a Responses API job echoes back on its Response object."""

    instructions: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    max_output_tokens: int | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)  # as the request gave them
    tool_choice: str | dict[str, Any] = "none"
    parallel_tool_calls: bool = True
    # Stored conversations (api/responses/conversations.py): whether the response's input and
    # output may be listed and continued, the response it continued, and how an over-long
    # conversation is cut.
    store: bool = True
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] = "disabled"


class JobSpec(BaseModel):
    """Everything a worker needs to run the job, and nothing else; written once when the job is
    created, and handed to the worker that claims it (CLAIM returns it)."""

    id: str
    kind: JobKind
    model: str
    messages: list[Message]
    sampling: Sampling
    # Set for a line of a batch (tasks/batches.py): its batch's id. The job then queues outside
    # MAX_QUEUED, behind every interactive job, and its end is reported to the batch.
    batch: str | None = None
    # Function tools the prompt offers the model ({"type": "function", "function": {...}}); the
    # API has already checked them and holds the grammar its calls follow in `sampling.grammar`.
    tools: list[dict[str, Any]] = Field(default_factory=list)
    # A Responses request's truncation: "auto": the worker drops the oldest turns of a prompt too
    # long for its model until it fits (model/chat.py truncated()), where it would otherwise fail
    # it with context_length_exceeded.
    truncate: bool = False

    def to_messages(self) -> list[ChatMessage]:
        return [
            ChatMessage(
                m.role,
                m.content,
                tuple(ModelToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
                m.tool_call_id,
            )
            for m in self.messages
        ]


class JobMeta(BaseModel):
    """What only the API reads back about a job. Workers never see it: it is stored beside the
    spec (the job hash's `meta` field), by the same script that admits the job."""

    # The creating API key's owner tag (api.edge.auth.owner_tag), never the key; None without API_KEYS.
    # Only callers with the same tag may read, resume or cancel the job.
    owner: str | None = None
    response: ResponseOptions | None = None  # what a Response echoes (jobs of kind "response")


class NewJob(BaseModel):
    """A job as the API creates it: the worker's spec and the API's meta, admitted together."""

    spec: JobSpec
    meta: JobMeta = Field(default_factory=JobMeta)


class JobRecord(BaseModel):
    """The job as stored in its Redis hash."""

    spec: JobSpec
    meta: JobMeta
    status: JobStatus
    created_at: float  # when it was admitted, by Redis's clock (as every time in the record)
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> JobRecord:
        data: dict[str, object] = {k: v for k, v in fields.items() if k not in _JSON_FIELDS and v != ""}
        return cls(
            spec=JobSpec.model_validate_json(fields["spec"]),
            meta=JobMeta.model_validate_json(fields["meta"]),
            **data,  # type: ignore[arg-type]
        )


_JSON_FIELDS = ("spec", "meta")


class Ended(BaseModel):
    """An entry of the ended stream (keys.ENDED): one job's ending, as end_job recorded it."""

    id: str
    kind: JobKind
    status: JobStatus
    at: float  # Redis's clock, as the record's finished_at
    batch: str | None = None


def status_for(event: events.Finished | events.Failed) -> JobStatus:
    if isinstance(event, events.Failed):
        return "failed"
    statuses = {
        "stop": "completed",
        "length": "incomplete",
        "time_limit": "incomplete",
        "cancelled": "cancelled",
    }
    return statuses[event.finish_reason]  # type: ignore[return-value]


def terminal_fields(event: events.Finished | events.Failed) -> dict[str, str]:
    """The record's final fields, but `finished_at`: end_job stamps that with Redis's clock."""
    fields: dict[str, str] = {"status": status_for(event)}
    if isinstance(event, events.Failed):
        fields |= {"error_code": event.code, "error_message": event.message}
    else:
        fields |= {
            "finish_reason": event.finish_reason,
            "prompt_tokens": str(event.prompt_tokens),
            "completion_tokens": str(event.completion_tokens),
        }
    return fields


# --- Lua scripts: every state change of a job is one atomic script ---------------------------
#
# Every time a script records or compares (admission, claim, lease, queue deadline, a batch's
# window, the end) is Redis's own clock (TIME), never a caller's: the API and the workers run on
# different hosts, whose clocks need not agree. Redis >= 5 replicates scripts by their effects,
# so TIME is allowed before writes (7.0 is what we run).

# How many entries the ended stream keeps (about; XADD trims whole macro nodes). It is a feed,
# not the record (the job hashes are): a consumer reads it within minutes, and 100k endings
# are hours of a busy deployment's traffic, in roughly 15 MB.
ENDED_MAXLEN = 100_000

WORKER_LOST_MESSAGE = "The worker running this job stopped."
QUEUE_TIMEOUT_MESSAGE = "The job waited in the queue past its deadline."
# Per-job scripts take KEYS = _job_keys(job_id) and ARGV[1] = job id, ARGV[2] = ttl seconds.

_JOB_KEYS = "local job, log, channel, cancel, lease, running, queued = unpack(KEYS)\n"

_CONSTANTS = (
    f"local METRICS, BATCH_PREFIX = '{keys.METRICS}', '{keys.BATCH_PREFIX}'\n"
    f"local QUEUED_OF, METRICS_OF = '{keys.queued_of('')}', '{keys.metrics_of('')}'\n"
    f"local BATCH_QUEUED, BATCH_RUNNING = '{keys.BATCH_QUEUED}', '{keys.BATCH_RUNNING}'\n"
    f"local ENDED, ENDED_MAXLEN = '{keys.ENDED}', {ENDED_MAXLEN}\n"
    f"local WORKER_LOST_MESSAGE = '{WORKER_LOST_MESSAGE}'\n"
    f"local QUEUE_TIMEOUT_MESSAGE = '{QUEUE_TIMEOUT_MESSAGE}'\n"
    + """
-- Redis's clock, in seconds; and as a record stores it (tostring would keep 14 digits only).
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function stamp(seconds)
  return string.format('%.6f', seconds)
end
"""
)

_FAIR = (
    f"local FAIR_OWNERS, FAIR_JOBS = '{keys.FAIR_OWNERS}', '{keys.FAIR_JOBS}'\n"
    f"local FAIR_COUNTERS = '{keys.FAIR_COUNTERS}'\n"
    f"local OWNER_QUEUED, OWNER_RUNNING = '{keys.OWNER_QUEUED}', '{keys.OWNER_RUNNING}'\n"
    + """
-- The fair index (tasks/keys.py): per model and tier, the backlogged owners scored by their
-- virtual token counter (VTC, "Fairness in Serving Large Language Models", OSDI 2024), each
-- one's waiting jobs, and the counters. The counters hash's FLOOR field is where a newly
-- backlogged owner starts when no other owner is backlogged: the last one to leave's counter.
-- Owner tags are hex or '-', so they never collide with it.
local FLOOR = '~floor'
local function tier_of(batch)
  if batch then return 'batch' end
  return 'interactive'
end
local function fair_keys(model, tier, owner)
  return FAIR_OWNERS .. tier .. ':' .. model, FAIR_JOBS .. tier .. ':' .. owner .. ':' .. model,
         FAIR_COUNTERS .. tier .. ':' .. model
end
-- A job joins its owner's waiting jobs. An owner that had none joins the backlogged owners with
-- its counter lifted to the smallest backlogged one's (the floor if none is): a key banks no
-- credit while it is idle, so it cannot come back and hold the workers for as long as it was away.
local function fair_add(model, tier, owner, id, now)
  local owners, waiting, counters = fair_keys(model, tier, owner)
  redis.call('ZADD', waiting, now, id)
  if redis.call('ZSCORE', owners, owner) then return end
  local counter = tonumber(redis.call('HGET', counters, owner) or '0')
  local least = redis.call('ZRANGE', owners, 0, 0, 'WITHSCORES')[2] or redis.call('HGET', counters, FLOOR)
  if least and tonumber(least) > counter then
    counter = tonumber(least)
    redis.call('HSET', counters, owner, counter)
  end
  redis.call('ZADD', owners, counter, owner)
end
-- A job leaves its owner's waiting jobs; an owner left with none leaves the backlogged owners.
local function fair_drop(model, tier, owner, id)
  local owners, waiting, counters = fair_keys(model, tier, owner)
  if redis.call('ZREM', waiting, id) == 0 or redis.call('EXISTS', waiting) == 1 then return end
  redis.call('ZREM', owners, owner)
  if redis.call('EXISTS', owners) == 0 then
    local counter = tonumber(redis.call('HGET', counters, owner) or '0')
    if counter > tonumber(redis.call('HGET', counters, FLOOR) or '0') then
      redis.call('HSET', counters, FLOOR, counter)
    end
  end
end
-- Add `cost` to an owner's counter, keeping its score among the backlogged owners equal to it.
local function fair_charge(model, tier, owner, cost)
  local owners, _, counters = fair_keys(model, tier, owner)
  local counter = redis.call('HINCRBYFLOAT', counters, owner, cost)
  redis.call('ZADD', owners, 'XX', counter, owner)
end
"""
)

_PRELUDE = (
    _CONSTANTS
    + quotas.CHARGE_TOKENS
    + _FAIR
    + """
local function is_open(status)
  return status == 'queued' or status == 'in_progress'
end
-- The value of the first of `names` among the field/value pairs, or nil.
local function field_of(fields, names)
  for i = 1, #fields, 2 do
    if names[fields[i]] then return fields[i + 1] end
  end
  return nil
end
-- A job leaves the fair index and its owner's waiting interactive jobs.
local function fair_unqueue(job, id)
  local model, owner, batch = unpack(redis.call('HMGET', job, 'model', 'owner', 'batch'))
  if not (model and owner) then return end
  fair_drop(model, tier_of(batch), owner, id)
  if not batch then redis.call('ZREM', OWNER_QUEUED .. owner, id) end
end
-- A job's end: it stops counting against its owner's running share, and a claimed job's charge
-- is settled from its estimate to what it took (input x1, output x2, over the owner's weight).
-- An ending without token counts (a failure) keeps the estimate charged.
local function fair_end(job, id, fields)
  local model, owner, batch, started_at, estimate, weight =
    unpack(redis.call('HMGET', job, 'model', 'owner', 'batch', 'started_at', 'estimate', 'weight'))
  if not (model and owner) then return end
  redis.call('SREM', OWNER_RUNNING .. owner, id)
  if not started_at then return end
  local prompt = tonumber(field_of(fields, {prompt_tokens = true}) or estimate)
  local completion = tonumber(field_of(fields, {completion_tokens = true}) or '0')
  local cost = (prompt - tonumber(estimate) + 2 * completion) / tonumber(weight)
  if cost ~= 0 then fair_charge(model, tier_of(batch), owner, cost) end
end
-- Drop a job from the queued index and its model's (the model's name is in the job hash).
local function unqueue(job, queued, id)
  redis.call('ZREM', queued, id)
  local model = redis.call('HGET', job, 'model')
  if model then redis.call('ZREM', QUEUED_OF .. model, id) end
  fair_unqueue(job, id)
end
-- Append the terminal event, write the final fields and the time, drop the job from every
-- index, count it (in its model's metrics), and record the ending once in the ended stream.
-- Callers check first that the job is open: a job ends once.
local function end_job(job, log, channel, lease, running, queued, id, ttl, event, fields)
  local seq = redis.call('RPUSH', log, event) - 1
  local outcome = field_of(fields, {finish_reason = true, error_code = true}) or 'unknown'
  local model = redis.call('HGET', job, 'model')
  redis.call('HINCRBY', model and (METRICS_OF .. model) or METRICS, 'outcome:' .. outcome, 1)
  local now = stamp(clock())
  redis.call('HSET', job, 'finished_at', now, unpack(fields))
  charge_tokens(job, fields)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', log, ttl)
  redis.call('DEL', lease)
  redis.call('SREM', running, id)
  unqueue(job, queued, id)
  fair_end(job, id, fields)
  local kind, batch = unpack(redis.call('HMGET', job, 'kind', 'batch'))
  local entry = {'id', id, 'kind', kind or '', 'status', field_of(fields, {status = true}), 'at', now}
  if batch then
    table.insert(entry, 'batch')
    table.insert(entry, batch)
  end
  redis.call('XADD', ENDED, 'MAXLEN', '~', ENDED_MAXLEN, '*', unpack(entry))
  if batch then
    redis.call('SREM', BATCH_RUNNING, id)
    redis.call('ZREM', BATCH_QUEUED, id)
    -- Reported to its batch while that is being carried; an ended batch has no working sets.
    local batch_status = redis.call('HGET', BATCH_PREFIX .. batch, 'status')
    if batch_status and batch_status ~= 'completed' and batch_status ~= 'failed'
        and batch_status ~= 'expired' and batch_status ~= 'cancelled' then
      redis.call('RPUSH', BATCH_PREFIX .. batch .. ':done', id)
    end
  end
  redis.call('PUBLISH', channel, seq .. ' ' .. event)
  return seq
end
-- Move a queued job to in_progress under a lease its worker keeps renewing, and charge its
-- owner's counter the prompt's estimate. Returns {spec json, seconds it waited, owner} if this
-- caller got it; false if it had ended or been taken, or if it ends here: past its queue deadline
-- (failed, queue_timeout), or a line of a batch that is being cancelled, has failed or has expired
-- (cancelled).
local function claim_job(job, log, channel, lease, running, queued, id, ttl, worker, lease_seconds,
                         cancelled_event, queue_timeout, timed_out_event)
  if redis.call('HGET', job, 'status') ~= 'queued' then return false end
  local now = clock()
  local created_at, batch = unpack(redis.call('HMGET', job, 'created_at', 'batch'))
  local waited = now - tonumber(created_at)
  if batch then
    -- A line of a batch that is being cancelled, has failed (api/batches/runner.py gave it up) or
    -- whose window has closed never starts, even if its batch has not yet been wound down.
    local b_status, b_expires = unpack(redis.call('HMGET', BATCH_PREFIX .. batch, 'status', 'expires_at'))
    if b_status == 'cancelling' or b_status == 'cancelled' or b_status == 'failed'
        or (b_expires and now >= tonumber(b_expires)) then
      end_job(job, log, channel, lease, running, queued, id, ttl, cancelled_event,
              {'status', 'cancelled', 'finish_reason', 'cancelled'})
      return false
    end
  elseif waited > tonumber(queue_timeout) then
    -- A message that reaches a worker after its job's queue deadline, before the reaper ended it.
    -- Batch lines have none: their batch's completion window bounds them.
    end_job(job, log, channel, lease, running, queued, id, ttl, timed_out_event,
            {'status', 'failed', 'error_code', 'queue_timeout', 'error_message', QUEUE_TIMEOUT_MESSAGE})
    return false
  end
  redis.call('HSET', job, 'status', 'in_progress', 'worker', worker, 'started_at', stamp(now))
  -- Charged before it leaves the index: an owner leaving last sets the floor with this charge.
  local owner, estimate, weight, model =
    unpack(redis.call('HMGET', job, 'owner', 'estimate', 'weight', 'model'))
  if owner then
    if not batch then redis.call('SADD', OWNER_RUNNING .. owner, id) end
    fair_charge(model, tier_of(batch), owner, tonumber(estimate) / tonumber(weight))
  end
  unqueue(job, queued, id)
  redis.call('SADD', running, id)
  if batch then
    redis.call('ZREM', BATCH_QUEUED, id)
    redis.call('SADD', BATCH_RUNNING, id)
  end
  redis.call('SET', lease, worker, 'EX', lease_seconds)
  return {redis.call('HGET', job, 'spec'), stamp(waited), owner or ''}
end
"""
)

# KEYS: job, queued index, the model's queued index. ARGV: id, ttl, spec json, meta json, kind,
# model, max queued, queue timeout, owner tag ('-' without API_KEYS), estimated prompt tokens
# (tasks/quotas.py). Records a queued job, created now, unless MAX_QUEUED jobs of
# its model wait; returns its created_at, or false if not admitted. Counting the queued index
# (not Celery's list) means cancelled and expired jobs stop counting at once; entries older
# than the queue timeout are dropped first (their jobs have ended, or the reaper ends them now),
# so the count cannot drift. The kind and model are copied out of the spec into fields of their
# own so that scripts (end_job) read them without decoding JSON.
# Fair shares: KEYS also the owner's waiting and running jobs; ARGV also owner, estimated prompt
# tokens, weight, MAX_QUEUED_PER_KEY, MAX_RUNNING_PER_KEY (0: off). A key with that many
# interactive jobs waiting (or running), of any model, is refused with 'over:queued' (or
# 'over:running'). Its waiting ones are pruned by the queue deadline as the model's are.
ADMIT = (
    _CONSTANTS
    + _FAIR
    + """
local job, queued, model_queued, owner_queued, owner_running = unpack(KEYS)
local owner, max_queued_per_key, max_running_per_key = ARGV[9], tonumber(ARGV[12]), tonumber(ARGV[13])
-- Ids are new per request, so a record already there is this very admission run again (a retry
-- after a lost reply, which a failover makes likely): answer as the first run did, change nothing
-- (running it again would put a job a worker may have claimed meanwhile back to queued).
local admitted_at = redis.call('HGET', job, 'created_at')
if admitted_at then return admitted_at end
local now = clock()
redis.call('ZREMRANGEBYSCORE', model_queued, '-inf', '(' .. (now - tonumber(ARGV[8])))
redis.call('ZREMRANGEBYSCORE', owner_queued, '-inf', '(' .. (now - tonumber(ARGV[8])))
if max_queued_per_key > 0 and redis.call('ZCARD', owner_queued) >= max_queued_per_key then
  return 'over:queued'
end
if max_running_per_key > 0 and redis.call('SCARD', owner_running) >= max_running_per_key then
  return 'over:running'
end
if redis.call('ZCARD', model_queued) >= tonumber(ARGV[7]) then return false end
redis.call('HSET', job, 'status', 'queued', 'spec', ARGV[3], 'meta', ARGV[4], 'kind', ARGV[5],
           'model', ARGV[6], 'created_at', stamp(now), 'owner', owner, 'estimate', ARGV[10],
           'weight', ARGV[11])
redis.call('EXPIRE', job, ARGV[2])
redis.call('ZADD', queued, now, ARGV[1])
redis.call('ZADD', model_queued, now, ARGV[1])
redis.call('ZADD', owner_queued, now, ARGV[1])
fair_add(ARGV[6], 'interactive', owner, ARGV[1], now)
return stamp(now)
"""
)

# ARGV: id, ttl, spec json, meta json, kind, model, batch id, owner, estimated prompt tokens,
# weight. Records a queued batch line unless the job exists (a second enqueue of the same line,
# after an API restart, changes nothing); 1 if recorded. It waits in its owner's batch tier of
# the fair index, outside the owner's interactive caps.
ADMIT_BATCH_LINE = (
    _CONSTANTS
    + _FAIR
    + """
local job = KEYS[1]
if redis.call('EXISTS', job) == 1 then return 0 end
local now = clock()
redis.call('HSET', job, 'status', 'queued', 'spec', ARGV[3], 'meta', ARGV[4], 'kind', ARGV[5],
           'model', ARGV[6], 'created_at', stamp(now), 'batch', ARGV[7], 'owner', ARGV[8],
           'estimate', ARGV[9], 'weight', ARGV[10])
redis.call('EXPIRE', job, ARGV[2])
redis.call('ZADD', BATCH_QUEUED, now, ARGV[1])
fair_add(ARGV[6], 'batch', ARGV[8], ARGV[1], now)
return 1
"""
)

# ARGV: id, ttl, event json, '1' if terminal, then field/value pairs for the record; or '0'
# and the write's number (append: rising, per worker process). Appends the event unless the job
# already ended; returns its sequence number, or -1. Runs once per event: a retried call (its
# reply lost with a connection, as at a Sentinel failover) finds the job ended, or its number
# not above the job's `written`, and appends nothing twice.
APPEND_EVENT = (
    _PRELUDE
    + _JOB_KEYS
    + """
local id, ttl, event = ARGV[1], ARGV[2], ARGV[3]
if not is_open(redis.call('HGET', job, 'status')) then return -1 end
if ARGV[4] == '1' then
  return end_job(job, log, channel, lease, running, queued, id, ttl, event, {unpack(ARGV, 5)})
end
local write = tonumber(ARGV[5])
if write then
  if write <= tonumber(redis.call('HGET', job, 'written') or '0') then return -1 end
  redis.call('HSET', job, 'written', ARGV[5])
end
local seq = redis.call('RPUSH', log, event) - 1
redis.call('EXPIRE', log, ttl)
redis.call('PUBLISH', channel, seq .. ' ' .. event)
return seq
"""
)

# ARGV: id, ttl, worker name, lease seconds, cancelled-event json, queue timeout seconds,
# queue-timeout event json. Moves a queued job to in_progress under a lease the worker keeps
# renewing (claim_job; workers run CLAIM_NEXT, this claims one job by id). Returns {spec json,
# seconds it waited, owner} if this caller got it (the Celery message
# carries only the id: the spec travels once); false if it was already taken, ended or expired
# (a redelivered message, a cancelled or timed-out job), if it waited past its queue deadline
# (it then fails, queue_timeout), or if it is a line of a batch that is being cancelled, has
# failed or has expired (it then ends cancelled).
CLAIM = (
    _PRELUDE
    + _JOB_KEYS
    + """
return claim_job(job, log, channel, lease, running, queued, unpack(ARGV, 1, 7))
"""
)

# KEYS: running set, queued index. ARGV: key prefix, ttl, worker name, lease seconds,
# cancelled-event json, queue timeout seconds, queue-timeout event json, model, MAX_RUNNING_PER_KEY
# (0: none), most jobs to end before giving up. What a worker's wake-up runs: it claims, for
# `model`, the oldest waiting job of the backlogged owner with the smallest counter, interactive
# jobs before batch lines, passing over owners at their running cap (interactive jobs only: batch
# lines have no cap). Jobs it finds past their deadline or of a batch winding down end as CLAIM
# ends them, and it tries the next. Returns CLAIM's reply; 0 if nothing is waiting that it may
# take; 1 if it ended its quota of jobs and more may wait (call again).
CLAIM_NEXT = (
    _PRELUDE
    + """
local running, queued = KEYS[1], KEYS[2]
local prefix, model, cap, budget = ARGV[1], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local function pick(owners, tier)
  for _, owner in ipairs(redis.call('ZRANGE', owners, 0, -1)) do
    if tier == 'batch' or cap <= 0 or redis.call('SCARD', OWNER_RUNNING .. owner) < cap then
      return owner
    end
  end
  return nil
end
for _, tier in ipairs({'interactive', 'batch'}) do
  local owners = fair_keys(model, tier, '')
  while true do
    local owner = pick(owners, tier)
    if not owner then break end
    local _, waiting = fair_keys(model, tier, owner)
    local id = redis.call('ZRANGE', waiting, 0, 0)[1]
    if not id then
      redis.call('ZREM', owners, owner)  -- never left so by the scripts; repaired all the same
    else
      local job = prefix .. id
      local got = claim_job(job, job .. ':log', job .. ':events', job .. ':lease', running, queued,
                            id, unpack(ARGV, 2, 7))
      if got then return got end
      -- It ended here, or had ended (or expired) without leaving the index: gone either way.
      fair_drop(model, tier, owner, id)
      budget = budget - 1
      if budget <= 0 then return 1 end
    end
  end
end
return 0
"""
)

# ARGV: id. Deletes a queued job whose Celery message the broker refused (the API answers 503),
# unless a worker has claimed it already; 1 if deleted.
WITHDRAW = (
    _PRELUDE
    + _JOB_KEYS
    + """
if redis.call('HGET', job, 'status') ~= 'queued' then return 0 end
unqueue(job, queued, ARGV[1])
redis.call('DEL', job)
return 1
"""
)

# KEYS: the job's hash, log and cancel flag. Deletes an ended job (DELETE /v1/responses/{id});
# returns 'deleted', the status of a job still open (left as it is), or false if there is none.
DELETE_ENDED = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'in_progress' then return status end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 'deleted'
"""

# ARGV: id, ttl, cancelled-event json. Ends a queued job at once; flags a running one for its
# worker, which stops between tokens. Returns the status the job had.
CANCEL = (
    _PRELUDE
    + _JOB_KEYS
    + """
local status = redis.call('HGET', job, 'status')
if status == 'queued' then
  end_job(job, log, channel, lease, running, queued, ARGV[1], ARGV[2], ARGV[3],
          {'status', 'cancelled', 'finish_reason', 'cancelled'})
elseif status == 'in_progress' then
  redis.call('SET', cancel, '1', 'EX', ARGV[2])
end
return status
"""
)

# KEYS: running set, queued index. ARGV: key prefix, ttl, queue timeout seconds, worker-lost
# event json, queue-timeout event json. Fails running jobs whose lease expired (their worker
# died) and queued jobs past their deadline; returns how many it ended. It works across jobs,
# so it builds their key names from the prefix in tasks/keys.py.
REAP = (
    _PRELUDE
    + """
local running, queued = KEYS[1], KEYS[2]
local prefix, ttl = ARGV[1], ARGV[2]
local ended = 0
local function fail(id, event, code, message)
  local job = prefix .. id
  if is_open(redis.call('HGET', job, 'status')) then
    end_job(job, job .. ':log', job .. ':events', job .. ':lease', running, queued, id, ttl, event,
            {'status', 'failed', 'error_code', code, 'error_message', message})
    ended = ended + 1
  else
    redis.call('SREM', running, id)
    unqueue(job, queued, id)
    fair_end(job, id, {})
    redis.call('SREM', BATCH_RUNNING, id)
    redis.call('ZREM', BATCH_QUEUED, id)
  end
end
for _, id in ipairs(redis.call('SMEMBERS', running)) do
  if redis.call('EXISTS', prefix .. id .. ':lease') == 0 then
    fail(id, ARGV[4], 'worker_lost', WORKER_LOST_MESSAGE)
  end
end
local cutoff = clock() - tonumber(ARGV[3])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', queued, '-inf', '(' .. cutoff)) do
  fail(id, ARGV[5], 'queue_timeout', QUEUE_TIMEOUT_MESSAGE)
end
return ended
"""
)

# KEYS: the model's Celery lists (keys.generate_lists). ARGV: model, MAX_RUNNING_PER_KEY (0: none).
# Read only: {jobs a wake-up could claim now, messages waiting in the lists}. Jobs of owners at
# their running cap do not count: a wake-up would find nothing for them; the end of one of their
# jobs sends theirs (tasks/generate.py).
WAKE_DEFICIT = (
    _CONSTANTS
    + _FAIR
    + """
local model, cap = ARGV[1], tonumber(ARGV[2])
local waiting, messages = 0, 0
for _, tier in ipairs({'interactive', 'batch'}) do
  local owners = fair_keys(model, tier, '')
  for _, owner in ipairs(redis.call('ZRANGE', owners, 0, -1)) do
    if tier == 'batch' or cap <= 0 or redis.call('SCARD', OWNER_RUNNING .. owner) < cap then
      local _, jobs = fair_keys(model, tier, owner)
      waiting = waiting + redis.call('ZCARD', jobs)
    end
  end
end
for _, list in ipairs(KEYS) do
  messages = messages + redis.call('LLEN', list)
end
return {waiting, messages}
"""
)

WORKER_LOST = events.Failed(code="worker_lost", message=WORKER_LOST_MESSAGE)
QUEUE_TIMEOUT = events.Failed(code="queue_timeout", message=QUEUE_TIMEOUT_MESSAGE)


def cancelled_event(prompt_tokens: int = 0, completion_tokens: int = 0) -> events.Finished:
    return events.Finished(
        finish_reason="cancelled", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
    )


def _job_keys(job_id: str) -> list[str]:
    """KEYS for the per-job scripts, in the order _JOB_KEYS unpacks them."""
    return [
        keys.job(job_id),
        keys.job_log(job_id),
        keys.job_channel(job_id),
        keys.job_cancel(job_id),
        keys.job_lease(job_id),
        keys.RUNNING,
        keys.QUEUED,
    ]


# --- Typed calls: one function per script, so no caller builds KEYS or ARGV by hand -----------


@dataclass(frozen=True)
class ScriptCall:
    """One script with its keys and arguments, for a client to run (tasks/scripts.py)."""

    script: str
    keys: list[str]
    args: list[str | int | float]


def _admit_args(job: NewJob, ttl: int) -> list[str | int | float]:
    spec = job.spec
    return [spec.id, ttl, spec.model_dump_json(), job.meta.model_dump_json(), spec.kind, spec.model]


def owner_of(job: NewJob) -> str:
    """The owner the fair index files the job under: its key's owner tag, or keys.NO_OWNER."""
    return job.meta.owner or keys.NO_OWNER


def _share_args(job: NewJob, weight: float) -> list[str | int | float]:
    return [owner_of(job), estimated_prompt_tokens(job.spec), weight]


def admit(
    job: NewJob,
    *,
    ttl: int,
    max_queued: int,
    queue_timeout: float,
    weight: float = 1.0,
    max_queued_per_key: int = 0,
    max_running_per_key: int = 0,
) -> ScriptCall:
    """Record a queued job; its reply, read by admitted(), is when it was created (Redis's
    clock), or nothing if MAX_QUEUED jobs of its model already wait, or the share its key is
    over. `weight` is its key's share relative to others' (API_KEY_WEIGHTS)."""
    spec = job.spec
    owner = owner_of(job)
    job_keys = [
        keys.job(spec.id),
        keys.QUEUED,
        keys.queued_of(spec.model),
        keys.owner_queued(owner),
        keys.owner_running(owner),
    ]
    args = [
        *_admit_args(job, ttl),
        max_queued,
        queue_timeout,
        *_share_args(job, weight),
        max_queued_per_key,
        max_running_per_key,
    ]
    return ScriptCall(ADMIT, job_keys, args)


ShareLimit = Literal["queued", "running"]


@dataclass(frozen=True)
class OverShare:
    """ADMIT's refusal of a key that already has MAX_QUEUED_PER_KEY jobs waiting ("queued") or
    MAX_RUNNING_PER_KEY running ("running")."""

    limit: ShareLimit


def admitted(reply: str | None) -> float | OverShare | None:
    """What an admit() call answered: the job's created_at, None if the model's queue was full,
    or the key's share that was full."""
    if reply is None:
        return None
    if reply.startswith("over:"):
        return OverShare(reply.removeprefix("over:"))  # type: ignore[arg-type]
    return float(reply)


def admit_batch_line(job: NewJob, *, ttl: int, weight: float = 1.0) -> ScriptCall:
    """Record a queued line of batch `spec.batch`, unless its job exists; 1 if recorded."""
    assert job.spec.batch is not None
    args = [*_admit_args(job, ttl), job.spec.batch, *_share_args(job, weight)]
    return ScriptCall(ADMIT_BATCH_LINE, [keys.job(job.spec.id)], args)


def withdraw(job_id: str) -> ScriptCall:
    """Delete a job the queue refused to carry, unless a worker has already claimed it (any
    worker's wake-up may take any waiting job); 1 if deleted."""
    return ScriptCall(WITHDRAW, _job_keys(job_id), [job_id])


@dataclass(frozen=True)
class Claimed:
    """A job this worker got: its spec, how long it waited for a worker (Redis's clock), and
    its owner in the fair index."""

    spec: JobSpec
    waited_seconds: float
    owner: str = keys.NO_OWNER


def claimed(reply: list[str] | int | None) -> Claimed | None:
    """What a claim() or claim_next() call answered: the job if this caller got it."""
    if not isinstance(reply, list):
        return None
    spec, waited, owner = reply
    return Claimed(JobSpec.model_validate_json(spec), float(waited), owner or keys.NO_OWNER)


def claim_again(reply: list[str] | int | None) -> bool:
    """Whether a claim_next() call that got nothing ended its quota of jobs (more may wait)."""
    return reply == 1


# How many jobs one CLAIM_NEXT may end (past their deadline, or of a batch winding down) before
# it returns; the worker then calls again. Bounds one script's run: Redis serves nothing else
# meanwhile.
CLAIM_NEXT_ENDINGS = 50


def claim_next(
    model: str, *, ttl: int, worker: str, lease_seconds: int, queue_timeout: float, max_running_per_key: int
) -> ScriptCall:
    """Claim `model`'s next job by the fair index (interactive first; then the backlogged owner
    with the smallest counter, its oldest job); read the reply with claimed() and claim_again()."""
    args: list[str | int | float] = [
        keys.job(""),
        ttl,
        worker,
        lease_seconds,
        events.encode(cancelled_event()),
        queue_timeout,
        events.encode(QUEUE_TIMEOUT),
        model,
        max_running_per_key,
        CLAIM_NEXT_ENDINGS,
    ]
    return ScriptCall(CLAIM_NEXT, [keys.RUNNING, keys.QUEUED], args)


def claim(job_id: str, *, ttl: int, worker: str, lease_seconds: int, queue_timeout: float) -> ScriptCall:
    """Move a queued job to in_progress under this worker's lease, unless it has ended, been
    taken, or waited past its deadline; read the reply with claimed()."""
    args: list[str | int | float] = [
        job_id,
        ttl,
        worker,
        lease_seconds,
        events.encode(cancelled_event()),
        queue_timeout,
        events.encode(QUEUE_TIMEOUT),
    ]
    return ScriptCall(CLAIM, _job_keys(job_id), args)


# Numbers of this process's event writes (APPEND_EVENT's guard against appending one twice). Only
# a job's claimer writes its events, and numbers from microseconds since the epoch rise across a
# worker's restarts too; they stay below 2**53, exact in Lua's numbers.
_writes = itertools.count(time.time_ns() // 1000)


def append(job_id: str, event: events.AnyEvent, *, ttl: int) -> ScriptCall:
    """Append an event (and end the job, if terminal) unless it has ended; its seq, or -1.
    Safe to run again (a retry after a lost reply): the event is appended once."""
    if not events.is_terminal(event):
        args: list[str | int | float] = [job_id, ttl, events.encode(event), "0", next(_writes)]
        return ScriptCall(APPEND_EVENT, _job_keys(job_id), args)
    fields = terminal_fields(event)  # type: ignore[arg-type]
    pairs = [x for kv in fields.items() for x in kv]
    return ScriptCall(APPEND_EVENT, _job_keys(job_id), [job_id, ttl, events.encode(event), "1", *pairs])


def cancel(job_id: str, *, ttl: int) -> ScriptCall:
    """End a queued job now, or flag a running one for its worker; returns the status it had."""
    return ScriptCall(CANCEL, _job_keys(job_id), [job_id, ttl, events.encode(cancelled_event())])


def delete_ended(job_id: str) -> ScriptCall:
    """Delete an ended job's record and log; 'deleted', an open job's status, or None if none."""
    return ScriptCall(DELETE_ENDED, [keys.job(job_id), keys.job_log(job_id), keys.job_cancel(job_id)], [])


def reap(*, ttl: int, queue_timeout: float) -> ScriptCall:
    """End jobs whose worker died or whose queue deadline passed; returns how many."""
    args: list[str | int | float] = [
        keys.job(""),
        ttl,
        queue_timeout,
        events.encode(WORKER_LOST),
        events.encode(QUEUE_TIMEOUT),
    ]
    return ScriptCall(REAP, [keys.RUNNING, keys.QUEUED], args)


def wake_deficit(model: str, *, max_running_per_key: int) -> ScriptCall:
    """How many of `model`'s jobs a wake-up could claim now, and how many messages wait in its
    Celery lists: [waiting, messages]."""
    return ScriptCall(WAKE_DEFICIT, keys.generate_lists(model), [model, max_running_per_key])
