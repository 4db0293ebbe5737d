"""GET /health: ready while Redis answers and at least one model has a ready worker."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from fastapi import APIRouter

from api import errors
from api.deps import ModelsDep

router = APIRouter()


@router.get("/health")
async def health(models: ModelsDep) -> dict[str, Any]:
    """Each known model with its ready workers; `workers` lists every ready worker."""
    try:
        current = await models.models(fresh=True)
    except (redis.exceptions.RedisError, OSError) as exc:
        raise errors.ServiceUnavailable("Redis is not answering.", code="redis_unavailable") from exc
    if not current.ready:
        raise errors.ServiceUnavailable("No worker has a model loaded yet.", code="no_ready_worker")
    return {
        "status": "ok",
        "models": {
            m.id: {**m.describe(), "workers": [w["name"] for w in m.workers]}
            for m in sorted(current.known.values(), key=lambda m: m.id)
        },
        "workers": list(current.workers),
    }
