"""GET /health: ready only when Redis answers and a worker has its model loaded."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from fastapi import APIRouter

from api import errors
from api.deps import JobsDep, SettingsDep

router = APIRouter()


@router.get("/health")
async def health(jobs: JobsDep, settings: SettingsDep) -> dict[str, Any]:
    try:
        workers = await jobs.workers()
    except (redis.exceptions.RedisError, OSError) as exc:
        raise errors.ServiceUnavailable("Redis is not answering.", code="redis_unavailable") from exc
    serving = [w for w in workers if w.get("model") == settings.model_name]
    if not serving:
        raise errors.ServiceUnavailable(
            f"No worker has '{settings.model_name}' loaded yet.", code="no_ready_worker"
        )
    return {"status": "ok", "model": settings.model_name, "workers": serving}
