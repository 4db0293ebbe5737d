"""The real stack for integration tests: redis-server, one Celery worker with the embedded
SmolLM2, and the API, each a separate process, started once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests import needs
from tests.processes import Service, acl_denials, start_api, start_redis, start_worker, wait_healthy
from tests.tls import CertAuthority


@dataclass
class Stack:
    redis_url: str
    api_url: str
    env: dict[str, str]
    log_dir: Path
    worker: Service
    api: Service
    redis: Service
    tls: CertAuthority | None = None  # Redis on TLS only, with this test CA's certificates


def assert_no_denials(redis_url: str, tls: CertAuthority | None = None) -> None:
    """Every test Redis runs the service under the README's minimal ACL (tests/processes.py
    locked_args): anything it refused anyone is a command or key missing from the ACL, or a
    client outside its prefix, even where the refusal was only logged by a retrying process."""
    denials = acl_denials(redis_url, tls)
    assert denials == [], f"Redis's ACL refused: {denials}"


@contextmanager
def running_stack(
    log_dir: Path,
    redis_conf: Path | None = None,
    redis_args: Sequence[str] = (),
    tls: CertAuthority | None = None,
    **overrides: str,
) -> Iterator[Stack]:
    """Its own redis-server (persisting as `redis_conf` says, if given, configured further by
    `redis_args`, on TLS only with `tls`), one worker and one API; settings overridden by keyword
    (env names). At the end, Redis's ACL must have refused nothing (assert_no_denials)."""
    if shutil.which("redis-server") is None:
        needs.missing("redis-server", "apt-get install redis-server; .ci/run installs it")
    redis_svc, redis_url = start_redis(log_dir, conf=redis_conf, args=redis_args, tls=tls)
    # The default model cache (~/.cache) is kept between runs, as it is between worker restarts.
    env = {
        "REDIS_URL": redis_url,
        **(tls.env() if tls else {}),
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
        services.append(api)  # before the wait: a worker that never gets ready must not leak the API
        wait_healthy(worker, api_url, timeout=300)
        stack = Stack(redis_url, api_url, env, log_dir, worker, api, redis_svc, tls)
        yield stack
        # A test may have restarted Redis (this is what the new one logged), or left it stopped.
        if stack.redis.proc.poll() is None:
            assert_no_denials(stack.redis_url, tls)
    finally:
        # Tests may replace any process (restarts), so stop whichever ones the stack holds.
        if stack is not None:
            services += [stack.redis, stack.worker, stack.api]
        for svc in reversed(services):
            svc.stop()


@dataclass(frozen=True)
class Preset:
    """A stack's settings by name, as llama.cpp's ServerPreset: a module's fixture says which
    stack it needs (`Preset.slots(4).faults()`), not how to start one."""

    name: str
    env: tuple[tuple[str, str], ...] = ()
    redis_conf: Path | None = None

    @classmethod
    def default(cls) -> Preset:
        return cls("default")

    @classmethod
    def slots(cls, n: int) -> Preset:
        """A worker with `n` slots."""
        return cls(f"slots{n}").with_(WORKER_SLOTS=str(n))

    @classmethod
    def api_keys(cls, *api_keys: str) -> Preset:
        return cls("keys").with_(API_KEYS=",".join(api_keys))

    def faults(self) -> Preset:
        """Short broker visibility timeout (a killed worker's message comes back within a test)
        and shutdown grace (a stopped worker ends its jobs within one)."""
        return self.with_(BROKER_VISIBILITY_TIMEOUT_SECONDS="5", SHUTDOWN_GRACE_SECONDS="2")

    def with_(self, **settings: str) -> Preset:
        """More settings, by env name."""
        return Preset(self.name, (*self.env, *settings.items()), self.redis_conf)

    def named(self, name: str) -> Preset:
        return Preset(name, self.env, self.redis_conf)

    @contextmanager
    def running(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
        with running_stack(tmp_path_factory.mktemp(self.name), self.redis_conf, **dict(self.env)) as s:
            yield s


def stack_fixture(preset: Preset) -> Any:
    """A module-scoped fixture running `preset`'s stack: `name = stack_fixture(Preset...)`."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
        with preset.running(tmp_path_factory) as s:
            yield s

    return fixture


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared stack, Preset.default(): most modules' tests run on it."""
    with Preset.default().named("logs").running(tmp_path_factory) as s:
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
