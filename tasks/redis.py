"""Every connection to Redis: the API's async clients, the worker's sync client and Celery's
broker, all built here from one configuration (tasks/settings.py, REDIS_*).

One place, so that what a connection needs beyond a URL (Sentinel, TLS certificates) is added
once for all three, and every call has a bounded connect and reply time. Today the URL says it
all: `redis://`, `unix://`, `rediss://` (TLS), with an ACL `user:password@` if needed; redis-py
and kombu both read those from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from tasks import keys
from tasks.settings import Settings

SCHEMES = ("redis", "rediss", "unix")
# A connection unused this long is checked with a PING before its next command, so one that
# went stale while idle (a restarted Redis, a NAT or firewall that dropped it) is replaced
# without spending the command's retry. The API had it at 30 s; kombu's default is 25.
HEALTH_CHECK_SECONDS = 30
# Reply time for clients that move whole file bodies (tasks/files.py: up to MAX_FILE_BYTES,
# 200 MB by default, in one pipeline), when REDIS_TIMEOUT_SECONDS is shorter.
LARGE_VALUE_TIMEOUT_SECONDS = 30.0


class UnsupportedRedisUrl(ValueError):
    """REDIS_URL names a scheme no client here can connect with."""


def connection_options(settings: Settings, *, timeout_seconds: float | None = None) -> dict[str, Any]:
    """What every client built here shares, the retry policy aside (its class differs between
    the sync and async clients): bounded connect and reply, health checks."""
    scheme = urlsplit(settings.redis_url).scheme
    if scheme not in SCHEMES:
        raise UnsupportedRedisUrl(f"REDIS_URL: {scheme or 'no'} scheme; use one of {', '.join(SCHEMES)}")
    return {
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
        "socket_timeout": timeout_seconds or settings.redis_timeout_seconds,
        "health_check_interval": HEALTH_CHECK_SECONDS,
    }


# Retries are immediate (no backoff): what one cures is a connection that broke (Redis restarted
# or failed over, the health check above missed it); a Redis that is down stays down longer
# than any wait the API could afford, which must answer 503 within about 2 s (connect 1 s,
# retried once). The worker had redis-py's default (10 tries, 5 s timeouts): that let one write
# hold its decode loop for close to a minute, while its callers already try again later on
# their own (the heartbeat each beat, cancel polling each poll) and a write that fails ends its
# jobs cleanly; so it follows the same policy.


def async_client(
    settings: Settings,
    *,
    name: str,
    decode_responses: bool = True,
    large_values: bool = False,
    max_connections: int | None = None,
) -> aioredis.Redis:
    """An asyncio client (the API). `large_values`: it carries whole file bodies, so it may
    wait longer for a reply; `max_connections` bounds its pool (None: no bound)."""
    timeout = max(settings.redis_timeout_seconds, LARGE_VALUE_TIMEOUT_SECONDS) if large_values else None
    return aioredis.Redis.from_url(
        settings.redis_url,
        **connection_options(settings, timeout_seconds=timeout),
        retry=redis.asyncio.retry.Retry(NoBackoff(), settings.redis_retries),
        decode_responses=decode_responses,
        client_name=name,
        max_connections=max_connections,
    )


def sync_client(settings: Settings, *, name: str) -> redis.Redis:
    """A blocking client (the worker's threads), decoding replies to str."""
    return redis.Redis.from_url(
        settings.redis_url,
        **connection_options(settings),
        retry=redis.retry.Retry(NoBackoff(), settings.redis_retries),
        decode_responses=True,
        client_name=name,
    )


@dataclass(frozen=True)
class BrokerSettings:
    """Celery's broker connection (celeryconfig.py): the Redis transport of kombu."""

    url: str
    # kombu's Redis transport options that concern the connection; celeryconfig.py adds the
    # queue's (priorities, visibility timeout).
    transport_options: dict[str, Any]
    # How often the API's send_task publishes again after the connection broke.
    publish_retry_policy: dict[str, Any]


def broker(settings: Settings) -> BrokerSettings:
    options = connection_options(settings)
    return BrokerSettings(
        url=settings.redis_url,
        transport_options={
            # kombu prefixes each key it touches (queue lists, bindings, unacked messages and
            # their index and mutex) and each pub/sub channel (task events, remote control,
            # which Flower and `celery inspect` use) with this; see tasks/keys.py.
            "global_keyprefix": keys.PREFIX,
            # kombu listens to pub/sub with PSUBSCRIBE, and a Redis ACL allows a PSUBSCRIBE
            # pattern only when it is literally one of the user's `&` rules. With routing keys
            # in the channel names each listener has its own pattern (`.../celeryev/worker.*`
            # for the workers' gossip, `.../celeryev/*` for Flower); without them there are two,
            # `llmq:/{db}.celeryev` and `llmq:/{db}.celery.pidbox`, whoever listens. Workers then
            # also receive task events, which Celery's gossip drops (celery#1882): a few per job.
            "fanout_patterns": False,
            # kombu leaves both unbounded by default: a publish on a connection that died
            # silently would wait forever. Its BRPOP waits 1 s, well inside this.
            "socket_connect_timeout": options["socket_connect_timeout"],
            "socket_timeout": options["socket_timeout"],
            "health_check_interval": options["health_check_interval"],
            "client_name": "llmq-celery",
        },
        # Celery's default, with our count of retries: immediate, then 0.2 s apart. A message
        # published twice (the first reply lost) runs once: the worker's claim skips it.
        publish_retry_policy={
            "max_retries": settings.redis_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
    )
