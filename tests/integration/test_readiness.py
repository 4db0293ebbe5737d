"""/health tells the truth about Redis and workers."""

from __future__ import annotations

import httpx

from tests.integration.conftest import Stack
from tests.processes import start_api


def test_health_is_503_without_a_ready_worker(stack: Stack) -> None:
    # A second API on a Redis database no worker uses: Redis answers, no model is loaded.
    env = {**stack.env, "REDIS_URL": stack.redis_url.rsplit("/", 1)[0] + "/3"}
    api, url = start_api(env, stack.log_dir, name="api-no-workers")
    try:
        r = httpx.get(f"{url}/health", timeout=5)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_ready_worker"
        assert "Retry-After" in r.headers
    finally:
        api.stop()


def test_health_is_503_when_redis_is_unreachable(stack: Stack) -> None:
    env = {**stack.env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    api, url = start_api(env, stack.log_dir, name="api-no-redis")
    try:
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "redis_unavailable"
    finally:
        api.stop()
