"""A worker process's life: load the model before the first task, announce readiness, heartbeat.

Runs in the Celery pool child (worker_process_init), so each child owns exactly one model and
CUDA is initialised after the fork.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any

import redis
from celery import signals

from model.engine import Engine
from model.loading import load_model
from tasks import jobs, keys, logs
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
HEARTBEAT_TTL_SECONDS = 15


class Scripts:
    """The job scripts (tasks/jobs.py), registered once on this process's Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self.claim = client.register_script(jobs.CLAIM)
        self.append = client.register_script(jobs.APPEND_EVENT)
        self.reap = client.register_script(jobs.REAP)


@dataclass
class WorkerRuntime:
    name: str
    parent_name: str  # the Celery parent process, which asks us to drain on shutdown
    engine: Engine
    redis: redis.Redis
    scripts: Scripts
    settings: Settings
    current_job: str | None = None


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the model is not loaded in this process")
    return _runtime


def describe(rt: WorkerRuntime) -> dict[str, Any]:
    loaded = rt.engine.loaded
    return {
        "name": rt.name,
        "model": rt.settings.model_name,
        "engine": loaded.backend,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "threads": loaded.threads,
        "quantization": loaded.quantization,
        "context_length": loaded.context_length,
        "load_seconds": round(loaded.load_seconds, 2),
        "pid": os.getpid(),
        "job": rt.current_job,
    }


def _heartbeat(rt: WorkerRuntime, stop: threading.Event) -> None:
    """Keep this worker's readiness key and its job's lease alive, and reap dead workers' jobs.

    Both keys expire on their own if this process dies, which is how others notice. A thread,
    not the generation loop, renews them, so a long prefill does not look like a dead worker.
    """
    settings = rt.settings
    while not stop.is_set():
        try:
            pipe = rt.redis.pipeline()
            pipe.set(keys.worker(rt.name), json.dumps(describe(rt)), ex=HEARTBEAT_TTL_SECONDS)
            pipe.sadd(keys.WORKERS, rt.name)
            if (job := rt.current_job) is not None:
                pipe.set(keys.job_lease(job), rt.name, ex=settings.job_lease_seconds, xx=True)
            pipe.execute()
            args = jobs.reap_args(settings.job_ttl_seconds, settings.queue_timeout_seconds)
            if ended := rt.scripts.reap(keys=[keys.RUNNING, keys.QUEUED], args=args):
                log.warning("reaper ended %s job(s) of dead workers or past their queue deadline", ended)
        except redis.RedisError as exc:  # Redis away: keep trying; readers see us expire
            log.warning("heartbeat failed: %s", exc)
        stop.wait(HEARTBEAT_SECONDS)


_stop_heartbeat = threading.Event()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def use_service_log_format(logger: logging.Logger, **_: Any) -> None:
    """Celery sets up the worker's logging; we give its handlers our format and the job id."""
    logs.install(logger.handlers, get_settings().log_format)


@signals.worker_process_init.connect
def load_on_start(**_: Any) -> None:
    global _runtime
    settings = get_settings()
    name = f"{socket.gethostname()}:{os.getpid()}"
    log.info("worker %s loading model %s", name, settings.model_id)
    try:
        loaded = load_model(
            settings.model_id,
            engine=settings.engine,
            threads=settings.compute_threads,
            device=settings.device,
            dtype=settings.dtype,
            use_4bit=settings.use_4bit,
            cache_dir=settings.model_cache_dir,
        )
        engine = Engine(loaded)
        log.info(
            "model loaded in %.1fs by %s on %s (%s, %d threads); warming up",
            loaded.load_seconds,
            loaded.backend,
            loaded.device,
            loaded.dtype,
            loaded.threads,
        )
        engine.warm_up()
    except Exception:
        # A worker without its model must not sit in the pool taking jobs: stop the whole worker.
        log.exception("could not load model %s; stopping the worker", settings.model_id)
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(1)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, decode_responses=True)
    _runtime = WorkerRuntime(
        name=name,
        parent_name=f"{socket.gethostname()}:{os.getppid()}",
        engine=engine,
        redis=client,
        scripts=Scripts(client),
        settings=settings,
    )
    threading.Thread(target=_heartbeat, args=(_runtime, _stop_heartbeat), daemon=True).start()
    log.info(
        "worker %s ready: model=%s engine=%s device=%s dtype=%s quantization=%s loaded in %.1fs",
        name,
        settings.model_name,
        loaded.backend,
        loaded.device,
        loaded.dtype,
        loaded.quantization or "none",
        loaded.load_seconds,
    )


@signals.worker_shutting_down.connect
def drain_after_grace(**_: Any) -> None:
    """In the parent, on SIGTERM/SIGINT: Celery waits for the running generation; after the
    grace period, ask our child to stop it, so the job ends `failed` (worker_shutdown) with its
    partial text instead of being killed mid-way by whoever sent the signal."""
    settings = get_settings()
    name = f"{socket.gethostname()}:{os.getpid()}"

    def drain() -> None:
        try:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
            client.set(keys.worker_drain(name), "1", ex=300)
        except redis.RedisError as exc:
            log.warning("could not ask the pool to drain: %s", exc)

    timer = threading.Timer(settings.shutdown_grace_seconds, drain)
    timer.daemon = True
    timer.start()


@signals.worker_process_shutdown.connect
def unregister(**_: Any) -> None:
    _stop_heartbeat.set()
    if _runtime is not None:
        try:
            _runtime.redis.delete(keys.worker(_runtime.name))
            _runtime.redis.srem(keys.WORKERS, _runtime.name)
        except redis.RedisError:
            pass  # the key expires by itself
