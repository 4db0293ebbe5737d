"""What the integration tests share: clients of a stack (the SDK, Redis), bounded waits, the
terminal statuses and the long generation that keeps a worker busy."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import openai
import redis

from tasks import events, keys
from tests.integration.conftest import Stack
from tests.processes import admin_url, redis_client

T = TypeVar("T")

TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
# Far longer than any test waits for: with ignore_eos a job on it runs until stopped.
LONG_PROMPT = "Count from 1 to 1000, writing every number in words, one per line."


def sdk(stack: Stack, key: str = "not-needed", timeout: float = 120) -> openai.OpenAI:
    """The official client on the stack's API (`key` only matters where API_KEYS is set)."""
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key=key, max_retries=0, timeout=timeout)


def rdb(stack: Stack) -> redis.Redis:
    """The test's own client of the stack's Redis: its admin user (the service's is confined to
    the README's ACL)."""
    return redis_client(admin_url(stack.redis_url), stack.tls, decode_responses=True)


def wait_for(check: Callable[[], T], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll `check` until it returns something true, and return that; fail saying `what` was
    awaited (and the last thing seen) once `timeout` seconds pass. A hang detector, not a timing."""
    deadline = time.monotonic() + timeout
    while True:
        seen = check()
        if seen:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}; last seen: {seen!r}")
        time.sleep(every)


def record(stack: Stack, job_id: str) -> dict[str, str]:
    """The job's record in Redis."""
    return rdb(stack).hgetall(keys.job(job_id))


def job_events(stack: Stack, job_id: str) -> list[events.AnyEvent]:
    return [events.decode(i, p) for i, p in enumerate(rdb(stack).lrange(keys.job_log(job_id), 0, -1))]


def wait_records(
    stack: Stack, job_ids: list[str], statuses: frozenset[str] | set[str] = TERMINAL, timeout: float = 30
) -> list[dict[str, str]]:
    """The jobs' records once every one has one of `statuses`."""

    def reached() -> list[dict[str, str]] | None:
        records = [record(stack, j) for j in job_ids]
        return records if all(r.get("status") in statuses for r in records) else None

    return wait_for(reached, timeout, f"jobs {job_ids} to reach {sorted(statuses)}")


def wait_response(
    client: openai.OpenAI,
    response_id: str,
    statuses: frozenset[str] | set[str] = TERMINAL,
    timeout: float = 60,
) -> Any:
    """The background response once its status is one of `statuses`."""

    def reached() -> Any:
        response = client.responses.retrieve(response_id)
        return response if response.status in statuses else None

    return wait_for(reached, timeout, f"{response_id} to reach {sorted(statuses)}")


def wait_batch(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 120) -> Any:
    """The batch once its status is one of `statuses`."""

    def reached() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in statuses else None

    return wait_for(reached, timeout, f"batch {batch_id} to reach {sorted(statuses)}", every=0.2)


def start_long_response(
    client: openai.OpenAI, max_output_tokens: int = 3000, input: str = LONG_PROMPT, **body: Any
) -> str:
    """A greedy background response that generates until `max_output_tokens` (ignore_eos); its id."""
    extra = {"ignore_eos": True, **body.pop("extra_body", {})}
    return client.responses.create(
        input=input,
        temperature=0,
        max_output_tokens=max_output_tokens,
        background=True,
        extra_body=extra,
        **body,
    ).id


def long_chat(max_tokens: int = 3000, stream: bool = True, **body: Any) -> dict[str, Any]:
    """A greedy chat completion body that generates until `max_tokens` (ignore_eos)."""
    return {
        "messages": [{"role": "user", "content": LONG_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
        **body,
    }
