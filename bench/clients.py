"""Concurrent streaming clients: OpenAI chat-completion SSE over HTTP, timed per request."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import httpx

from bench.metrics import RequestSample

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 300.0  # one 128-token generation, queued behind at most 7 others


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestSample:
    """Send one streamed chat completion; time its first content token and its end."""
    started = time.perf_counter()
    first: float | None = None
    job_id: str | None = None
    tokens = 0
    deltas = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                return RequestSample(
                    0.0, time.perf_counter() - started, 0, error=f"{response.status_code} {text}"
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestSample(0.0, time.perf_counter() - started, 0, error=str(chunk["error"]))
                job_id = job_id or chunk.get("id")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        deltas += 1
                        if first is None:
                            first = time.perf_counter() - started
                if usage := chunk.get("usage"):
                    tokens = int(usage["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestSample(0.0, time.perf_counter() - started, 0, error=repr(exc))
    total = time.perf_counter() - started
    if first is None:
        return RequestSample(0.0, total, 0, job_id=job_id, error="no content")
    # A server that sends no usage: count content chunks (a lower bound on tokens).
    return RequestSample(first, total, tokens or deltas, job_id=job_id)


async def _run(
    url: str, body: dict[str, Any], concurrency: int, requests: int
) -> tuple[float, list[RequestSample]]:
    """`concurrency` clients take `requests` requests from a shared counter, back to back."""
    remaining = requests
    samples: list[RequestSample] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                sample = await asyncio.wait_for(stream_one(client, url, body), REQUEST_TIMEOUT_S + 10)
                samples.append(sample)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    for s in samples:
        if s.error:
            log.warning("request to %s failed: %s", url, s.error)
    return wall, samples


def run_clients(
    url: str, body: dict[str, Any], concurrency: int, requests: int
) -> tuple[float, list[RequestSample]]:
    """Blocking entry point: wall seconds for the whole batch and one sample per request."""
    return asyncio.run(_run(url, body, concurrency, requests))
