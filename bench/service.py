"""The queued service under test: its own redis-server, N Celery workers and the API, over HTTP."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from pathlib import Path

import httpx
import redis

from bench import workload
from bench.clients import run_clients
from bench.memory import tree_rss_mib
from bench.metrics import BatchResult, RequestSample
from bench.report import service_name
from bench.servers import log_name
from tasks import keys
from tests.processes import Service, start_api, start_redis, start_worker

log = logging.getLogger(__name__)

WORKER_READY_TIMEOUT_S = 300.0


class ServiceStack:
    """redis-server + API + `workers` workers, started in that order; workers one at a time so
    each start-up is timed on an otherwise idle machine.

    `slots` sets WORKER_SLOTS (default 1; given, it names the system "... x N slots"); `engine`
    sets ENGINE; `env`
    overrides any other setting. `clients`: the client counts it is measured at (None: all).
    """

    def __init__(
        self,
        workers: int,
        log_dir: Path,
        env: dict[str, str] | None = None,
        *,
        slots: int | None = None,
        engine: str | None = None,
        clients: Collection[int] | None = None,
    ) -> None:
        self.name = service_name(workers, slots, engine)
        self.clients = clients
        self.log_dir = log_dir / log_name(self.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        self.workers: list[Service] = []
        self.startup_s: list[float] = []
        self.load_s: list[float] = []
        # Open, as before the tests locked theirs: the bench's own clients read INFO and MONITOR.
        redis_svc, self.redis_url = start_redis(self.log_dir, locked=False)
        self.services.append(redis_svc)
        try:
            self.env = {"REDIS_URL": self.redis_url, "STREAM_PING_SECONDS": "15"}
            if workers > 1:
                # Workers on one machine split its cores (README, COMPUTE_THREADS); more workers
                # than cores get one thread each and the OS shares the cores between them. One
                # worker keeps the default (COMPUTE_THREADS=0: chosen by measurement).
                self.env["COMPUTE_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
            self.env["WORKER_SLOTS"] = str(slots or 1)
            if engine is not None:
                self.env["ENGINE"] = engine
            self.env |= env or {}
            self.api, self.url = start_api(self.env, self.log_dir)
            self.services.append(self.api)
            for i in range(workers):
                self._start_worker(f"worker{i + 1}")
        except BaseException:
            self.stop()
            raise
        self._redis = redis.Redis.from_url(self.redis_url, decode_responses=True)

    def _ready_workers(self) -> dict[str, dict[str, object]]:
        r = httpx.get(f"{self.url}/health", timeout=2)
        return {w["name"]: w for w in r.json().get("workers", [])} if r.status_code == 200 else {}

    def _start_worker(self, name: str) -> None:
        """Start one worker and time it from process start until /health lists it."""
        before = set(self._ready_workers())
        started = time.monotonic()
        worker = start_worker(self.env, self.log_dir, name=name)
        self.services.append(worker)
        self.workers.append(worker)
        new: dict[str, object] = {}

        def ready() -> bool:
            nonlocal new
            new = {k: v for k, v in self._ready_workers().items() if k not in before}
            return bool(new)

        worker.wait_until(ready, timeout=WORKER_READY_TIMEOUT_S)
        self.startup_s.append(time.monotonic() - started)
        described = next(iter(new.values()))
        if isinstance(described, dict):
            self.load_s.append(float(described.get("load_seconds", 0.0)))
        log.info("%s %s ready in %.2fs", self.name, name, self.startup_s[-1])

    def run_batch(self, concurrency: int, requests: int, round_no: int) -> BatchResult:
        wall, samples = run_clients(
            f"{self.url}/v1/chat/completions", workload.request_body(), concurrency, requests
        )
        for sample in samples:
            sample.queue_wait_s = self._queue_wait(sample)
        return BatchResult(self.name, concurrency, round_no, wall, samples)

    def _queue_wait(self, sample: RequestSample) -> float | None:
        """From the job hash: its admission to the worker's claim, both by Redis's clock (the job id
        is the chunk id)."""
        if sample.job_id is None or sample.error:
            return None
        created, started = self._redis.hmget(keys.job(sample.job_id), ["created_at", "started_at"])
        if not created or not started:
            return None
        return float(started) - float(created)

    def rss_mib(self) -> dict[str, float]:
        rss = {"api": tree_rss_mib(self.api.proc.pid)}
        for i, worker in enumerate(self.workers, 1):
            rss[f"worker{i}"] = tree_rss_mib(worker.proc.pid)
        return rss

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()
