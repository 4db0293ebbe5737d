"""Redis locked down: TLS only (a CA this module makes, client certificates required) and the
service's own ACL user, with exactly the README's minimal ACL (every stack of the suite runs under
that ACL and fails on a denial, tests/integration/conftest.py; this one adds TLS). Over it the API,
the worker, Celery's broker and its remote control (what Flower and compose's health check use)
serve everything; and the password appears in no log, no /health, /metrics or error body, through
errors and a Redis outage."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks import keys
from tests.integration.conftest import Stack, running_stack
from tests.integration.helpers import rdb, sdk, wait_batch, wait_for, wait_response
from tests.processes import (
    ADMIN_PASSWORD,
    BIN,
    ROOT,
    SERVICE_PASSWORD,
    SERVICE_USER,
    start_redis,
    wait_healthy,
)
from tests.tls import CertAuthority

HI: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    return CertAuthority.make(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory, ca: CertAuthority) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("locked"), tls=ca) as stack:
        yield stack


@pytest.fixture(scope="module")
def bodies() -> list[str]:
    """Every HTTP response the module's tests got, headers and body, for the last test's grep."""
    return []


def answer(bodies: list[str], response: httpx.Response) -> httpx.Response:
    bodies.append(f"{response.status_code} {dict(response.headers)}\n{response.text}")
    return response


def stranger(stack: Stack, **options: object) -> redis.Redis:
    """A client of the stack's Redis that is not the tests' own, without retries."""
    host, port = stack.redis_url.rsplit("@", 1)[1].split("/")[0].split(":")
    return redis.Redis(host=host, port=int(port), retry=Retry(NoBackoff(), 0), socket_timeout=5, **options)  # type: ignore[arg-type]


def test_redis_takes_tls_with_a_client_certificate_and_the_user_only_what_the_acl_gives(
    locked: Stack, ca: CertAuthority
) -> None:
    assert locked.redis_url.startswith(f"rediss://{SERVICE_USER}:")
    with pytest.raises(redis.ConnectionError):  # TLS only: plain TCP gets no answer it can read
        stranger(locked, username=SERVICE_USER, password=SERVICE_PASSWORD).ping()
    with pytest.raises(redis.ConnectionError):  # no client certificate
        stranger(
            locked, ssl=True, ssl_ca_certs=str(ca.ca), username=SERVICE_USER, password=SERVICE_PASSWORD
        ).ping()
    service = stranger(
        locked, ssl=True, **ca.client_options(), username=SERVICE_USER, password=SERVICE_PASSWORD
    )
    assert service.ping()
    db = rdb(locked)

    # DRYRUN asks without logging a denial: under the prefix yes, elsewhere and beyond no.
    def dry(*command: str) -> str:
        return str(db.execute_command("ACL", "DRYRUN", SERVICE_USER, *command))

    assert dry("SET", f"{keys.PREFIX}x", "1") == "OK"
    assert dry("EVALSHA", "0" * 40, "1", keys.job("x")) == "OK"
    for command in (
        ("SET", "elsewhere", "1"),
        ("PUBLISH", "celeryev", "1"),
        ("KEYS", "*"),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CLIENT", "LIST"),
        ("ACL", "LIST"),
        ("SHUTDOWN",),
    ):
        assert "no permissions" in dry(*command), command
    assert db.acl_log() == []  # the worker's start (kombu's bindings and listeners) included


@pytest.mark.timeout(300)
def test_api_worker_and_broker_serve_everything_over_tls_as_the_acl_user(locked: Stack) -> None:
    client = sdk(locked, timeout=60)
    model = client.models.list().data[0].id

    blocking = client.chat.completions.create(model=model, messages=HI, max_tokens=4)
    assert blocking.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=model, messages=HI, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    background = client.responses.create(model=model, input="Hi", max_output_tokens=4, background=True)
    response = wait_response(client, background.id, timeout=120)
    assert response.status in ("completed", "incomplete"), response.error

    body = {"messages": HI, "max_tokens": 4}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    uploaded = client.files.create(file=("in.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_batch(client, batch.id, {"completed", "failed", "expired"})
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 1, batch

    # Remote control through celeryconfig, as Flower and compose's health check reach the
    # workers: a broadcast on a pub/sub channel, answered through a reply queue.
    ping = subprocess.run(
        [str(BIN / "celery"), "-A", "tasks", "inspect", "ping", "--timeout", "10"],
        cwd=ROOT,
        env={**os.environ, **locked.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ping.returncode == 0 and ": OK" in ping.stdout, ping.stdout + ping.stderr
    assert rdb(locked).acl_log() == []


# What Celery's broker connection (the workers', the API's task sends, Flower's) makes of the
# stack's Redis, in a process of its own configured by the environment as they are.
BROKER_PING = (
    "from tasks.celery_app import app\n"
    "with app.connection_for_write() as connection:\n"
    "    print('PONG' if connection.default_channel.client.ping() else 'no')\n"
)


def test_celerys_broker_checks_redis_certificate_against_the_ca_it_is_given(
    locked: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = CertAuthority.make(tmp_path_factory.mktemp("other-ca"))

    def broker_ping(ca_file: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **locked.env, "REDIS_TLS_CA_FILE": ca_file, "REDIS_CONNECT_TIMEOUT_SECONDS": "2"}
        command = [str(BIN / "python"), "-c", BROKER_PING]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    trusted = broker_ping(locked.env["REDIS_TLS_CA_FILE"])
    assert trusted.returncode == 0 and "PONG" in trusted.stdout, trusted.stderr
    # kombu left to itself takes a rediss:// URL with certificate checks off.
    refused = broker_ping(str(other.ca))
    assert refused.returncode != 0 and "certificate verify failed" in refused.stderr, refused.stderr


@pytest.mark.timeout(300)
def test_no_log_and_no_response_shows_a_password_through_errors_and_an_outage(
    locked: Stack, ca: CertAuthority, bodies: list[str]
) -> None:
    http = httpx.Client(base_url=locked.api_url, timeout=60)
    chat = "/v1/chat/completions"
    model = http.get("/v1/models").json()["data"][0]["id"]
    answer(bodies, http.get("/health"))
    answer(bodies, http.get("/metrics"))
    assert answer(bodies, http.post(chat, json={"messages": HI, "max_tokens": 2})).status_code == 200
    with http.stream("POST", chat, json={"messages": HI, "max_tokens": 2, "stream": True}) as streamed:
        streamed.read()
        assert answer(bodies, streamed).status_code == 200
    assert answer(bodies, http.post(chat, json={"messages": "nope"})).status_code == 400
    assert answer(bodies, http.post(chat, json={"model": "nope", "messages": HI})).status_code == 404
    assert answer(bodies, http.get("/v1/responses/resp_nope")).status_code == 404

    # Redis goes away: every client meets connection errors, and says so in logs and answers.
    port = int(locked.redis_url.rsplit(":", 1)[1].split("/")[0])
    locked.redis.stop()
    assert answer(bodies, http.get("/health")).status_code == 503
    assert answer(bodies, http.post(chat, json={"model": model, "messages": HI})).status_code == 503
    with http.stream("POST", chat, json={"model": model, "messages": HI, "stream": True}) as streamed:
        streamed.read()
        answer(bodies, streamed)
    answer(bodies, http.get("/metrics"))
    answer(bodies, http.get("/v1/models"))
    # Long enough for the worker's heartbeat and kombu's reconnection to fail and log it.
    wait_for(lambda: "Cannot connect to" in locked.worker.log_path.read_text(), 60, "the worker to log it")

    # It comes back on the same port: everyone reconnects by themselves.
    locked.redis, _ = start_redis(locked.log_dir, port=port, tls=ca)
    wait_healthy(locked.api, locked.api_url, timeout=120)
    assert (
        answer(bodies, http.post(chat, json={"model": model, "messages": HI, "max_tokens": 2})).status_code
        == 200
    )

    logs = {path.name: path.read_text(errors="replace") for path in locked.log_dir.rglob("*.log")}
    assert {"api.log", "worker.log"} <= set(logs)
    for password in (SERVICE_PASSWORD, ADMIN_PASSWORD):
        assert [name for name, text in logs.items() if password in text] == []
        assert [body for body in bodies if password in body] == []
    # The URLs in the logs are there, their password masked (kombu), not the password itself.
    assert f"rediss://{SERVICE_USER}:**@" in logs["worker.log"]
