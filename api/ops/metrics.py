"""GET /metrics: Prometheus text format for the whole deployment (open, like /health)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import BatchesDep, JobsDep, SettingsDep
from api.ops import prometheus as metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(jobs: JobsDep, batches: BatchesDep, settings: SettingsDep) -> Response:
    waiting, running, batch_waiting, batch_running = await jobs.depth()
    fields, workers = await jobs.metrics_fields(), await jobs.workers()
    snapshot = metrics.Snapshot(
        fields=fields,
        waiting=waiting,
        running=running,
        workers=workers,
        batch_waiting=batch_waiting,
        batch_running=batch_running,
        batches=await batches.active_statuses(),
    )
    return Response(metrics.render(snapshot, settings.model_name), media_type=CONTENT_TYPE_LATEST)
