"""Celery configuration: one model per worker process, one generation at a time."""

from tasks import keys
from tasks.settings import get_settings

settings = get_settings()
broker_url = settings.redis_url
broker_connection_retry_on_startup = True
# Keep reconnecting after Redis goes away (None = forever), so workers resume on their own.
broker_connection_max_retries = None
# Redis redelivers a message not acknowledged within this time. A generation may outlast it:
# the claim in tasks/jobs.py makes a second delivery a no-op, so it never runs twice.
broker_transport_options = {"visibility_timeout": settings.broker_visibility_timeout_seconds}

# prefork with a single child: the child holds the model (loaded in worker_process_init, so CUDA
# is initialised after the fork), while the parent stays free to answer control commands and to
# replace a child that died. One child = one generation at a time on this worker.
worker_pool = "prefork"
worker_concurrency = 1
# Loading a model in the child can take minutes; Celery's default is to give up after 4 s.
worker_proc_alive_timeout = 900.0

# Each worker holds only the message it is running: a queued job waits in Redis, where whichever
# worker frees up first takes it, instead of sitting reserved behind a long generation.
worker_prefetch_multiplier = 1
worker_disable_prefetch = True
task_acks_late = True

# Task events (sent by the API, received/started/succeeded by workers) are what Flower shows as
# tasks; without them it lists the workers only. Nobody listening: Redis drops them.
worker_send_task_events = True
task_send_sent_event = True

task_default_queue = keys.GENERATE_QUEUE
task_routes = {keys.GENERATE_TASK: {"queue": keys.GENERATE_QUEUE}}
# Results travel as events and job records (tasks/jobs.py), not through a result backend.
task_ignore_result = True
task_serializer = "json"
accept_content = ["json"]
