"""Every connection to Redis: the API's async clients, the worker's sync client and Celery's
broker, all built here from one configuration (tasks/settings.py, REDIS_*).

One place, so that what a connection needs beyond a URL (Sentinel, TLS certificates) is added
once for all three, and every call has a bounded connect and reply time. The URL says most:
`redis://`, `unix://`, `rediss://` (TLS), with an ACL `user:password@` if needed; redis-py and
kombu both read those from it. TLS certificates come from REDIS_TLS_* (tls_options).
"""

from __future__ import annotations

import socket
import ssl
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
# An idle connection (a pub/sub follower waiting for events) is probed after this long without
# traffic, so one whose Redis vanished is closed within seconds, not at its next health check.
KEEPALIVE_IDLE_SECONDS = 5
# Reply time for clients that move whole file bodies (tasks/files.py: up to MAX_FILE_BYTES,
# 200 MB by default, in one pipeline), when REDIS_TIMEOUT_SECONDS is shorter.
LARGE_VALUE_TIMEOUT_SECONDS = 30.0


class UnsupportedRedisUrl(ValueError):
    """REDIS_URL names a scheme no client here can connect with."""


def connection_options(settings: Settings, *, timeout_seconds: float | None = None) -> dict[str, Any]:
    """What every client built here shares, the retry policy aside (its class differs between
    the sync and async clients): bounded connect and reply, health checks, a vanished peer
    noticed (keepalive_options), TLS (tls_options)."""
    scheme = urlsplit(settings.redis_url).scheme
    if scheme not in SCHEMES:
        raise UnsupportedRedisUrl(f"REDIS_URL: {scheme or 'no'} scheme; use one of {', '.join(SCHEMES)}")
    return {
        "socket_connect_timeout": settings.redis_connect_timeout_seconds,
        "socket_timeout": timeout_seconds or settings.redis_timeout_seconds,
        "health_check_interval": HEALTH_CHECK_SECONDS,
        # A Unix socket has no TCP to tune, and its peer cannot vanish behind a cut link.
        **(keepalive_options(settings, patience_seconds=timeout_seconds) if scheme != "unix" else {}),
        **tls_options(settings),
    }


def keepalive_options(settings: Settings, *, patience_seconds: float | None = None) -> dict[str, Any]:
    """TCP options that find a Redis gone silent (its host's link cut, packets dropped) as fast
    as one that refuses connections, without cutting a reply short.

    Such a Redis sends no reset: a command on a connection opened before the cut waited out the
    whole reply timeout (REDIS_TIMEOUT_SECONDS, 10 s), and its retry the connect timeout, so
    /health took 11 s to answer 503 where chat, on a fresh connection, took 2 s. A slow Redis and
    a vanished one look alike to a reply timeout, but not to TCP: a live peer acknowledges the
    command's bytes at once, however long it takes to answer. TCP_USER_TIMEOUT (Linux) closes the
    connection when sent bytes stay unacknowledged this long, the connect timeout, so the command
    fails within it and its retry pays one more connect timeout. `patience_seconds`: the files
    client's longer wait, where a busy Redis may stop reading a 200 MB body for a while. Keepalive
    probes do the same for idle connections (pub/sub followers) after KEEPALIVE_IDLE_SECONDS.
    Elsewhere than Linux only keepalive applies, and the reply timeout bounds the rest."""
    silent_ms = int(1000 * max(settings.redis_connect_timeout_seconds, patience_seconds or 0))
    tcp: dict[int, int] = {}
    for name, value in (
        ("TCP_USER_TIMEOUT", silent_ms),
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),
        ("TCP_KEEPINTVL", 1),
        ("TCP_KEEPCNT", 3),
    ):
        if hasattr(socket, name):
            tcp[getattr(socket, name)] = value
    return {"socket_keepalive": True, "socket_keepalive_options": tcp}


def tls_options(settings: Settings) -> dict[str, Any]:
    """The TLS options of a `rediss://` REDIS_URL, {} for any other: the certificate must be
    valid for the host the URL names, signed by REDIS_TLS_CA_FILE (else a CA the system trusts);
    REDIS_TLS_CERT_FILE and _KEY_FILE are shown to a Redis that asks clients for a certificate.
    The names are redis-py's connection arguments, which kombu's broker_use_ssl passes on as
    they are, so redis-py clients and Celery's broker (plain or Sentinel) share them."""
    files = {
        "ssl_ca_certs": settings.redis_tls_ca_file,
        "ssl_certfile": settings.redis_tls_cert_file,
        "ssl_keyfile": settings.redis_tls_key_file,
    }
    given = {name: str(path) for name, path in files.items() if path is not None}
    if urlsplit(settings.redis_url).scheme != "rediss":
        if given:  # a TLS setup that would be silently ignored: most likely a URL left at redis://
            raise UnsupportedRedisUrl("REDIS_TLS_* files are set, but REDIS_URL is not rediss://")
        return {}
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **given}


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
    # Celery's broker_use_ssl: tls_options for a rediss:// URL, else None. Left unset, kombu
    # would take a rediss:// URL with certificate checks off (it logs a warning, and connects).
    use_ssl: dict[str, Any] | None = None


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
            **{k: options[k] for k in ("socket_keepalive", "socket_keepalive_options") if k in options},
        },
        # Celery's default, with our count of retries: immediate, then 0.2 s apart. A message
        # published twice (the first reply lost) runs once: the worker's claim skips it.
        publish_retry_policy={
            "max_retries": settings.redis_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        use_ssl=tls_options(settings) or None,
    )
