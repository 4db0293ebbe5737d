"""Every Redis key and channel name the service uses, in one place."""

from __future__ import annotations

NAMESPACE = "llmq"

# Celery's own queue (a Redis list named after the queue).
GENERATE_QUEUE = "generate"
GENERATE_TASK = "tasks.generate"

WORKERS = f"{NAMESPACE}:workers"  # set of worker names ever registered; pruned by readers
QUEUED = f"{NAMESPACE}:queued"  # sorted set: waiting job ids by creation time (admission, deadlines)
METRICS = f"{NAMESPACE}:metrics"  # hash: counters and histogram buckets (tasks/metrics.py)
RUNNING = f"{NAMESPACE}:running"  # set: job ids a worker has claimed (the reaper checks their leases)


def job(job_id: str) -> str:
    """Hash: the job record (status, spec, result)."""
    return f"{NAMESPACE}:job:{job_id}"


def job_log(job_id: str) -> str:
    """List: every event of the job, in order, for readers that arrive late."""
    return f"{NAMESPACE}:job:{job_id}:log"


def job_channel(job_id: str) -> str:
    """Pub/sub channel: the live path of the job's events."""
    return f"{NAMESPACE}:job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    """String: present when someone asked to cancel the job."""
    return f"{NAMESPACE}:job:{job_id}:cancel"


def job_lease(job_id: str) -> str:
    """String with TTL: renewed by the worker running the job; its expiry means the worker died.

    The reaper (tasks/jobs.py REAP) builds this name as job(id) + ':lease'."""
    return f"{NAMESPACE}:job:{job_id}:lease"


def worker(name: str) -> str:
    """String with TTL: a ready worker's heartbeat and description."""
    return f"{NAMESPACE}:worker:{name}"
