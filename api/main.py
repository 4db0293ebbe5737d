"""The FastAPI application: `uvicorn api.main:app`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.exceptions
from fastapi import Depends, FastAPI

from api import errors
from api.batches import router as batches_routes
from api.batches.runner import BatchRunner
from api.chat_completion import router as chat_routes
from api.edge.auth import caller, owner_tag
from api.edge.rate_limits import RateLimitHeaders, note_caller
from api.edge.request_ids import RequestId
from api.edge.size_limit import MULTIPART_OVERHEAD_BYTES, BodySizeLimit
from api.files import router as files_routes
from api.models import router as models_routes
from api.ops import health as health_routes
from api.ops import metrics as metrics_routes
from api.ops import page as page_routes
from api.responses import router as responses_routes
from api.webhooks import endpoints as webhook_endpoints
from api.webhooks import router as webhooks_routes
from api.webhooks.runner import WebhookRunner
from tasks import logs
from tasks.batches import BatchStore
from tasks.client import JobClient
from tasks.files import FileStore
from tasks.quotas import Quotas
from tasks.redis import async_client
from tasks.registry import ModelRegistry
from tasks.settings import get_settings
from tasks.webhooks import WebhookStore

log = logging.getLogger(__name__)
REAP_INTERVAL_SECONDS = 5.0
# Bounds the main client's pool: each streaming or waiting request holds one pub/sub connection.
MAX_CONNECTIONS = 1000


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    logs.configure(
        settings.log_level, settings.log_format, loggers=("uvicorn", "uvicorn.error", "uvicorn.access")
    )
    client = async_client(settings, name="llmq-api", max_connections=MAX_CONNECTIONS)
    # File contents are bytes, whatever was uploaded: they get a client that does not decode.
    file_client = async_client(settings, name="llmq-api-files", decode_responses=False, large_values=True)
    weights = {owner_tag(key): weight for key, weight in settings.api_key_weight_map.items()}
    app.state.jobs = JobClient(client, settings, weights)
    app.state.models = ModelRegistry(client, settings.model_forget_seconds)
    app.state.quotas = Quotas(client, settings)
    app.state.files = FileStore(file_client, settings.file_ttl_seconds)
    app.state.batches = BatchStore(client, settings.file_ttl_seconds)
    runner = BatchRunner(app.state.batches, app.state.files, app.state.jobs, app.state.models, settings)
    background = [
        asyncio.create_task(_reap_forever(app.state.jobs)),
        asyncio.create_task(runner.run_forever()),
    ]
    app.state.webhooks = WebhookStore(client, record_ttl_seconds=settings.job_ttl_seconds)
    if endpoints := webhook_endpoints.endpoints(settings):  # api/webhooks/runner.py says why here
        webhooks = WebhookRunner(app.state.webhooks, endpoints, settings)
        background.append(asyncio.create_task(webhooks.run_forever()))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        await client.aclose()
        await file_client.aclose()


async def _reap_forever(jobs: JobClient) -> None:
    """The one periodic reaper: it ends jobs whose worker died (lapsed lease) and jobs past their
    queue deadline.

    It runs here, in every API instance, and nowhere else. Both endings must happen when no
    worker is alive (the last worker died holding jobs; nothing is consuming the queue), so a
    reaper in the workers could not be the only one, and the API is where jobs are created and
    followed: a job's follower is answered only if some API runs. Several instances reaping is
    safe: the script is atomic and ends a job only while it is open. A message that reaches a
    worker after its job's deadline is refused, and the job failed, by the claim itself.
    The same pass resends wake-ups that went missing (JobClient.rewake).
    """
    while True:
        await asyncio.sleep(REAP_INTERVAL_SECONDS)
        try:
            if ended := await jobs.reap():
                log.warning("reaper ended %s job(s) of dead workers or past their queue deadline", ended)
            if sent := await jobs.rewake():
                log.info("sent %s wake-up(s) for jobs whose message was missing", sent)
        except (redis.exceptions.RedisError, OSError) as exc:
            log.warning("reaper could not reach Redis: %s", exc)


def create_app() -> FastAPI:
    # No redirect for a trailing slash: every answer is a 2xx or an error in OpenAI's shape.
    app = FastAPI(
        title="llmq: queue-backed chat for Llama-3 models", lifespan=lifespan, redirect_slashes=False
    )
    errors.install(app)
    settings = get_settings()
    uploads = {"/v1/files": settings.max_file_bytes + MULTIPART_OVERHEAD_BYTES}
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, uploads=uploads)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(RequestId)  # added last, so it is outermost: even a 413 carries the id
    # Every /v1 route needs an API key when API_KEYS is set; /health (and /docs) stay open. The
    # caller is noted for the rate-limit headers (api/edge/rate_limits.py).
    v1 = [Depends(caller), Depends(note_caller)]
    app.include_router(chat_routes.router, dependencies=v1)
    app.include_router(responses_routes.router, dependencies=v1)
    app.include_router(models_routes.router, dependencies=v1)
    app.include_router(files_routes.router, dependencies=v1)
    app.include_router(batches_routes.router, dependencies=v1)
    app.include_router(webhooks_routes.router)  # its own guard: the admin key (api/webhooks/router.py)
    app.include_router(health_routes.router)
    app.include_router(metrics_routes.router)
    app.include_router(page_routes.router)
    return app


app = create_app()
