"""The Redis factory turns one configuration into every client and the broker's options, and
every key name the service builds lies under one prefix. Clients are built, never connected."""

from __future__ import annotations

import inspect
import socket
import ssl
from pathlib import Path

import pytest

from tasks import keys
from tasks.redis import (
    FAILOVER_BACKOFF_BASE,
    FAILOVER_BACKOFF_CAP,
    LARGE_VALUE_TIMEOUT_SECONDS,
    SentinelUrl,
    UnsupportedRedisUrl,
    async_client,
    broker,
    failover_retries,
    sentinel_url,
    sync_client,
    tls_options,
)
from tasks.settings import Settings

# Names in tasks/keys.py that are not Redis keys: Celery's own names (kombu prefixes a queue's
# list itself, see generate_list), the prefix's parts, a priority and the ACL.
NOT_KEYS = {
    "NAMESPACE",
    "PREFIX",
    "GENERATE_QUEUE",
    "GENERATE_TASK",
    "BATCH_PRIORITY",
    "generate_queue",
    "ACL_COMMANDS",
    "acl_rules",
    "redis_server_args",
    "DEFAULT_USER_OFF",
    "TIERS",  # the fair index's tiers and its owner without API_KEYS: parts of keys
    "NO_OWNER",
    "PRIORITY_SEP",  # kombu's separator of a priority list's name, and the lists of one queue
    "generate_lists",
    "SENTINEL_ACL_COMMANDS",  # the sentinels' ACL, not keys
    "sentinel_acl_rules",
}


def configured(**fields: object) -> Settings:
    base: dict[str, object] = {
        "redis_url": "redis://alice:s%40cret@redis.internal:6380/2",
        "redis_connect_timeout_seconds": 2.5,
        "redis_timeout_seconds": 7.0,
        "redis_retries": 3,
    }
    return Settings(**{**base, **fields})  # type: ignore[arg-type]


def test_sync_and_async_clients_share_the_configuration() -> None:
    settings = configured()
    for client in (sync_client(settings, name="w"), async_client(settings, name="a")):
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.internal", 6380, 2)
        assert (kwargs["username"], kwargs["password"]) == ("alice", "s@cret")  # an ACL user
        assert kwargs["socket_connect_timeout"] == 2.5
        assert kwargs["socket_timeout"] == 7.0
        assert kwargs["retry"].get_retries() == 3
        assert kwargs["health_check_interval"] > 0


def test_the_file_client_waits_longer_but_never_shorter() -> None:
    short = async_client(configured(), name="f", decode_responses=False, large_values=True)
    assert short.connection_pool.connection_kwargs["socket_timeout"] == LARGE_VALUE_TIMEOUT_SECONDS
    assert short.connection_pool.connection_kwargs["decode_responses"] is False
    patient = configured(redis_timeout_seconds=LARGE_VALUE_TIMEOUT_SECONDS * 2)
    long = async_client(patient, name="f", large_values=True)
    assert long.connection_pool.connection_kwargs["socket_timeout"] == LARGE_VALUE_TIMEOUT_SECONDS * 2


def test_tls_url_gives_a_tls_connection() -> None:
    client = sync_client(configured(redis_url="rediss://redis.internal:6380/0"), name="w")
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"


@pytest.mark.parametrize(
    "url",
    [
        "http://redis",
        "127.0.0.1:6379",
        "sentinel://s1:26379;redis://s2:6379",  # every part is a sentinel
        "sentinel://s1:26379;sentinel://u:p@s2:26379",  # credentials in the first part only
        "sentinel://s1:26379/x",
        "sentinel://s1:port",
    ],
)
def test_a_url_no_client_can_use_is_refused_by_name(url: str) -> None:
    settings = configured(redis_url=url)
    with pytest.raises(UnsupportedRedisUrl, match="REDIS_URL"):
        sync_client(settings, name="w")
    with pytest.raises(UnsupportedRedisUrl, match="REDIS_URL"):
        broker(settings)


def test_broker_is_bounded_prefixed_and_retries_as_configured() -> None:
    settings = configured()
    b = broker(settings)
    assert b.url == settings.redis_url
    options = b.transport_options
    assert options["global_keyprefix"] == keys.PREFIX
    assert (options["socket_connect_timeout"], options["socket_timeout"]) == (2.5, 7.0)
    assert b.publish_retry_policy["max_retries"] == 3


def test_celery_takes_the_factorys_broker_settings() -> None:
    import celeryconfig

    b = broker(celeryconfig.settings)
    assert celeryconfig.broker_url == b.url
    assert celeryconfig.broker_transport_options.items() >= b.transport_options.items()
    assert celeryconfig.task_publish_retry_policy == b.publish_retry_policy
    assert celeryconfig.broker_use_ssl == b.use_ssl


def test_every_key_name_lies_under_the_prefix() -> None:
    names = {n: v for n, v in vars(keys).items() if n.isupper() and n not in NOT_KEYS}
    assert names, "no key constants found"
    for name, value in names.items():
        assert isinstance(value, str) and value.startswith(keys.PREFIX), (name, value)
    builders = [
        f
        for n, f in vars(keys).items()
        if inspect.isfunction(f) and f.__module__ == keys.__name__ and n not in NOT_KEYS
    ]
    assert builders, "no key builders found"
    for build in builders:
        arguments = ["x"] * len(inspect.signature(build).parameters)
        assert build(*arguments).startswith(keys.PREFIX), build.__name__
    assert keys.PREFIX.startswith(keys.NAMESPACE)
    assert all(name.startswith(keys.PREFIX) for name in keys.generate_lists("x"))


# --- TLS, a vanished Redis, the ACL ----------------------------------------------------------


def test_tls_settings_reach_every_client_and_the_broker(tmp_path: Path) -> None:
    files = {f: tmp_path / f"{f}.pem" for f in ("ca", "cert", "key")}
    settings = configured(
        redis_url="rediss://llmq:pw@redis.internal:6380/0",
        redis_tls_ca_file=files["ca"],
        redis_tls_cert_file=files["cert"],
        redis_tls_key_file=files["key"],
    )
    expected = {
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": str(files["ca"]),
        "ssl_certfile": str(files["cert"]),
        "ssl_keyfile": str(files["key"]),
    }
    for client in (sync_client(settings, name="w"), async_client(settings, name="a")):
        assert client.connection_pool.connection_kwargs.items() >= expected.items()
    # kombu takes a rediss:// URL without broker_use_ssl with certificate checks off.
    assert broker(settings).use_ssl == expected


def test_a_rediss_url_alone_checks_the_certificate_against_the_system_cas() -> None:
    settings = configured(redis_url="rediss://redis.internal:6380/0")
    assert tls_options(settings) == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker(settings).use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_tls_files_without_a_rediss_url_are_refused(tmp_path: Path) -> None:
    settings = configured(redis_tls_ca_file=tmp_path / "ca.pem")
    with pytest.raises(UnsupportedRedisUrl, match="rediss://"):
        sync_client(settings, name="w")
    assert broker(configured()).use_ssl is None


def test_tls_files_set_empty_are_no_files(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_TLS_CA_FILE", "REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"):
        monkeypatch.setenv(name, "")  # as compose passes on a variable left empty in .env
    settings = Settings(redis_url="redis://127.0.0.1:6379/0")  # type: ignore[call-arg]
    assert (settings.redis_tls_ca_file, settings.redis_tls_cert_file, settings.redis_tls_key_file) == (
        None,
        None,
        None,
    )
    assert tls_options(settings) == {}


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="TCP_USER_TIMEOUT is Linux's")
def test_a_silent_peer_is_given_up_after_the_connect_timeout_except_by_the_files_client() -> None:
    settings = configured()  # connect 2.5 s, reply 7 s
    for client in (sync_client(settings, name="w"), async_client(settings, name="a")):
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_keepalive"] is True
        assert kwargs["socket_keepalive_options"][socket.TCP_USER_TIMEOUT] == 2500
    files = async_client(settings, name="f", large_values=True).connection_pool.connection_kwargs
    assert files["socket_keepalive_options"][socket.TCP_USER_TIMEOUT] == LARGE_VALUE_TIMEOUT_SECONDS * 1000
    options = broker(settings).transport_options
    assert options["socket_keepalive_options"][socket.TCP_USER_TIMEOUT] == 2500


def test_a_unix_socket_gets_no_tcp_options() -> None:
    client = sync_client(configured(redis_url="unix:///run/redis.sock"), name="w")
    assert "socket_keepalive_options" not in client.connection_pool.connection_kwargs


def test_the_acl_names_the_prefix_and_commands_not_categories() -> None:
    rules = keys.acl_rules(db=3)
    assert rules[:2] == ["resetkeys", "resetchannels"]
    assert {r for r in rules if r[0] in "~&"} == {
        "~llmq:*",
        "&llmq:*",
        "&llmq:/3.celeryev",
        "&llmq:/3.celery.pidbox",
    }
    assert "-@all" in rules and not [r for r in rules if r.startswith("+@")]
    granted = [r[1:] for r in rules if r.startswith("+")]
    assert granted == [*keys.ACL_COMMANDS, "client|setinfo"] and len(set(granted)) == len(granted)
    assert "+client|setinfo" not in keys.acl_rules(client_setinfo=False)  # Redis 7.0 and 7.1
    # Nothing that reaches beyond one's own keys or changes the server.
    assert not {"keys", "scan", "flushdb", "flushall", "config", "debug", "acl", "shutdown"} & set(granted)


def test_make_runs_redis_with_the_urls_user_and_the_acl() -> None:
    args = keys.redis_server_args("redis://llmq:p%40ss@127.0.0.1:6390/2", client_setinfo=False)
    assert args == [
        *keys.DEFAULT_USER_OFF, "--user", "llmq", "on", ">p@ss", *keys.acl_rules(2, client_setinfo=False)
    ]  # fmt: skip
    assert keys.redis_server_args("redis://:secret@127.0.0.1:6390/0") == ["--requirepass", "secret"]
    assert keys.redis_server_args("redis://127.0.0.1:6390/0") == []


# --- Sentinel ----------------------------------------------------------------------------------

SENTINELS = "sentinel://llmq:s%40cret@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


def test_a_sentinel_url_is_read_as_kombu_reads_it() -> None:
    assert sentinel_url(SENTINELS) == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)),
        username="llmq",
        password="s@cret",
        db=2,
    )
    assert sentinel_url("sentinel://10.0.0.1") == SentinelUrl((("10.0.0.1", 26379),), None, None, 0)
    assert sentinel_url("redis://10.0.0.1:6379/0") is None


def sentinel_settings(**fields: object) -> Settings:
    return configured(redis_url=SENTINELS, redis_sentinel_master="queue", **fields)


def test_every_client_asks_the_sentinels_for_the_master_with_the_urls_credentials() -> None:
    settings = sentinel_settings(redis_sentinel_username="watcher", redis_sentinel_password="w-pass")
    for client in (sync_client(settings, name="w"), async_client(settings, name="a")):
        pool = client.connection_pool
        assert pool.service_name == "queue" and pool.is_master
        assert pool.connection_class.__name__ == "SentinelManagedConnection"
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("llmq", "s@cret", 2)
        assert (kwargs["socket_connect_timeout"], kwargs["socket_timeout"]) == (2.5, 7.0)
        # The sentinels are asked with their own credentials, never the data nodes'.
        manager = pool.sentinel_manager
        assert [s.connection_pool.connection_kwargs["port"] for s in manager.sentinels] == [
            26379,
            26379,
            26380,
        ]
        for sentinel in manager.sentinels:
            sentinel_kwargs = sentinel.connection_pool.connection_kwargs
            assert (sentinel_kwargs["username"], sentinel_kwargs["password"]) == ("watcher", "w-pass")
            assert sentinel_kwargs["socket_connect_timeout"] == 2.5
        assert manager.min_other_sentinels == 1  # a sentinel cut off from the others is not believed


def test_one_sentinel_per_process_and_kind_serves_every_client() -> None:
    settings = sentinel_settings()
    first, second = sync_client(settings, name="w"), sync_client(settings, name="x")
    assert first.connection_pool.sentinel_manager is second.connection_pool.sentinel_manager
    a, b = async_client(settings, name="a"), async_client(settings, name="f", large_values=True)
    assert a.connection_pool.sentinel_manager is b.connection_pool.sentinel_manager
    assert a.connection_pool.sentinel_manager is not first.connection_pool.sentinel_manager


def test_sentinels_without_credentials_get_none() -> None:
    pool = sync_client(sentinel_settings(), name="w").connection_pool
    for sentinel in pool.sentinel_manager.sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        assert kwargs.get("username") is None and kwargs.get("password") is None


def test_calls_retry_through_a_failover_under_sentinel_only() -> None:
    retry = sync_client(
        sentinel_settings(redis_failover_seconds=15), name="w"
    ).connection_pool.connection_kwargs["retry"]
    assert retry.get_retries() == failover_retries(15)
    # The longest the backoff can wait in all is about the setting, never much more.
    most = sum(
        min(FAILOVER_BACKOFF_CAP, FAILOVER_BACKOFF_BASE * 2**k) for k in range(1, retry.get_retries() + 1)
    )
    assert 15 <= most < 15 + FAILOVER_BACKOFF_CAP
    assert type(retry._backoff).__name__ == "ExponentialWithJitterBackoff"
    plain = sync_client(configured(), name="w").connection_pool.connection_kwargs["retry"]
    assert plain.get_retries() == 3 and type(plain._backoff).__name__ == "NoBackoff"  # fast 503 kept


def test_celery_follows_the_sentinels() -> None:
    settings = sentinel_settings(redis_sentinel_password="w-pass")
    b = broker(settings)
    assert b.url == SENTINELS  # kombu reads the sentinels, credentials and database from it
    options = b.transport_options
    assert options["master_name"] == "queue" and options["min_other_sentinels"] == 1
    assert options["sentinel_kwargs"]["password"] == "w-pass" and "username" not in options["sentinel_kwargs"]
    assert options["sentinel_kwargs"]["socket_connect_timeout"] == 2.5
    assert options["global_keyprefix"] == keys.PREFIX
    assert b.publish_retry_policy["max_retries"] == failover_retries(settings.redis_failover_seconds)
    assert b.use_ssl is None
    assert "master_name" not in broker(configured()).transport_options


def test_celery_retries_a_channel_error_as_a_demoted_master_answers_readonly() -> None:
    import celeryconfig

    assert celeryconfig.broker_channel_error_retry is True


def test_sentinel_tls_reaches_the_sentinels_the_data_nodes_and_the_broker(tmp_path: Path) -> None:
    settings = sentinel_settings(redis_sentinel_tls=True, redis_tls_ca_file=tmp_path / "ca.pem")
    expected = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(tmp_path / "ca.pem")}
    for client in (sync_client(settings, name="w"), async_client(settings, name="a")):
        pool = client.connection_pool
        assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
        assert pool.connection_kwargs.items() >= expected.items()
        for sentinel in pool.sentinel_manager.sentinels:
            assert sentinel.connection_pool.connection_class.__name__ == "SSLConnection"
            assert sentinel.connection_pool.connection_kwargs.items() >= expected.items()
    b = broker(settings)
    assert b.use_ssl == expected  # the data nodes, through kombu's SentinelManagedSSLConnection
    assert b.transport_options["sentinel_kwargs"].items() >= {"ssl": True, **expected}.items()


def test_sentinel_tls_is_refused_without_a_sentinel_url_and_files_without_it(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedRedisUrl, match="REDIS_SENTINEL_TLS"):
        sync_client(configured(redis_sentinel_tls=True), name="w")
    with pytest.raises(UnsupportedRedisUrl, match="REDIS_SENTINEL_TLS"):
        broker(sentinel_settings(redis_tls_ca_file=tmp_path / "ca.pem"))


def test_the_sentinels_acl_is_their_own_and_narrow() -> None:
    rules = keys.sentinel_acl_rules()
    assert "+sentinel|masters" in rules and "-@all" in rules
    assert not [r for r in rules if r[0] in "~&" or r.startswith("+@") or r == "allchannels"]
    assert "wait" in keys.ACL_COMMANDS  # REDIS_WAIT_REPLICAS, on the data nodes


def test_the_readmes_acl_is_the_one_the_service_needs() -> None:
    # README, "Redis: locked down ...": the ACL SETUSER block operators copy, rule for rule.
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    block = readme.split("ACL SETUSER llmq on >YOUR-PASSWORD", 1)[1].split("ACL SETUSER default off", 1)[0]
    assert block.split() == keys.acl_rules(db=0)
    sentinel_line = readme.split("The service's user on a sentinel\nneeds only `", 1)[1].split("`", 1)[0]
    assert sentinel_line.split() == keys.sentinel_acl_rules()


def test_a_wait_longer_than_half_a_reply_is_refused_at_start() -> None:
    # WAIT shares its round trip with the writes: past the reply timeout a retry would resend them.
    with pytest.raises(ValueError, match="REDIS_WAIT_TIMEOUT_MS"):
        configured(redis_wait_replicas=1, redis_wait_timeout_ms=5000, redis_timeout_seconds=10)
    assert configured(redis_wait_replicas=1, redis_wait_timeout_ms=4000, redis_timeout_seconds=10)
    assert configured(redis_wait_replicas=0, redis_wait_timeout_ms=60_000)  # off: not checked
