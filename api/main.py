"""The FastAPI application: `uvicorn api.main:app`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import redis.exceptions
from fastapi import Depends, FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from api import errors
from api.auth import caller
from api.limits import BodySizeLimit
from api.request_ids import RequestId
from api.routes import chat, health, metrics, models, page, responses
from tasks import logs
from tasks.client import JobClient
from tasks.settings import get_settings

log = logging.getLogger(__name__)
REAP_INTERVAL_SECONDS = 5.0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logs.configure(
        settings.log_level, settings.log_format, loggers=("uvicorn", "uvicorn.error", "uvicorn.access")
    )
    client = aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        # Redis down must turn into a 503 within 2 s: connect fast, retry once without backoff.
        socket_connect_timeout=1,
        socket_timeout=10,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        client_name="llmq-api",
        max_connections=1000,
    )
    app.state.jobs = JobClient(client, settings)
    reaper = asyncio.create_task(_reap_forever(app.state.jobs))
    try:
        yield
    finally:
        reaper.cancel()
        await client.aclose()


async def _reap_forever(jobs: JobClient) -> None:
    """Every API instance also reaps (the script is atomic), so jobs of dead workers end even
    when no worker is alive to do it."""
    while True:
        await asyncio.sleep(REAP_INTERVAL_SECONDS)
        try:
            if ended := await jobs.reap():
                log.warning("reaper ended %s job(s) of dead workers or past their queue deadline", ended)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("reaper could not reach Redis: %s", exc)


def create_app() -> FastAPI:
    # No redirect for a trailing slash: every answer is a 2xx or an error in OpenAI's shape.
    app = FastAPI(
        title="llmq: queue-backed chat for Llama-3 models", lifespan=lifespan, redirect_slashes=False
    )
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=get_settings().max_request_bytes)
    app.add_middleware(RequestId)  # added last, so it is outermost: even a 413 carries the id
    # Every /v1 route needs an API key when API_KEYS is set; /health (and /docs) stay open.
    v1 = [Depends(caller)]
    app.include_router(chat.router, dependencies=v1)
    app.include_router(responses.router, dependencies=v1)
    app.include_router(models.router, dependencies=v1)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(page.router)
    return app


app = create_app()
