"""Every Redis key and channel name the service uses, in one place."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

NAMESPACE = "llmq"
# Every key and pub/sub channel starts with this, Celery's included, so one ACL rule
# (`~llmq:* &llmq:*`) covers all the service touches and it can share a Redis with others.
PREFIX = f"{NAMESPACE}:"

# Celery's queue. kombu prepends PREFIX to every key and channel it uses (its
# `global_keyprefix`, set in tasks/redis.py), so Celery, Flower and `-Q` keep this short name
# while Redis holds the queue as the list GENERATE_LIST (priority 0; kombu names the list of
# priority p>0 GENERATE_LIST + "\x06\x16" + p), beside its bindings, unacked messages and the
# event and control channels.
GENERATE_QUEUE = "generate"
GENERATE_TASK = "tasks.generate"


def generate_queue(model: str) -> str:
    """Celery's queue of one model's jobs: a worker consumes only its own model's queue
    (celeryconfig.py), so a request never reaches a worker of another model. Redis holds it as
    the list generate_list(model)."""
    return f"{GENERATE_QUEUE}:{model}"


def generate_list(model: str) -> str:
    return f"{PREFIX}{generate_queue(model)}"


WORKERS = f"{NAMESPACE}:workers"  # set of worker names ever registered; pruned by readers
# Hashes: model name -> when a worker first / last announced it (tasks/registry.py).
MODELS_CREATED = f"{NAMESPACE}:models:created"
MODELS_SEEN = f"{NAMESPACE}:models:seen"
QUEUED = f"{NAMESPACE}:queued"  # sorted set: waiting job ids by creation time (deadlines)
# Hash: counters and histogram buckets not of one model (tasks/metrics.py); each model's own in
# metrics_of(model).
METRICS = f"{NAMESPACE}:metrics"
RUNNING = f"{NAMESPACE}:running"  # set: job ids a worker has claimed (the reaper checks their leases)
# Stream: one entry per job ending (id, kind, status, batch, at), added by the script that ends
# the job (tasks/jobs.py end_job), for consumers that follow endings without polling each job;
# and one per batch ending (kind `batch`), added by the script that ends the batch
# (tasks/batches.py _TRANSITION).
ENDED = f"{NAMESPACE}:ended"
# Batch lines (tasks/batches.py) wait in their own index: they never count against MAX_QUEUED
# and have no queue deadline (their batch's completion window bounds them instead).
BATCH_QUEUED = f"{NAMESPACE}:batch-queued"  # sorted set: queued batch-line job ids by enqueue time
BATCH_RUNNING = f"{NAMESPACE}:batch-running"  # set: claimed batch-line job ids
BATCHES_ACTIVE = f"{NAMESPACE}:batches:active"  # set: ids of batches not yet ended
# Celery priority of batch lines on the generate queue. On Redis 0 is the highest and messages
# without one get 0, so every interactive job is taken before any batch line (celeryconfig.py).
BATCH_PRIORITY = 9


def queued_of(model: str) -> str:
    """Sorted set: one model's waiting job ids by creation time (admission counts these)."""
    return f"{QUEUED}:{model}"


def metrics_of(model: str) -> str:
    """Hash: one model's counters and histogram buckets (tasks/metrics.py)."""
    return f"{METRICS}:{model}"


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


def file(file_id: str) -> str:
    """Hash: an uploaded or generated file, `meta` (JSON) and `content` (bytes)."""
    return f"{NAMESPACE}:file:{file_id}"


def files_of(owner: str | None) -> str:
    """Sorted set: one owner's file ids by creation time."""
    return f"{NAMESPACE}:files:{owner or '-'}"


BATCH_PREFIX = f"{NAMESPACE}:batch:"  # jobs.py's end-of-job script builds batch_done() from it


def batch(batch_id: str) -> str:
    """Hash: the batch record (spec, status, timestamps, cursors, counts)."""
    return f"{BATCH_PREFIX}{batch_id}"


def batch_part(batch_id: str, part: str) -> str:
    """The batch's working sets, dropped when it ends: `lines` (list: each input line as parsed),
    `jobs` (hash: line -> current job id), `attempts` (hash: line -> tries), `results` and
    `errors` (hash: line -> output line), `done` (list: ids of its jobs that ended, appended
    by the job scripts), `lease` (string: the API instance driving it)."""
    return f"{BATCH_PREFIX}{batch_id}:{part}"


def batches_of(owner: str | None) -> str:
    """Sorted set: one owner's batch ids by creation time."""
    return f"{NAMESPACE}:batches:{owner or '-'}"


QUOTA_PREFIX = f"{NAMESPACE}:quota:"  # jobs.py's end-of-job script builds quota(owner) from it


def quota(owner: str | None) -> str:
    """Hash with TTL: one owner's rate-limit buckets (tasks/quotas.py); '-' is everyone's
    without API_KEYS."""
    return f"{QUOTA_PREFIX}{owner or '-'}"


# Webhooks (tasks/webhooks.py, api/webhooks/). The fan-out reads the ended stream (ENDED) after
# WEBHOOK_CURSOR, the id of the last entry turned into deliveries, moved only by the script that
# records those deliveries (so an entry is fanned out once, by whichever instance moves it).
WEBHOOK_CURSOR = f"{NAMESPACE}:webhooks:cursor"
WEBHOOK_DUE = f"{NAMESPACE}:webhooks:due"  # sorted set: open delivery ids by next attempt time
WEBHOOK_PENDING = f"{NAMESPACE}:webhooks:pending"  # sorted set: open delivery ids by event time
WEBHOOK_RECENT = f"{NAMESPACE}:webhooks:recent"  # sorted set: the last deliveries, by creation
WEBHOOK_COUNTS = f"{NAMESPACE}:webhooks:counts"  # hash: deliveries by outcome, and attempts
WEBHOOK_PREFIX = f"{NAMESPACE}:webhook:"  # the scripts build webhook_delivery() from it


def webhook_delivery(delivery_id: str) -> str:
    """Hash: one event's delivery to one endpoint (its body, state, attempts so far)."""
    return f"{WEBHOOK_PREFIX}{delivery_id}"


def webhook_attempts(delivery_id: str) -> str:
    """List: the last attempts of one delivery (JSON each: when, status or error)."""
    return f"{WEBHOOK_PREFIX}{delivery_id}:attempts"


# Fair shares between keys (tasks/jobs.py "fair index"). A worker's claim picks among waiting jobs
# here, not in Celery's FIFO lists, whose messages only wake workers. Per model and tier (TIERS:
# interactive requests, then batch lines): the owners that have jobs waiting, scored by their
# virtual token counter (VTC); each owner's waiting job ids by creation time; and the counters
# themselves, kept while an owner is idle. Owners are api.edge.auth.owner_tag()s (hex), or
# NO_OWNER without API_KEYS, so a tag never holds the ':' that separates the model's name.
TIERS = ("interactive", "batch")
NO_OWNER = "-"
FAIR_OWNERS = f"{NAMESPACE}:fair:owners:"
FAIR_JOBS = f"{NAMESPACE}:fair:jobs:"
FAIR_COUNTERS = f"{NAMESPACE}:fair:vtc:"
# Per owner, across models, interactive jobs only (MAX_QUEUED_PER_KEY, MAX_RUNNING_PER_KEY): a
# sorted set of its waiting job ids by creation time and a set of its claimed ones. The scripts
# keep both (no counters that could drift): they empty as the jobs end.
OWNER_QUEUED = f"{NAMESPACE}:owner-queued:"
OWNER_RUNNING = f"{NAMESPACE}:owner-running:"


def fair_owners(model: str, tier: str) -> str:
    """Sorted set: owners with jobs of `tier` waiting for `model`, scored by their counter."""
    return f"{FAIR_OWNERS}{tier}:{model}"


def fair_jobs(model: str, tier: str, owner: str) -> str:
    """Sorted set: one owner's waiting job ids of `tier` for `model`, by creation time."""
    return f"{FAIR_JOBS}{tier}:{owner}:{model}"


def fair_counters(model: str, tier: str) -> str:
    """Hash: owner -> virtual token counter for `model`'s `tier` (and the floor, see jobs.py)."""
    return f"{FAIR_COUNTERS}{tier}:{model}"


def owner_queued(owner: str) -> str:
    return f"{OWNER_QUEUED}{owner}"


def owner_running(owner: str) -> str:
    return f"{OWNER_RUNNING}{owner}"


# kombu's separator between a queue's name and a priority step above 0 (its default; see the
# comment on GENERATE_QUEUE).
PRIORITY_SEP = "\x06\x16"


def generate_lists(model: str) -> list[str]:
    """The Redis lists holding one model's Celery messages: priority 0 (interactive wake-ups) and
    BATCH_PRIORITY (batch lines'). The wake-up repair (tasks/client.py) counts them."""
    return [generate_list(model), f"{generate_list(model)}{PRIORITY_SEP}{BATCH_PRIORITY}"]


# --- The service's Redis ACL -------------------------------------------------------------------
# Every command the service's processes send, so its Redis user can be given exactly these (README
# "Redis ACL"; every integration test's Redis runs under them and fails the run on a denial in its
# ACL LOG). Commands inside scripts are checked too, so the scripts' own are here.
ACL_COMMANDS = (
    # Every connection: redis-py names it on connect (and states its library, acl_rules'
    # `client_setinfo`), checks an idle one (PING), and selects REDIS_URL's database if not 0.
    "ping", "client|setname", "select",
    # The job scripts (tasks/jobs.py, tasks/registry.py) and kombu's: run by hash, loaded on NOSCRIPT.
    "evalsha", "eval", "script|load", "script|exists",
    # Data, by the service's code (api/, tasks/), the scripts and kombu, by type.
    "get", "set", "mget", "del", "exists", "expire", "expireat", "pexpire", "ttl", "time",
    "hget", "hset", "hsetnx", "hmget", "hgetall", "hkeys", "hlen", "hdel", "hexists", "hscan",
    "hincrby", "hincrbyfloat",
    "lpush", "rpush", "brpop", "llen", "lrange", "ltrim",
    "sadd", "srem", "smembers", "scard",
    "zadd", "zrem", "zcard", "zscore", "zrange", "zrevrange", "zrangebyscore", "zremrangebyscore",
    "zremrangebyrank",
    "xadd", "xrange", "xrevrange",
    # Transactions: the API's pipelines, and kombu's redelivery of a message whose worker died
    # (WATCH its unacked record; redis-py sends UNWATCH when a watched transaction is abandoned).
    "multi", "exec", "watch", "unwatch",
    # Events and Celery's task events and remote control.
    "publish", "subscribe", "unsubscribe", "psubscribe", "punsubscribe",
    # Durability (REDIS_WAIT_REPLICAS, tasks/scripts.py): a job's write acknowledged by replicas.
    "wait",
)  # fmt: skip

# What the service's clients send a sentinel (a Sentinel REDIS_URL): redis-py asks for the
# master (SENTINEL MASTERS, checking its state) and, where it looks for replicas, SENTINEL
# REPLICAS; an idle connection is checked with PING. The sentinel's own ACL, with
# REDIS_SENTINEL_USERNAME: never `&*` or the `__sentinel__:hello` channel, through which a
# client could forge the topology the sentinels agree on.
SENTINEL_ACL_COMMANDS = (
    "ping", "sentinel|masters", "sentinel|master", "sentinel|replicas", "sentinel|slaves",
)  # fmt: skip


def sentinel_acl_rules(client_setinfo: bool = True) -> list[str]:
    """The rules of the service's user on each sentinel (its `user` line in sentinel.conf, or
    ACL SETUSER there), after the user name, `on` and its password."""
    setinfo = ["+client|setinfo"] if client_setinfo else []
    return ["resetkeys", "resetchannels", "-@all", *(f"+{c}" for c in SENTINEL_ACL_COMMANDS), *setinfo]


def acl_rules(db: int = 0, client_setinfo: bool = True) -> list[str]:
    """The rules of the service's Redis user, for REDIS_URL's database `db`, as `ACL SETUSER`
    (or redis-server's `--user`) takes them after the user name, `on` and its password.

    Keys and channels: PREFIX and nothing else. kombu listens with PSUBSCRIBE, whose patterns a
    Redis ACL compares with the `&` rules literally, so its two (tasks/redis.py, `fanout_patterns`)
    are named for the database. `client_setinfo`: Redis 7.2 and later; redis-py (kombu's
    connections too) sends CLIENT SETINFO on every connect and ignores a refusal, which Redis
    would still log, while Redis 7.0 knows no such command and refuses the rule."""
    setinfo = ["+client|setinfo"] if client_setinfo else []
    return [
        "resetkeys",
        "resetchannels",
        f"~{PREFIX}*",
        f"&{PREFIX}*",
        f"&{PREFIX}/{db}.celeryev",
        f"&{PREFIX}/{db}.celery.pidbox",
        "-@all",
        *(f"+{command}" for command in ACL_COMMANDS),
        *setinfo,
    ]


# The default user, for a Redis where only the service's user may log in: off (no connection
# starts as it, no AUTH gets in: it has no password), but with every permission. Redis replays
# the AOF's transactions as the default user and checks its ACL at EXEC (valkey-io/valkey#3983):
# a default user without permissions makes a restart drop every MULTI/EXEC the AOF holds, silently.
DEFAULT_USER_OFF = ["--user", "default", "off", "resetpass", "~*", "&*", "+@all"]


def redis_server_args(url: str, client_setinfo: bool = True) -> list[str]:
    """redis-server's command-line arguments that let REDIS_URL `url` in: its user, with its
    password and exactly acl_rules(), and the default user off; a password without a user, the
    default user's (requirepass); nothing for a URL without a password. For `make run`'s Redis."""
    parts = urlsplit(url)
    if not parts.password:
        return []
    password = unquote(parts.password)
    if not parts.username:
        return ["--requirepass", password]
    db = int(parts.path.strip("/") or 0)
    rules = acl_rules(db, client_setinfo)
    return [*DEFAULT_USER_OFF, "--user", unquote(parts.username), "on", f">{password}", *rules]


if __name__ == "__main__":  # python -m tasks.keys --redis-server-args URL: one argument a line
    import re
    import subprocess
    import sys

    if sys.argv[1:2] != ["--redis-server-args"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tasks.keys --redis-server-args REDIS_URL")
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    found = re.search(r"v=(\d+)\.(\d+)", version)
    setinfo = found is None or (int(found[1]), int(found[2])) >= (7, 2)
    for argument in redis_server_args(sys.argv[2], setinfo):  # none: no line at all
        sys.stdout.write(f"{argument}\n")  # the output a shell reads, not a log line
