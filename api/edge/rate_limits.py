"""Per-key rate limits at the edge: a generation's take before its job is queued (RateLimiter),
and OpenAI's x-ratelimit-* headers on every /v1 response while a limit is on (RateLimitHeaders).
The buckets themselves are tasks/quotas.py's."""

from __future__ import annotations

import logging
import math
from typing import Annotated

import redis.exceptions
from fastapi import Depends, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.edge.auth import caller
from tasks import jobs, quotas

log = logging.getLogger(__name__)

# Attributes of request.state, which Starlette keeps in scope["state"], where the middleware
# reads them: the standing a take left; or, for a call that took nothing, whose buckets to peek.
STANDING = "rate_limit_standing"
OWNER = "rate_limit_owner"

_NAMES: dict[quotas.LimitKind, str] = {
    "requests": "requests per minute (RPM)",
    "tokens": "tokens per minute (TPM)",
}


def go_duration(seconds: float) -> str:
    """A duration as Go's time.Duration prints it, as OpenAI's reset headers are: `0s`, `12ms`,
    `1.5s`, `6m0s`, `1h0m0s`. To the millisecond, rounded up, so a client that waits this long
    finds the bucket refilled."""
    ms = max(0, math.ceil(round(seconds * 1000, 6)))  # round first: 0.012 * 1000 is 12.000000000000002
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    whole, fraction = divmod(ms, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    return f"{minutes}m{text}s" if minutes else f"{text}s"


def headers(standing: quotas.Standing) -> dict[str, str]:
    """OpenAI's six headers, for the limits that are on."""
    out: dict[str, str] = {}
    buckets: list[tuple[quotas.LimitKind, quotas.Bucket | None]] = [
        ("requests", standing.requests),
        ("tokens", standing.tokens),
    ]
    for kind, bucket in buckets:
        if bucket is not None:
            out[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining)
            out[f"x-ratelimit-reset-{kind}"] = go_duration(bucket.full_in)
    return out


def refusal(standing: quotas.Standing) -> errors.RateLimited:
    assert standing.refused is not None
    kind = standing.refused
    bucket = standing.requests if kind == "requests" else standing.tokens
    limit = bucket.limit if bucket is not None else 0
    wait = standing.retry_after
    return errors.RateLimited(
        f"Rate limit reached for {_NAMES[kind]} on this API key: limit {limit}. "
        f"Please try again in {go_duration(wait)}.",
        limit=kind,
        retry_after=wait,
    )


class RateLimiter:
    """One request's side of the limits: a generation takes from its key's buckets before its
    job is queued, after everything else about it was checked (a 400 or 404 takes nothing)."""

    def __init__(self, request: Request, limits: quotas.Quotas) -> None:
        self._request = request
        self._limits = limits

    async def take(self, job: jobs.NewJob) -> None:
        """Take one request and the prompt's estimate from the job owner's buckets; raises
        RateLimited, having taken nothing, when one refuses."""
        if not self._limits.enabled:
            return
        standing = await self._limits.take(job.meta.owner, jobs.estimated_prompt_tokens(job.spec))
        setattr(self._request.state, STANDING, standing)
        if standing.refused is not None:
            raise refusal(standing)


def note_caller(request: Request, owner: Annotated[str | None, Depends(caller)]) -> None:
    """A dependency of every /v1 route: who calls, for the headers of a call that takes nothing."""
    setattr(request.state, OWNER, owner or "-")


class RateLimitHeaders:
    """Adds the caller's x-ratelimit-* headers to every response of a /v1 call while a limit is
    on, errors included: what the call's take left, else a peek (which writes nothing) as the
    response starts. A stream carries them on its head. A peek that fails (Redis away) leaves
    them out: the response itself says what went wrong, if anything did."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits: quotas.Quotas | None = getattr(scope["app"].state, "quotas", None)
        if scope["type"] != "http" or limits is None or not limits.enabled:
            await self.app(scope, receive, send)  # as if it were not there: no limit is on
            return

        # Made here if the server did not, so that the routes' request.state is this very dict.
        scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                standing = await _standing(scope, limits)
                if standing is not None:
                    extra = [(k.encode(), v.encode()) for k, v in headers(standing).items()]
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _standing(scope: Scope, limits: quotas.Quotas) -> quotas.Standing | None:
    state = scope["state"]
    if (taken := state.get(STANDING)) is not None:
        return taken  # type: ignore[no-any-return]
    if (owner := state.get(OWNER)) is None:
        return None  # not a /v1 call, or refused before the caller was known (401)
    try:
        return await limits.peek(owner)
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("could not read the rate limits: %s", exc)
        return None
