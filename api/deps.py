"""Dependencies the routes receive: settings, the job client and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.edge.auth import caller
from api.edge.rate_limits import RateLimiter
from tasks.batches import BatchStore
from tasks.client import JobClient
from tasks.files import FileStore
from tasks.registry import ModelRegistry
from tasks.settings import Settings, get_settings
from tasks.webhooks import WebhookStore


def job_client(request: Request) -> JobClient:
    client: JobClient = request.app.state.jobs
    return client


def model_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.models
    return registry


def file_store(request: Request) -> FileStore:
    store: FileStore = request.app.state.files
    return store


def batch_store(request: Request) -> BatchStore:
    store: BatchStore = request.app.state.batches
    return store


def webhook_store(request: Request) -> WebhookStore:
    store: WebhookStore = request.app.state.webhooks
    return store


def rate_limiter(request: Request) -> RateLimiter:
    return RateLimiter(request, request.app.state.quotas)


SettingsDep = Annotated[Settings, Depends(get_settings)]
JobsDep = Annotated[JobClient, Depends(job_client)]
ModelsDep = Annotated[ModelRegistry, Depends(model_registry)]
FilesDep = Annotated[FileStore, Depends(file_store)]
BatchesDep = Annotated[BatchStore, Depends(batch_store)]
LimitsDep = Annotated[RateLimiter, Depends(rate_limiter)]
WebhooksDep = Annotated[WebhookStore, Depends(webhook_store)]
# The caller's owner tag (api.auth); None when API_KEYS is empty.
CallerDep = Annotated[str | None, Depends(caller)]
