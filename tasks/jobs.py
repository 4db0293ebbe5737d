"""The job record: what was asked, where it stands, how it ended; and the Redis scripts that
move it between states atomically.

States: queued -> in_progress -> completed | incomplete | failed | cancelled. A job reaches
exactly one terminal state: the scripts below refuse to append to, or end, a job that has
already ended, whoever (worker, API, a later reaper) tries.
"""

from __future__ import annotations

import secrets
import time
from typing import Literal

from pydantic import BaseModel, Field

from model.types import ChatMessage, SamplingParams
from tasks import events, keys

JobStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "incomplete", "failed", "cancelled"})


def new_job_id(prefix: str) -> str:
    """An unguessable id: 128 random bits."""
    return f"{prefix}{secrets.token_hex(16)}"


class Message(BaseModel):
    role: str
    content: str


class Sampling(BaseModel):
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.6, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)

    def to_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop),
        )


class ResponseOptions(BaseModel):
    """What a Responses API job echoes back on its Response object. Workers ignore it."""

    instructions: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False
    max_output_tokens: int | None = None


class JobSpec(BaseModel):
    """Everything a worker needs to run the job; written once when the job is created."""

    id: str
    model: str
    messages: list[Message]
    sampling: Sampling
    created_at: float = Field(default_factory=time.time)
    response: ResponseOptions | None = None  # set for jobs created through /v1/responses

    def to_messages(self) -> list[ChatMessage]:
        return [ChatMessage(m.role, m.content) for m in self.messages]


class JobRecord(BaseModel):
    """The job as stored in its Redis hash."""

    spec: JobSpec
    status: JobStatus
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
        data: dict[str, object] = {k: v for k, v in fields.items() if k != "spec" and v != ""}
        return cls(spec=JobSpec.model_validate_json(fields["spec"]), **data)  # type: ignore[arg-type]


def status_for(event: events.Finished | events.Failed) -> JobStatus:
    if isinstance(event, events.Failed):
        return "failed"
    return {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}[event.finish_reason]  # type: ignore[return-value]


def terminal_fields(event: events.Finished | events.Failed) -> dict[str, str]:
    fields = {"status": status_for(event), "finished_at": repr(time.time())}
    if isinstance(event, events.Failed):
        fields |= {"error_code": event.code, "error_message": event.message}
    else:
        fields |= {
            "finish_reason": event.finish_reason,
            "prompt_tokens": str(event.prompt_tokens),
            "completion_tokens": str(event.completion_tokens),
        }
    return fields


# KEYS: job hash, log list, channel. ARGV: event json, ttl seconds, then hash field/value pairs.
# Appends the event unless the job already ended; returns its sequence number, or -1.
APPEND_EVENT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == false or status == 'completed' or status == 'incomplete'
   or status == 'failed' or status == 'cancelled' then
  return -1
end
local seq = redis.call('RPUSH', KEYS[2], ARGV[1]) - 1
redis.call('EXPIRE', KEYS[2], ARGV[2])
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
redis.call('PUBLISH', KEYS[3], seq .. ' ' .. ARGV[1])
return seq
"""

# KEYS: job hash. ARGV: worker name, now. Moves a queued job to in_progress; 1 if this caller
# got it, 0 if it was already taken, ended or expired (a redelivered message, a cancelled job).
CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[1], 'started_at', ARGV[2])
return 1
"""

# KEYS: job hash, log list, channel, cancel flag. ARGV: ttl, cancelled-event json, now.
# Ends a queued job at once; flags a running one for its worker, which stops between tokens.
# Returns the status the job had.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
  local seq = redis.call('RPUSH', KEYS[2], ARGV[2]) - 1
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finish_reason', 'cancelled',
             'finished_at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
  redis.call('PUBLISH', KEYS[3], seq .. ' ' .. ARGV[2])
elseif status == 'in_progress' then
  redis.call('SET', KEYS[4], '1', 'EX', ARGV[1])
end
return status
"""


def cancelled_event(prompt_tokens: int = 0, completion_tokens: int = 0) -> events.Finished:
    return events.Finished(
        finish_reason="cancelled", prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
    )


def event_keys(job_id: str) -> list[str]:
    return [keys.job(job_id), keys.job_log(job_id), keys.job_channel(job_id)]
