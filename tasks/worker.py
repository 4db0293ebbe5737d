"""A worker process's life: load the model before taking tasks, announce readiness, heartbeat.

The model is loaded in the worker's main process once Celery has set up logging and before its
pool and consumer start (celeryd_after_setup), so no task arrives before the model is ready. Its
one decode loop (tasks/slots.py) then serves the pool's threads, one thread per slot.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import signals

from model.engine import Engine
from model.loading import load_model
from model.prefill import PrefillPolicy
from tasks import keys, logs, registry
from tasks.redis import sync_client
from tasks.scripts import Scripts, wait_of
from tasks.settings import Settings, get_settings

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
HEARTBEAT_TTL_SECONDS = 15


@dataclass
class WorkerRuntime:
    name: str
    engine: Engine
    redis: redis.Redis
    scripts: Scripts
    settings: Settings
    # Job ids holding a slot: changed by the decode loop only; other threads read copies
    # (`list(set)` copies in one step under the GIL).
    running: set[str] = field(default_factory=set)
    # Set once the shutdown grace period is over: running generations stop with what they have.
    draining: threading.Event = field(default_factory=threading.Event)


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the model is not loaded in this process")
    return _runtime


def load_engine(settings: Settings, warm_up: bool = True) -> Engine:
    """The engine MODEL_ID and the settings describe, loaded and (unless told not to) warmed up
    on the calling thread: the thread that will run its forward passes (see SlotLoop.start)."""
    loaded = load_model(
        settings.model_id,
        engine=settings.engine,
        threads=settings.compute_threads,
        slots=settings.worker_slots,
        device=settings.device,
        dtype=settings.dtype,
        use_4bit=settings.use_4bit,
        cache_dir=settings.model_cache_dir,
        prefill=PrefillPolicy(stall_seconds=settings.prefill_stall_seconds, share=settings.prefill_share),
    )
    engine = Engine(loaded)
    log.info(
        "model loaded in %.1fs by %s on %s (%s, %d threads, %d slots)",
        loaded.load_seconds,
        loaded.backend,
        loaded.device,
        loaded.dtype,
        loaded.threads,
        engine.slots,
    )
    if warm_up:
        engine.warm_up()
    return engine


def describe(rt: WorkerRuntime) -> dict[str, Any]:
    loaded = rt.engine.loaded
    running = sorted(list(rt.running))
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
        "slots": rt.engine.slots,
        "running": len(running),
        "jobs": running,
    }


def _heartbeat(rt: WorkerRuntime, stop: threading.Event) -> None:
    """Keep this worker's readiness key and its jobs' leases alive, in one round trip.

    The keys expire on their own if this process dies, which is how others notice (the API's
    reaper, api/main.py, ends the jobs of lapsed leases). A thread, not the decode loop, renews
    them, so a long prefill does not look like a dead worker.
    """
    settings = rt.settings
    # Renew well within the lease: a lease shorter than the usual beat would otherwise run out
    # under a live worker, and its jobs would be reaped as lost.
    interval = min(HEARTBEAT_SECONDS, settings.job_lease_seconds / 3)
    while not stop.is_set():
        try:
            pipe = rt.redis.pipeline(transaction=False)
            pipe.set(keys.worker(rt.name), json.dumps(describe(rt)), ex=HEARTBEAT_TTL_SECONDS)
            pipe.sadd(keys.WORKERS, rt.name)
            registry.announce(pipe, settings.model_name)
            for job in list(rt.running):
                pipe.set(keys.job_lease(job), rt.name, ex=settings.job_lease_seconds, xx=True)
            pipe.execute()
        except redis.RedisError as exc:  # Redis away: keep trying; readers see us expire
            log.warning("heartbeat failed: %s", exc)
        except Exception:  # anything else must not stop the heartbeat: its jobs would be reaped
            log.exception("heartbeat failed")
        stop.wait(interval)


_stop_heartbeat = threading.Event()


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def use_service_log_format(logger: logging.Logger, **_: Any) -> None:
    """Celery sets up the worker's logging; we give its handlers our format and the job id."""
    logs.install(logger.handlers, get_settings().log_format)


def worker_name() -> str:
    """This worker's identity in Redis (its heartbeat, its jobs' leases and records): unique to
    this start of this process. Host name and pid alone are not: two containers sharing their
    host's network have one host name, and each runs its main process as PID 1."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@signals.celeryd_after_setup.connect
def load_on_start(**_: Any) -> None:
    global _runtime
    from tasks.slots import SlotLoop  # the loop needs the runtime type; keep the import one way

    settings = get_settings()
    name = worker_name()
    log.info("worker %s loading model %s", name, settings.model_id)
    try:
        # Warmed up by the decode loop's thread, not here: see SlotLoop.start.
        engine = load_engine(settings, warm_up=False)
        client = sync_client(settings, name="llmq-worker")
        scripts = Scripts(client, wait_of(settings))
        _runtime = WorkerRuntime(name=name, engine=engine, redis=client, scripts=scripts, settings=settings)
        SlotLoop.start(_runtime)
    except Exception:
        # A worker without its model must not take jobs: stop the whole worker.
        log.exception("could not load model %s; stopping the worker", settings.model_id)
        logging.shutdown()
        os._exit(1)
    threading.Thread(target=_heartbeat, args=(_runtime, _stop_heartbeat), daemon=True).start()
    loaded = engine.loaded
    log.info(
        "worker %s ready: model=%s engine=%s device=%s dtype=%s quantization=%s slots=%d loaded in %.1fs",
        name,
        settings.model_name,
        loaded.backend,
        loaded.device,
        loaded.dtype,
        loaded.quantization or "none",
        engine.slots,
        loaded.load_seconds,
    )


@signals.worker_shutting_down.connect
def drain_after_grace(**_: Any) -> None:
    """On SIGTERM/SIGINT Celery stops taking tasks and waits for the running ones; after the
    grace period, the decode loop stops them, so each job ends `failed` (worker_shutdown) with its
    partial text instead of being killed mid-way by whoever sent the signal."""
    if _runtime is None:
        return
    timer = threading.Timer(get_settings().shutdown_grace_seconds, _runtime.draining.set)
    timer.daemon = True
    timer.start()


@signals.worker_shutdown.connect
def unregister(**_: Any) -> None:
    _stop_heartbeat.set()
    if _runtime is not None:
        try:
            _runtime.redis.delete(keys.worker(_runtime.name))
            _runtime.redis.srem(keys.WORKERS, _runtime.name)
        except redis.RedisError:
            pass  # the key expires by itself
