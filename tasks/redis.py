"""Every connection to Redis: the API's async clients, the worker's sync client and Celery's
broker, all built here from one configuration (tasks/settings.py, REDIS_*).

One place, so that what a connection needs beyond a URL (Sentinel, TLS certificates) is added
once for all three, and every call has a bounded connect and reply time. The URL says most:
`redis://`, `unix://`, `rediss://` (TLS), with an ACL `user:password@` if needed; redis-py and
kombu both read those from it. TLS certificates come from REDIS_TLS_* (tls_options).

Sentinel (high availability) takes kombu's syntax, `sentinel://[user:pass@]h1:26379[/db];
sentinel://h2:26379;...` with REDIS_SENTINEL_MASTER (sentinel_url). The URL's credentials and
REDIS_TLS_* reach the data nodes only (master and replicas): the sentinels get what
sentinel_kwargs says (REDIS_SENTINEL_USERNAME/_PASSWORD, TLS when REDIS_SENTINEL_TLS), as kombu
does with its transport option of that name. Each process asks the sentinels for the master
through one redis-py Sentinel per kind of client (sync, asyncio), reused by every client.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff, NoBackoff

from tasks import keys
from tasks.settings import Settings

SCHEMES = ("redis", "rediss", "unix", "sentinel")
SENTINEL_PORT = 26379
# Retries through a failover (Sentinel URLs only): exponential from FAILOVER_BACKOFF_BASE, with
# jitter so a fleet of clients does not reconnect in step, each wait at most FAILOVER_BACKOFF_CAP,
# as many as fill REDIS_FAILOVER_SECONDS (failover_retries).
FAILOVER_BACKOFF_BASE = 0.1
FAILOVER_BACKOFF_CAP = 1.0
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


@dataclass(frozen=True)
class SentinelUrl:
    """A sentinel:// REDIS_URL: the sentinels to ask, and the data nodes' credentials and
    database (kombu reads those from the first part only, so only the first may carry them)."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


def sentinel_url(url: str) -> SentinelUrl | None:
    """REDIS_URL parsed as kombu parses a Sentinel broker URL; None for any other scheme."""
    parts = [urlsplit(part.strip()) for part in url.split(";")]
    if parts[0].scheme != "sentinel":
        return None
    sentinels = []
    for i, part in enumerate(parts):
        try:
            host, port = part.hostname, part.port or SENTINEL_PORT
        except ValueError:  # a port that is no number
            host = None
        if part.scheme != "sentinel" or not host:
            raise UnsupportedRedisUrl("REDIS_URL: a Sentinel URL is sentinel://host:port;sentinel://...")
        if i and (part.username or part.password or part.path.strip("/")):
            raise UnsupportedRedisUrl("REDIS_URL: a Sentinel URL's credentials and db go in its first part")
        sentinels.append((host, port))
    db = parts[0].path.strip("/") or "0"
    if not db.isdigit():
        raise UnsupportedRedisUrl("REDIS_URL: a Sentinel URL's database is a number")
    user, password = parts[0].username, parts[0].password
    return SentinelUrl(
        tuple(sentinels), unquote(user) if user else None, unquote(password) if password else None, int(db)
    )


def failover_retries(seconds: float) -> int:
    """How many retries with the failover backoff wait about `seconds` in all, at the most."""
    retries, waited = 0, 0.0
    while waited < seconds:
        retries += 1
        waited += min(FAILOVER_BACKOFF_CAP, FAILOVER_BACKOFF_BASE * 2**retries)
    return retries


def retry_policy(settings: Settings) -> tuple[AbstractBackoff, int]:
    """The backoff and retries of every data client (see the comment above async_client).

    Sentinel: a failover takes seconds (down-after, then the election and promotion), during
    which the old master refuses connections and the sentinels still name it, then the new one
    answers; a call keeps trying, its waits adding up to at most REDIS_FAILOVER_SECONDS (about
    half with the jitter) beside each try's own connect or reply time, so requests and running
    jobs ride through a failover instead of failing. A plain Redis has nothing to wait for."""
    if sentinel_url(settings.redis_url) is None:
        return NoBackoff(), settings.redis_retries
    backoff = ExponentialWithJitterBackoff(cap=FAILOVER_BACKOFF_CAP, base=FAILOVER_BACKOFF_BASE)
    return backoff, failover_retries(settings.redis_failover_seconds)


def connection_options(settings: Settings, *, timeout_seconds: float | None = None) -> dict[str, Any]:
    """What every client built here shares, the retry policy aside (its class differs between
    the sync and async clients): bounded connect and reply, health checks, a vanished peer
    noticed (keepalive_options), TLS (tls_options)."""
    scheme = urlsplit(settings.redis_url).scheme
    if scheme not in SCHEMES:
        raise UnsupportedRedisUrl(f"REDIS_URL: {scheme or 'no'} scheme; use one of {', '.join(SCHEMES)}")
    sentinel_url(settings.redis_url)  # refuses a malformed Sentinel URL by name
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


def uses_tls(settings: Settings) -> bool:
    """A rediss:// REDIS_URL, or a sentinel:// one with REDIS_SENTINEL_TLS (kombu has no TLS
    scheme for Sentinel): then the sentinels and the data nodes are all reached over TLS."""
    scheme = urlsplit(settings.redis_url).scheme
    if settings.redis_sentinel_tls and scheme != "sentinel":
        raise UnsupportedRedisUrl("REDIS_SENTINEL_TLS is set, but REDIS_URL is not sentinel://")
    return scheme == "rediss" or (scheme == "sentinel" and settings.redis_sentinel_tls)


def tls_options(settings: Settings) -> dict[str, Any]:
    """The TLS options of a `rediss://` REDIS_URL (or a sentinel:// one with REDIS_SENTINEL_TLS),
    {} for any other: the certificate must be valid for the host the URL (or the sentinels)
    names, signed by REDIS_TLS_CA_FILE (else a CA the system trusts); REDIS_TLS_CERT_FILE and
    _KEY_FILE are shown to a Redis that asks clients for a certificate. The names are redis-py's
    connection arguments, which kombu's broker_use_ssl passes on as they are, so redis-py
    clients and Celery's broker (plain or Sentinel) share them. Sentinels hand out IP
    addresses: a data node's certificate needs them as IP SANs (hostname checks are on)."""
    files = {
        "ssl_ca_certs": settings.redis_tls_ca_file,
        "ssl_certfile": settings.redis_tls_cert_file,
        "ssl_keyfile": settings.redis_tls_key_file,
    }
    given = {name: str(path) for name, path in files.items() if path is not None}
    if not uses_tls(settings):
        if given:  # a TLS setup that would be silently ignored: most likely a URL left at redis://
            raise UnsupportedRedisUrl(
                "REDIS_TLS_* files are set, but REDIS_URL is not rediss:// (or sentinel:// with "
                "REDIS_SENTINEL_TLS)"
            )
        return {}
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **given}


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to reach the sentinels themselves (redis-py's and kombu's `sentinel_kwargs`): bounded
    like any connection, their own ACL user if REDIS_SENTINEL_USERNAME/_PASSWORD say so (never
    the data nodes': a sentinel's ACL is its own), TLS with REDIS_SENTINEL_TLS. No retry: asking
    for the master moves on to the next sentinel when one fails (redis-py's default here)."""
    options = connection_options(settings)
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": options["socket_connect_timeout"],
        "socket_timeout": options["socket_timeout"],
        **{k: options[k] for k in ("socket_keepalive", "socket_keepalive_options") if k in options},
    }
    if settings.redis_sentinel_username:
        kwargs["username"] = settings.redis_sentinel_username
    if settings.redis_sentinel_password:
        kwargs["password"] = settings.redis_sentinel_password
    if tls := tls_options(settings):
        kwargs.update(ssl=True, **tls)
    return kwargs


def min_other_sentinels(url: SentinelUrl) -> int:
    """A sentinel's word on the master counts only if it sees at least one other sentinel: one
    cut off from the rest (a partition) may still name a demoted master. With one sentinel
    listed (a development setup) there is no other to see."""
    return 1 if len(url.sentinels) > 1 else 0


_sentinels: dict[tuple[Any, ...], redis.sentinel.Sentinel | redis.asyncio.sentinel.Sentinel] = {}


def _sentinel(settings: Settings, url: SentinelUrl, asynchronous: bool) -> Any:
    """This process's Sentinel for `url`, sync or asyncio, made on first use and reused by every
    client after (each client's master_for pool asks it for the master)."""
    kwargs = sentinel_kwargs(settings)
    key = (asynchronous, url.sentinels, repr(sorted(kwargs.items())))
    if key not in _sentinels:
        kind = redis.asyncio.sentinel.Sentinel if asynchronous else redis.sentinel.Sentinel
        _sentinels[key] = kind(
            list(url.sentinels), min_other_sentinels=min_other_sentinels(url), sentinel_kwargs=kwargs
        )
    return _sentinels[key]


def _master_kwargs(settings: Settings, url: SentinelUrl, options: dict[str, Any]) -> dict[str, Any]:
    """master_for's connection arguments: what a URL would have said (database, credentials),
    and `ssl` to pick the TLS connection class, beside connection_options' own."""
    tls = {"ssl": True} if options.get("ssl_cert_reqs") is not None else {}
    return {"db": url.db, "username": url.username, "password": url.password, **tls, **options}


# Retries are immediate (no backoff): what one cures is a connection that broke (Redis restarted
# or failed over, the health check above missed it); a Redis that is down stays down longer
# than any wait the API could afford, which must answer 503 within about 2 s (connect 1 s,
# retried once). The worker had redis-py's default (10 tries, 5 s timeouts): that let one write
# hold its decode loop for close to a minute, while its callers already try again later on
# their own (the heartbeat each beat, cancel polling each poll) and a write that fails ends its
# jobs cleanly; so it follows the same policy.
# Under Sentinel there is something worth waiting for, a promoted replica, so calls back off
# and retry for about REDIS_FAILOVER_SECONDS (retry_policy); a failed-over master answers
# READONLY, which redis-py's Sentinel connection turns into a retried connection error.


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
    options = connection_options(settings, timeout_seconds=timeout)
    backoff, retries = retry_policy(settings)
    extra: dict[str, Any] = {
        "retry": redis.asyncio.retry.Retry(backoff, retries),
        "decode_responses": decode_responses,
        "client_name": name,
        "max_connections": max_connections,
    }
    if url := sentinel_url(settings.redis_url):
        sentinel = _sentinel(settings, url, asynchronous=True)
        master = settings.redis_sentinel_master
        kwargs = _master_kwargs(settings, url, options)
        client: aioredis.Redis = sentinel.master_for(master, redis_class=aioredis.Redis, **kwargs, **extra)
        return client
    return aioredis.Redis.from_url(settings.redis_url, **options, **extra)


def sync_client(settings: Settings, *, name: str) -> redis.Redis:
    """A blocking client (the worker's threads), decoding replies to str."""
    options = connection_options(settings)
    backoff, retries = retry_policy(settings)
    extra: dict[str, Any] = {
        "retry": redis.retry.Retry(backoff, retries),
        "decode_responses": True,
        "client_name": name,
    }
    if url := sentinel_url(settings.redis_url):
        sentinel = _sentinel(settings, url, asynchronous=False)
        kwargs = _master_kwargs(settings, url, options)
        client: redis.Redis = sentinel.master_for(
            settings.redis_sentinel_master, redis_class=redis.Redis, **kwargs, **extra
        )
        return client
    return redis.Redis.from_url(settings.redis_url, **options, **extra)


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
    url = sentinel_url(settings.redis_url)
    # kombu's Sentinel channel: which master, whom to believe, how to reach the sentinels.
    sentinel = (
        {
            "master_name": settings.redis_sentinel_master,
            "min_other_sentinels": min_other_sentinels(url),
            "sentinel_kwargs": sentinel_kwargs(settings),
        }
        if url
        else {}
    )
    # A publish after the connection broke: Celery's default spacing with our retries, or, under
    # Sentinel, spaced to outlast a failover (retry_policy).
    if url:
        backoff_retries = retry_policy(settings)[1]
        publish_retry_policy = {
            "max_retries": backoff_retries,
            "interval_start": 0,
            "interval_step": FAILOVER_BACKOFF_CAP / 2,
            "interval_max": FAILOVER_BACKOFF_CAP,
        }
    else:
        # Celery's default, with our count of retries: immediate, then 0.2 s apart. A message
        # published twice (the first reply lost) runs once: the worker's claim skips it.
        publish_retry_policy = {
            "max_retries": settings.redis_retries,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        }
    return BrokerSettings(
        url=settings.redis_url,
        transport_options={
            **sentinel,
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
        publish_retry_policy=publish_retry_policy,
        use_ssl=tls_options(settings) or None,
    )
