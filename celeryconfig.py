"""Celery configuration: one model per worker process, WORKER_SLOTS generations batched at once."""

from tasks import keys
from tasks.redis import broker
from tasks.settings import get_settings

settings = get_settings()
_broker = broker(settings)  # the connection: URL, timeouts, key prefix (tasks/redis.py)
broker_url = _broker.url
broker_use_ssl = _broker.use_ssl  # rediss:// only: the CA and client certificate (REDIS_TLS_*)
task_publish_retry_policy = _broker.publish_retry_policy
broker_connection_retry_on_startup = True
# Keep reconnecting after Redis goes away (None = forever), so workers resume on their own.
broker_connection_max_retries = None
# A Sentinel failover leaves connections on the demoted master, which answers READONLY: a channel
# error, on which Celery reconnects (asking the sentinels for the new master) only with this.
broker_channel_error_retry = True
# Redis redelivers a message not acknowledged within this time. A generation may outlast it:
# the claim in tasks/jobs.py makes a second delivery a no-op, so it never runs twice.
# Priorities: kombu keeps one Redis list per priority step and pops the highest step first, so a
# worker that frees a slot always takes an interactive job (priority 0, the default) before a
# batch line (keys.BATCH_PRIORITY). Reserving nothing ahead (below) keeps that order exact.
broker_transport_options = {
    **_broker.transport_options,
    "visibility_timeout": settings.broker_visibility_timeout_seconds,
    "priority_steps": [0, keys.BATCH_PRIORITY],
    "queue_order_strategy": "priority",
}

# One process, one model copy, one decode loop (tasks/slots.py), and a pool of threads, one per
# slot: each thread takes one task from Redis, claims the job, renders its prompt and hands it to
# the loop, then waits for it to end. So a worker holds exactly as many jobs as it has slots, and
# one loop batches them all through the model. Threads, not prefork: forked children would each
# need their own model copy. The threads spend their time waiting, and the loop's compute runs in
# llama.cpp or torch with the GIL released, so Python threads cost nothing here. The model loads
# in this process before the consumer starts (tasks/worker.py), so nothing is taken before it.
worker_pool = "threads"
worker_concurrency = settings.worker_slots

# Each worker holds only the messages its slots are running: a queued job waits in Redis, where
# whichever worker frees a slot first takes it, instead of sitting reserved behind a long generation.
worker_prefetch_multiplier = 1
worker_disable_prefetch = True
task_acks_late = True

# Task events (sent by the API, received/started/succeeded by workers) are what Flower shows as
# tasks; without them it lists the workers only. Nobody listening: Redis drops them.
worker_send_task_events = True
task_send_sent_event = True

# A worker consumes its own model's queue only (SERVED_MODEL_NAME, else MODEL_ID), so a request
# never reaches a worker of another model; the API names each job's queue when it sends it
# (tasks/client.py), so its own MODEL_ID plays no part.
task_default_queue = keys.generate_queue(settings.model_name)
# Results travel as events and job records (tasks/jobs.py), not through a result backend.
task_ignore_result = True
task_serializer = "json"
accept_content = ["json"]
