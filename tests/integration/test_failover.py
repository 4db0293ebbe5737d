"""Redis high availability: a master, one replica and three sentinels (tests/processes.py
start_replicated_redis), the API and a worker following them by a sentinel:// REDIS_URL. The
master is killed (SIGKILL) mid-traffic: streams running, jobs queued behind them, a batch in
progress. New requests are served again within the README's bound, every job that existed ends
in exactly one terminal state (a failure with a code that says why), every stream ends, none runs
twice, and the API and the worker follow the new master with no restart, also once the old
master is back as a replica. The job scripts meet the new master's empty script cache here too.

The 15 s bound is a hang detector (a failover that never completes, a client that never
re-asks the sentinels), not a performance figure: bench/failover.py measures the time to serve."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kombu
import openai
import pytest
import redis

from tasks import events, keys
from tasks.redis import async_client, broker, sync_client
from tasks.settings import Settings
from tests.integration.conftest import Stack
from tests.integration.helpers import TERMINAL, long_chat, sdk, wait_batch, wait_for
from tests.processes import (
    SERVICE_PASSWORD,
    ReplicatedRedis,
    Service,
    start_api,
    start_replicated_redis,
    start_worker,
    wait_healthy,
)
from tests.tls import CertAuthority

log = logging.getLogger(__name__)

SLOTS = 2
# The README's bound: a new request is served within this of the master's death.
SERVE_AGAIN_SECONDS = 15
# What the original master is configured with (docs/operations.md "Redis high availability"):
# it takes no write that no replica could have within 10 s.
MASTER_ARGS = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]
HI: list[Any] = [{"role": "user", "content": "Say hi."}]
MODEL = "SmolLM2-135M-Instruct"  # the default worker's (MODEL_ID's default)


@dataclass
class HaStack:
    ha: ReplicatedRedis
    stack: Stack  # the API and the worker; its redis_url is the sentinel URL
    services: list[Service] = field(default_factory=list)

    def admin(self) -> redis.Redis:
        """The test's admin client of the current master."""
        return self.ha.node(self.ha.master_port(), decode_responses=True)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaStack]:
    log_dir = tmp_path_factory.mktemp("failover")
    replicated = start_replicated_redis(log_dir, master_args=MASTER_ARGS)
    env = {
        **replicated.env(),
        "LOG_LEVEL": "INFO",
        "WORKER_SLOTS": str(SLOTS),
        "STREAM_PING_SECONDS": "1",
        # A job's admit, claim and end wait for the replica, briefly: after the failover the
        # new master has none until the old one is back, and the service must go on.
        "REDIS_WAIT_REPLICAS": "1",
        "REDIS_WAIT_TIMEOUT_MS": "200",
        "BROKER_VISIBILITY_TIMEOUT_SECONDS": "10",
    }
    services: list[Service] = []
    try:
        worker = start_worker(env, log_dir)
        services.append(worker)
        api, api_url = start_api(env, log_dir)
        services.append(api)
        wait_healthy(worker, api_url, timeout=300)
        # Stack's `redis` is the first master; tests kill and restart nodes through `ha`.
        stack = Stack(
            replicated.url, api_url, env, log_dir, worker, api, replicated.nodes[replicated.master_port()]
        )
        yield HaStack(replicated, stack, services)
    finally:
        for svc in reversed(services):
            svc.stop()
        replicated.stop()


def stream(client: openai.OpenAI, outcome: dict[str, Any], **body: Any) -> None:
    """One streamed chat completion to its end: its text and how it ended (or what raised)."""
    try:
        text, finish = "", None
        request = long_chat(stream=True, **body)
        extra = {"ignore_eos": request.pop("ignore_eos")}
        for chunk in client.chat.completions.create(model=MODEL, **request, extra_body=extra):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        outcome.update(text=text, finish=finish)
    except openai.APIError as exc:  # an in-band error after the stream started, or a refusal
        outcome.update(error=getattr(exc, "code", None) or type(exc).__name__)
    except Exception as exc:  # anything else is the test's failure, reported by the outcome check
        outcome.update(unexpected=repr(exc))


def blocking(client: openai.OpenAI, outcome: dict[str, Any]) -> None:
    try:
        done = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
        outcome.update(finish=done.choices[0].finish_reason)
    except openai.APIError as exc:
        outcome.update(error=getattr(exc, "code", None) or type(exc).__name__)


def job_ids(db: redis.Redis) -> list[str]:
    prefix = keys.job("")
    return [k.removeprefix(prefix) for k in db.scan_iter(f"{prefix}*") if ":" not in k.removeprefix(prefix)]


def start_batch(client: openai.OpenAI, lines: int) -> str:
    body = {"messages": HI, "max_tokens": 8, "temperature": 0}
    text = "".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        + "\n"
        for i in range(lines)
    )
    upload = client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def serve_again(api_url: str, since: float) -> float:
    """Seconds from `since` until a new streamed chat completion is taken (200, the job admitted
    and enqueued; it then waits its turn behind the queued traffic, which is not the failover's
    time), each try bounded."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, "stream": True}
    while True:
        try:
            with httpx.stream(
                "POST", f"{api_url}/v1/chat/completions", json=body, timeout=SERVE_AGAIN_SECONDS
            ) as r:
                if r.status_code == 200:
                    return time.monotonic() - since
        except httpx.HTTPError:
            pass
        if time.monotonic() - since > SERVE_AGAIN_SECONDS * 4:
            raise AssertionError("no request was taken after the failover")
        time.sleep(0.1)


def test_a_killed_master_is_failed_over_under_traffic_and_every_job_ends_once(ha: HaStack) -> None:
    stack = ha.stack
    client = sdk(stack, timeout=120)
    first_master = ha.ha.master_port()

    # Traffic: streams on both slots, jobs queued behind them, a batch waiting behind those.
    streams = [{} for _ in range(SLOTS)]  # type: list[dict[str, Any]]
    waiting = [{} for _ in range(3)]  # type: list[dict[str, Any]]
    threads = [threading.Thread(target=stream, args=(client, o), kwargs={"max_tokens": 120}) for o in streams]
    threads += [threading.Thread(target=blocking, args=(client, o)) for o in waiting]
    for t in threads[:SLOTS]:
        t.start()
    wait_for(lambda: ha.admin().scard(keys.RUNNING) >= SLOTS, 60, "both slots generating")
    for t in threads[SLOTS:]:
        t.start()
    batch_id = start_batch(client, 3)
    wait_for(lambda: len(job_ids(ha.admin())) >= 2 * SLOTS + 3, 30, "every job admitted")

    # Kill the master, then measure how long until a new request is served.
    ha.ha.nodes[first_master].stop(signal.SIGKILL)
    killed = time.monotonic()
    served_after = serve_again(stack.api_url, killed)
    log.warning("failover: a new request was served %.1f s after the master was killed", served_after)
    new_master = ha.ha.master_port()
    assert new_master != first_master
    assert served_after < SERVE_AGAIN_SECONDS

    # Every request and stream ends: finished, or an error with a code.
    for t in threads:
        t.join(timeout=180)
        assert not t.is_alive(), "a request never ended"
    for outcome in [*streams, *waiting]:
        assert outcome.get("finish") or outcome.get("error"), outcome
    log.warning(
        "failover: streams ended %s, queued requests %s",
        [o.get("finish") or o.get("error") for o in streams],
        [o.get("finish") or o.get("error") for o in waiting],
    )
    batch = wait_batch(client, batch_id, {"completed", "failed", "expired", "cancelled"}, timeout=180)
    assert batch.status == "completed" and batch.request_counts.total == 3

    # Every job that exists ends in exactly one terminal state, and ran at most once.
    db = ha.admin()
    for job_id in job_ids(db):
        record = wait_for(
            lambda j=job_id: (r := db.hgetall(keys.job(j))).get("status") in TERMINAL and r,  # type: ignore[misc]
            60,
            f"job {job_id} to end",
        )
        log_ = [events.decode(i, p) for i, p in enumerate(db.lrange(keys.job_log(job_id), 0, -1))]
        assert sum(events.is_terminal(e) for e in log_) == 1 and events.is_terminal(log_[-1]), (job_id, log_)
        assert sum(isinstance(e, events.Started) for e in log_) <= 1, (job_id, log_)
        if record["status"] == "failed":
            assert record.get("error_code"), record
    worker_log = stack.worker.log_path.read_text(errors="replace")
    for job_id in job_ids(db):
        assert worker_log.count(f"[{job_id}] generating") <= 1, job_id

    # The old master comes back (as a replica of the new one): the service keeps serving.
    ha.ha.start_node(first_master, new_master)
    ha.ha.wait_replicated(new_master)
    assert ha.ha.node(first_master, decode_responses=True).info("replication")["role"] == "slave"
    for _ in range(3):
        assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4).choices
    assert httpx.get(f"{stack.api_url}/health", timeout=10).status_code == 200

    # Nothing the service sent was refused by an ACL, and its password stayed out of the logs.
    for port in ha.ha.nodes:
        assert ha.ha.node(port).acl_log() == [], port
    for svc in (stack.api, stack.worker):
        assert SERVICE_PASSWORD not in svc.log_path.read_text(errors="replace")


def test_job_scripts_survive_a_new_masters_empty_script_cache(ha: HaStack) -> None:
    """As after a failover to a replica that never loaded them: NOSCRIPT, loaded, run again."""
    client = sdk(ha.stack)
    ha.admin().script_flush()
    done = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)
    assert done.choices[0].finish_reason in ("stop", "length")
    ha.admin().script_flush()
    text = ""
    request = long_chat(max_tokens=16)
    extra = {"ignore_eos": request.pop("ignore_eos")}
    for chunk in client.chat.completions.create(model=MODEL, **request, extra_body=extra):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text


def test_the_sentinels_refused_the_service_nothing(ha: HaStack) -> None:
    for port in ha.ha.sentinels:
        assert ha.ha.sentinel(port).acl_log() == [], port


def settings_for(replicated: ReplicatedRedis) -> Settings:
    env = replicated.env()
    return Settings(  # type: ignore[call-arg]
        **{name.lower(): value for name, value in env.items()}, redis_failover_seconds=SERVE_AGAIN_SECONDS
    )


def test_over_tls_the_clients_and_the_broker_follow_a_failover(tmp_path: Path) -> None:
    """Sentinels and data nodes on TLS only, with the test CA's certificates (IP SANs: the
    sentinels name the master by address); the service's clients and Celery's broker are
    built as the service builds them (tasks/redis.py)."""
    ca = CertAuthority.make(tmp_path / "ca")
    replicated = start_replicated_redis(tmp_path, tls=ca)
    try:
        settings = settings_for(replicated)
        client = sync_client(settings, name="llmq-test")
        client.set(f"{keys.PREFIX}tls", "before")
        b = broker(settings)
        with kombu.Connection(b.url, transport_options=b.transport_options, ssl=b.use_ssl) as conn:
            queue = conn.SimpleQueue("failover-tls")
            queue.put({"n": 1})
            master = replicated.master_port()
            replicated.wait_replicated(master)
            client.execute_command("WAIT", 1, 1000)
            replicated.nodes[master].stop(signal.SIGKILL)
            client.set(f"{keys.PREFIX}tls", "after")  # retried until the new master answers
            assert replicated.master_port() != master
            queue.put({"n": 2})  # kombu asks the sentinels again
            assert [queue.get(timeout=10).payload["n"] for _ in range(2)] == [1, 2]
            queue.close()

        async def read() -> str | None:
            aclient = async_client(settings, name="llmq-test-async")
            try:
                return await aclient.get(f"{keys.PREFIX}tls")  # type: ignore[no-any-return]
            finally:
                await aclient.aclose()

        assert asyncio.run(read()) == "after"
        for port, svc in replicated.nodes.items():
            if svc.proc.poll() is None:
                assert replicated.node(port).acl_log() == [], port
    finally:
        replicated.stop()
