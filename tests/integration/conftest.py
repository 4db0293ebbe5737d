"""The real stack for integration tests: redis-server, one Celery worker with the embedded
SmolLM2, and the API, each a separate process, started once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.processes import Service, start_api, start_redis, start_worker, wait_healthy

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    redis_url: str
    api_url: str
    env: dict[str, str]
    log_dir: Path
    worker: Service
    api: Service


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    log_dir = tmp_path_factory.mktemp("logs")
    redis_svc, redis_url = start_redis(log_dir)
    # The default model cache (~/.cache) is kept between runs, as it is between worker restarts.
    env = {
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "INFO",
        "REQUEST_TIMEOUT_SECONDS": "120",
        "STREAM_PING_SECONDS": "1",
    }
    services = [redis_svc]
    stack: Stack | None = None
    try:
        worker = start_worker(env, log_dir)
        services.append(worker)
        api, api_url = start_api(env, log_dir)
        wait_healthy(worker, api_url, timeout=300)
        stack = Stack(redis_url, api_url, env, log_dir, worker, api)
        yield stack
    finally:
        # Tests may replace the API (the restart test), so stop whichever one the stack holds.
        if stack is not None:
            stack.api.stop()
        for svc in reversed(services):
            svc.stop()


@pytest.fixture(scope="session")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
