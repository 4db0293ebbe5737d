"""GET /metrics: Prometheus text format for the whole deployment (open, like /health)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import BatchesDep, JobsDep, ModelsDep, WebhooksDep
from api.ops import prometheus as metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(
    jobs: JobsDep, models: ModelsDep, batches: BatchesDep, webhooks: WebhooksDep
) -> Response:
    """One series per model the registry knows (tasks/registry.py), and the deployment's own."""
    current = await models.models()
    names = sorted(current.known)
    figures = await jobs.model_figures(names)
    batch_waiting, batch_running = await jobs.batch_depth()
    counts, pending, oldest = await webhooks.figures()
    snapshot = metrics.Snapshot(
        models={
            name: metrics.ModelFigures(
                fields=fields,
                waiting=waiting,
                running=current.known[name].running,
            )
            for name, (fields, waiting) in zip(names, figures, strict=True)
        },
        workers=list(current.workers),
        fields=await jobs.metrics_fields(),
        batch_waiting=batch_waiting,
        batch_running=batch_running,
        batches=await batches.active_statuses(),
        webhooks=metrics.WebhookFigures(counts, pending, oldest),
    )
    return Response(metrics.render(snapshot), media_type=CONTENT_TYPE_LATEST)
