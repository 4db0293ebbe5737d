"""Per-key rate limits (REQUESTS_PER_MINUTE_PER_KEY, TOKENS_PER_MINUTE_PER_KEY): each key's two
token buckets in Redis, the script that takes from them before a generation is queued, and the
Lua function the end-of-job script (tasks/jobs.py end_job) charges a job's real usage with.

A bucket holds up to its limit and refills continuously, limit/60 per second, so a key may
burst its whole minute at once and then goes at the limit's pace, as OpenAI's limits behave.
Admission takes one request and the prompt's estimate (tasks.jobs.estimated_prompt_tokens); the job's end
charges the rest, (prompt_tokens - estimate) + completion_tokens, so over time a key is charged
exactly what it used. A request is refused while the request bucket holds less than one, or
while the token bucket is not positive: a charge may leave it below zero (the estimate cannot
know how long the answer will be), and the key then waits until the debt has refilled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from tasks import keys
from tasks.settings import Settings

LimitKind = Literal["requests", "tokens"]


# --- Lua ----------------------------------------------------------------------------------------
#
# One hash per owner (keys.quota): `req` and `tok`, the levels of its request and token buckets
# at Redis time `at`, and `rpm`, `tpm`, the limits they were kept under (the end charge, in the
# worker, has no settings and reads the limit here). A missing hash, or a limit that was off
# when the hash was written, is a full bucket. Levels are refilled lazily, whenever the hash is
# read for a take or a charge. The hash expires once both buckets are full again (it is then
# the same as no hash), but never before `hold` seconds: the end charge of a job taken now must
# still find it (a job ends within its queue timeout plus its generation limit).

_BUCKETS = (
    f"local QUOTA_PREFIX = '{keys.QUOTA_PREFIX}'\n"
    + """
-- A bucket's level now: its stored level plus what refilled since `at`, at most its limit.
local function quota_level(level, limit_then, at, limit, now)
  if limit <= 0 then return 0 end
  if not level or tonumber(limit_then or '0') <= 0 then return limit end
  return math.min(limit, tonumber(level) + (now - tonumber(at)) * limit / 60)
end
local function quota_full_in(level, limit)
  if limit <= 0 then return 0 end
  return math.max(0, (limit - level) * 60 / limit)
end
local function quota_save(bucket, now, req, rpm, tok, tpm, hold)
  redis.call('HSET', bucket, 'at', string.format('%.6f', now), 'req', string.format('%.6f', req),
             'rpm', rpm, 'tok', string.format('%.6f', tok), 'tpm', tpm)
  local ttl = math.max(quota_full_in(req, rpm), quota_full_in(tok, tpm), hold, redis.call('TTL', bucket))
  redis.call('EXPIRE', bucket, math.ceil(ttl) + 1)
end
"""
)

# Concatenated into tasks/jobs.py _PRELUDE (after its clock()) and called once by end_job with
# the job's terminal fields. A failed job has no usage: what its admission took stays taken.
# Batch lines were never taken (their batch has its own share), so they are not charged.
CHARGE_TOKENS = (
    _BUCKETS
    + """
local function charge_tokens(job, fields)
  local prompt, completion
  for i = 1, #fields, 2 do
    if fields[i] == 'prompt_tokens' then prompt = tonumber(fields[i + 1]) end
    if fields[i] == 'completion_tokens' then completion = tonumber(fields[i + 1]) end
  end
  if not prompt then return end
  local owner, estimate, batch = unpack(redis.call('HMGET', job, 'owner', 'estimate', 'batch'))
  if batch then return end
  local bucket = QUOTA_PREFIX .. (owner or '-')
  local at, req, rpm, tok, tpm = unpack(redis.call('HMGET', bucket, 'at', 'req', 'rpm', 'tok', 'tpm'))
  rpm, tpm = tonumber(rpm or '0'), tonumber(tpm or '0')
  if tpm <= 0 then return end
  local now = clock()
  local used = prompt - tonumber(estimate or '0') + (completion or 0)
  quota_save(bucket, now, quota_level(req, rpm, at, rpm, now), rpm,
             quota_level(tok, tpm, at, tpm, now) - used, tpm, 0)
end
"""
)

# KEYS: the owner's bucket. ARGV: rpm, tpm (0 = off), 'take' or 'peek', tokens to take, hold
# seconds. A take of one request and the tokens, unless refused; a peek reads and writes
# nothing. Returns {verdict, requests level, tokens level}: 'ok', or the limit that refused.
TAKE = (
    _BUCKETS
    + """
local bucket = KEYS[1]
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local at, req, old_rpm, tok, old_tpm = unpack(redis.call('HMGET', bucket, 'at', 'req', 'rpm', 'tok', 'tpm'))
req = quota_level(req, old_rpm, at, rpm, now)
tok = quota_level(tok, old_tpm, at, tpm, now)
local verdict = 'ok'
if ARGV[3] == 'take' then
  if rpm > 0 and req < 1 then
    verdict = 'requests'
  elseif tpm > 0 and tok <= 0 then
    verdict = 'tokens'
  else
    if rpm > 0 then req = req - 1 end
    if tpm > 0 then tok = tok - tonumber(ARGV[4]) end
    quota_save(bucket, now, req, rpm, tok, tpm, tonumber(ARGV[5]))
  end
end
return {verdict, string.format('%.6f', req), string.format('%.6f', tok)}
"""
)


# --- The buckets' maths, as the API reports them --------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """One bucket as a take or a peek left it."""

    limit: int  # per minute; it holds at most this many
    level: float  # what it holds now; below zero after a charge beyond it

    @property
    def remaining(self) -> int:
        return max(0, min(self.limit, math.floor(self.level)))

    def seconds_until(self, level: float) -> float:
        """How long until it holds `level` (0 if it does)."""
        return max(0.0, (level - self.level) * 60 / self.limit)

    @property
    def full_in(self) -> float:
        """Seconds until it is full again: OpenAI's x-ratelimit-reset-*."""
        return self.seconds_until(self.limit)


# A refused tokens take waits until the bucket is positive; the clock's last step, so that the
# retry finds it above zero rather than at it.
_POSITIVE = 0.001


@dataclass(frozen=True)
class Standing:
    """A key's buckets after a take or a peek; a bucket whose limit is off is None."""

    requests: Bucket | None
    tokens: Bucket | None
    refused: LimitKind | None = None

    @property
    def retry_after(self) -> float:
        """Seconds until the refused take could pass (0 if it was not refused)."""
        if self.refused == "requests" and self.requests is not None:
            return self.requests.seconds_until(1)
        if self.refused == "tokens" and self.tokens is not None:
            return self.tokens.seconds_until(0) + _POSITIVE
        return 0.0


def standing(reply: list[str], rpm: int, tpm: int) -> Standing:
    """What a TAKE call answered, under the limits it was called with."""
    verdict, requests, tokens = reply
    return Standing(
        requests=Bucket(rpm, float(requests)) if rpm > 0 else None,
        tokens=Bucket(tpm, float(tokens)) if tpm > 0 else None,
        refused=None if verdict == "ok" else verdict,  # type: ignore[arg-type]
    )


class Quotas:
    """The API's side: take from a key's buckets before its job is queued, peek at them for the
    headers of any other call. One script call each; nothing at all while both limits are off."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._take = client.register_script(TAKE)
        self.rpm = settings.requests_per_minute_per_key
        self.tpm = settings.tokens_per_minute_per_key
        # The longest a job taken now can take to end (and be charged): its queue deadline, its
        # generation limit, and a dead worker's lease before the reaper ends it.
        self._hold = math.ceil(
            settings.queue_timeout_seconds + settings.max_generation_seconds + settings.job_lease_seconds
        )

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    async def take(self, owner: str | None, tokens: int) -> Standing:
        """Take one request and `tokens` from the owner's buckets, unless one refuses; the
        Standing says which did (nothing is taken then)."""
        return await self._run(owner, "take", tokens)

    async def peek(self, owner: str | None) -> Standing:
        return await self._run(owner, "peek", 0)

    async def _run(self, owner: str | None, mode: str, tokens: int) -> Standing:
        args: list[str | int] = [self.rpm, self.tpm, mode, tokens, self._hold]
        reply = await self._take(keys=[keys.quota(owner)], args=args)
        return standing(reply, self.rpm, self.tpm)
