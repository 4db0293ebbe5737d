"""The real stack for integration tests: redis-server, one Celery worker with the embedded
SmolLM2, and the API, each a separate process, started once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.processes import Service, start_api, start_redis, start_worker, wait_healthy


@dataclass
class Stack:
    redis_url: str
    api_url: str
    env: dict[str, str]
    log_dir: Path
    worker: Service
    api: Service
    redis: Service


@contextmanager
def running_stack(log_dir: Path, redis_conf: Path | None = None, **overrides: str) -> Iterator[Stack]:
    """Its own redis-server (persisting as `redis_conf` says, if given), one worker and one API;
    settings overridden by keyword (env names)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    redis_svc, redis_url = start_redis(log_dir, conf=redis_conf)
    # The default model cache (~/.cache) is kept between runs, as it is between worker restarts.
    env = {
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "INFO",
        "REQUEST_TIMEOUT_SECONDS": "600",
        "STREAM_PING_SECONDS": "1",
        **overrides,
    }
    services = [redis_svc]
    stack: Stack | None = None
    try:
        worker = start_worker(env, log_dir)
        services.append(worker)
        api, api_url = start_api(env, log_dir)
        wait_healthy(worker, api_url, timeout=300)
        stack = Stack(redis_url, api_url, env, log_dir, worker, api, redis_svc)
        yield stack
    finally:
        # Tests may replace any process (restarts), so stop whichever ones the stack holds.
        if stack is not None:
            services += [stack.redis, stack.worker, stack.api]
        for svc in reversed(services):
            svc.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("logs")) as s:
        yield s


@pytest.fixture(scope="session")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def ready_workers(stack: Stack) -> set[str]:
    r = httpx.get(f"{stack.api_url}/health", timeout=5)
    return {w["name"] for w in r.json().get("workers", [])} if r.status_code == 200 else set()


def restart_worker(stack: Stack, name: str = "worker-restarted") -> None:
    """Start a fresh worker (the old one must be stopped) and wait until it announces itself."""
    before = ready_workers(stack)  # a killed worker's heartbeat lingers until its TTL runs out
    stack.worker = start_worker(stack.env, stack.log_dir, name=name)
    stack.worker.wait_until(lambda: bool(ready_workers(stack) - before), timeout=300)
