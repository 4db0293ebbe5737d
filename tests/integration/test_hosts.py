"""The service across host boundaries: Redis, two API hosts and two worker hosts, each in its own
network namespace with its own address (tests/netns.py), sharing nothing but the network.

    redis      redis-server bound to its LAN address only, protected mode on, its default user
               off: only the ACL user `llmq` (the README's minimal ACL), with the password
               REDIS_URL carries, and the tests' admin user get in
    api-a/b    uvicorn on their own addresses; the tests reach them over the LAN as any client
    worker-a/b the embedded SmolLM2, each with its own HOME and model cache (converted on start)

Every host process runs as PID 1 of its own PID namespace while all keep this machine's host name,
so nothing may tell hosts apart by host name or process id. The faults are a host's worker killed
(kill -9), its cable pulled (`ip link set ... down`) and back, and SIGTERM (drain); a Batch API
batch outlives the API host that drove it. Every test checks that no job ended twice.

Time bounds here detect hangs; they are not performance figures. Needs root (network and PID
namespaces) and iproute2: without them it skips saying so, and fails under CI (tests/needs.py).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks import events, keys
from tests import needs, netns
from tests.integration.conftest import Stack, assert_no_denials, ready_workers
from tests.integration.helpers import (
    LONG_PROMPT,
    job_events,
    rdb,
    record,
    sdk,
    start_long_response,
    wait_batch,
    wait_for,
    wait_records,
)
from tests.processes import SERVICE_USER, Service, start_api, start_redis, start_worker

pytestmark = pytest.mark.slow

APIS = ("api-a", "api-b")
WORKERS = ("worker-a", "worker-b")
REDIS_PORT, API_PORT = 6379, 8000  # every host has its own ports: the defaults, as on real ones
LEASE_SECONDS = 3  # JOB_LEASE_SECONDS: a dead or cut-off worker's job ends within lease + reaper (5 s)
# README "Redis": a Redis that is down or cut off is answered 503 within REDIS_CONNECT_TIMEOUT_SECONDS
# x (REDIS_RETRIES + 1) plus one TCP retransmission interval: 3 s with the defaults (1 s, 1 retry).
REDIS_GONE_BOUND_SECONDS = 3.0
GRACE_SECONDS = 2  # SHUTDOWN_GRACE_SECONDS
SETTINGS = {
    "LOG_LEVEL": "INFO",
    "REQUEST_TIMEOUT_SECONDS": "120",
    "STREAM_PING_SECONDS": "1",
    "JOB_LEASE_SECONDS": str(LEASE_SECONDS),
    "SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
    # A message whose worker was lost comes back within a test (its claim then refuses it).
    "BROKER_VISIBILITY_TIMEOUT_SECONDS": "5",
    # Two workers share this machine's cores: one compute thread and one slot each.
    "COMPUTE_THREADS": "1",
    "WORKER_SLOTS": "1",
}
HI: Any = [{"role": "user", "content": "Say hello."}]


@dataclass
class Hosts:
    """The running hosts: which service runs where, and how the tests reach each API host."""

    network: netns.Network
    log_dir: Path
    redis_url: str
    redis: Service
    apis: dict[str, tuple[Service, str]] = field(default_factory=dict)
    workers: dict[str, Service] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)  # by role: a restart logs to a new file

    def _log_name(self, role: str) -> str:
        self.starts[role] = self.starts.get(role, 0) + 1
        return role if self.starts[role] == 1 else f"{role}-{self.starts[role]}"

    def env(self, role: str) -> dict[str, str]:
        """The settings every host shares, and a home of its own: no cache or file is shared."""
        home = self.log_dir / role
        for sub in ("cache", "tmp"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        return {
            **SETTINGS,
            "REDIS_URL": self.redis_url,
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / "cache"),
            "HF_HOME": str(home / "cache" / "huggingface"),
            "MODEL_CACHE_DIR": str(home / "cache" / "models"),
            "TMPDIR": str(home / "tmp"),
        }

    def start_api(self, role: str) -> None:
        self.apis[role] = start_api(
            self.env(role),
            self.log_dir,
            name=self._log_name(role),
            host=self.network.addresses[role],
            port=API_PORT,
            prefix=self.network.prefix(role),
        )

    def start_worker(self, role: str) -> None:
        self.workers[role] = start_worker(
            self.env(role), self.log_dir, name=self._log_name(role), prefix=self.network.prefix(role)
        )

    def stack(self, api: str = "api-a") -> Stack:
        """The view of one API host that the shared helpers (sdk, rdb, ready_workers) take."""
        svc, url = self.apis[api]
        return Stack(
            self.redis_url, url, self.env(api), self.log_dir, self.workers["worker-a"], svc, self.redis
        )

    def client(self, api: str) -> openai.OpenAI:
        return sdk(self.stack(api), timeout=60)

    def worker_name(self, role: str) -> str:
        """The name the worker on `role`'s host announced once ready (its log is this start's)."""

        def announced() -> str | None:
            names = re.findall(
                r"worker (\S+) ready: ", self.workers[role].log_path.read_text(errors="replace")
            )
            return names[-1] if names else None

        return wait_for(announced, 300, f"{role} to announce itself", every=0.2)

    def role_of(self, worker: str) -> str:
        return next(role for role in WORKERS if self.worker_name(role) == worker)

    def wait_ready(self) -> None:
        """Every API host up and every worker host's worker ready on each."""
        names = {self.worker_name(role) for role in WORKERS}
        for api, (svc, _) in self.apis.items():
            svc.wait_until(lambda api=api: names <= ready_workers(self.stack(api)), timeout=300)

    def stop_all(self) -> None:
        for svc in [*self.workers.values(), *(svc for svc, _ in self.apis.values()), self.redis]:
            svc.stop()


def alive(svc: Service) -> bool:
    return svc.proc.poll() is None


@pytest.fixture(scope="module")
def namespaces() -> None:
    """This machine can make hosts (root, iproute2), or the module skips saying why."""
    if reason := netns.unavailable():
        needs.missing("network namespaces", f"{reason}; .ci/run installs iproute2 and runs as root")


@pytest.fixture(scope="module")
def hosts(namespaces: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    if shutil.which("redis-server") is None:
        needs.missing("redis-server", "apt-get install redis-server; .ci/run installs it")
    log_dir = tmp_path_factory.mktemp("hosts")
    with netns.Network(["redis", *APIS, *WORKERS]) as network:
        redis_svc, redis_url = start_redis(
            log_dir,
            port=REDIS_PORT,
            args=["--protected-mode", "yes"],
            host=network.addresses["redis"],
            prefix=network.prefix("redis"),
        )  # locked: the service's ACL user and the tests' admin (tests/processes.py)
        running = Hosts(network, log_dir, redis_url, redis_svc)
        try:
            for role in WORKERS:  # both convert their model's tokenizer at once, while the APIs start
                running.start_worker(role)
            for role in APIS:
                running.start_api(role)
            running.wait_ready()
            yield running
            assert_no_denials(redis_url)
        finally:
            running.stop_all()


@pytest.fixture(autouse=True)
def whole(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test on the hosts starts with every host up, whatever the last one stopped or cut,
    and ends with no job ended twice."""
    if "hosts" not in request.fixturenames:
        yield
        return
    hosts: Hosts = request.getfixturevalue("hosts")
    for role in WORKERS:
        hosts.network.link(role, up=True)
        if not alive(hosts.workers[role]):
            hosts.workers[role].stop()
            hosts.start_worker(role)
    for role in APIS:
        if not alive(hosts.apis[role][0]):
            hosts.apis[role][0].stop()
            hosts.start_api(role)
    hosts.wait_ready()
    yield
    assert ended_twice(hosts) == []


def ended_twice(hosts: Hosts) -> list[str]:
    """Jobs with more than one entry in the stream of endings (each ending is recorded there
    once, by the script that ends the job)."""
    seen: dict[str, int] = {}
    for _, entry in rdb(hosts.stack()).xrange(keys.ENDED):
        seen[entry["id"]] = seen.get(entry["id"], 0) + 1
    return sorted(job for job, count in seen.items() if count > 1)


def terminal_events(hosts: Hosts, job_id: str) -> int:
    return sum(events.is_terminal(e) for e in job_events(hosts.stack(), job_id))


def generating(client: openai.OpenAI, job_id: str) -> None:
    wait_for(
        lambda: (r := client.responses.retrieve(job_id)).status == "in_progress" and r.output_text,
        60,
        f"{job_id} to be generating",
    )


def worker_of(hosts: Hosts, job_id: str) -> str:
    return record(hosts.stack(), job_id)["worker"]


@dataclass(frozen=True)
class Victim:
    """A long job generating on one worker host: that host's worker (its Redis name and role)
    and the other worker's role."""

    job_id: str
    name: str
    role: str
    other: str


def long_job_on_one_worker(hosts: Hosts, client: openai.OpenAI) -> Victim:
    job_id = start_long_response(client)
    generating(client, job_id)
    name = worker_of(hosts, job_id)
    role = hosts.role_of(name)
    return Victim(job_id, name, role, next(r for r in WORKERS if r != role))


def short_chat(client: openai.OpenAI, model: str) -> str:
    """A short chat completion's id (its job's id): answered, by whichever worker is free."""
    answer = client.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    return answer.id


@pytest.fixture(scope="module")
def model(hosts: Hosts) -> str:
    return hosts.client("api-a").models.list().data[0].id


# --- the LAN itself --------------------------------------------------------------------------


def test_a_network_leaves_nothing_behind_even_when_its_block_fails(namespaces: None) -> None:
    with pytest.raises(RuntimeError, match="a failing test"), netns.Network(["one", "two"]) as network:
        assert len(network.leftovers()) == 4  # two hosts, the switch's namespace, our veth end
        raise RuntimeError("a failing test")
    assert network.leftovers() == []


def test_redis_answers_on_its_lan_address_only_and_only_with_the_password(hosts: Hosts) -> None:
    address = hosts.network.addresses["redis"]
    for user, password in ((None, None), (SERVICE_USER, "wrong"), ("default", None)):
        # No retries: redis-py retries an AuthenticationError (a ConnectionError) with backoff.
        stranger = redis.Redis(
            host=address, port=REDIS_PORT, username=user, password=password, retry=Retry(NoBackoff(), 0)
        )
        with pytest.raises(redis.AuthenticationError):
            stranger.ping()
    db = rdb(hosts.stack())
    assert db.config_get("bind")["bind"] == address  # not 127.0.0.1
    assert db.config_get("protected-mode")["protected-mode"] == "yes"
    # Redis logged those refusals; the ACL log must hold the service's only (the fixture's check).
    assert {entry["reason"] for entry in db.acl_log()} == {"auth"}
    db.acl_log_reset()


# --- serving -------------------------------------------------------------------------------


def test_both_workers_are_ready_on_both_api_hosts_and_both_take_jobs(hosts: Hosts, model: str) -> None:
    names = {hosts.worker_name(role) for role in WORKERS}
    assert len(names) == 2, names  # two hosts, two identities: same host name, both PID 1
    for api in APIS:
        assert names <= ready_workers(hosts.stack(api)), api
    a, b = hosts.client("api-a"), hosts.client("api-b")
    blocking = a.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0)
    streamed = b.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    # Greedy: the same text, whichever worker on whichever host answered each.
    assert text and text == blocking.choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda i: short_chat((a, b)[i % 2], model), range(6)))
    records = wait_records(hosts.stack(), ids)
    assert {r["status"] for r in records} <= {"completed", "incomplete"}
    assert {r["worker"] for r in records} == names


def test_a_stream_closed_by_its_client_on_api_a_stops_on_its_worker(hosts: Hosts, model: str) -> None:
    stream = hosts.client("api-a").chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=3000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    with stream:
        chunks = iter(stream)
        job_id = next(chunks).id
        for _ in range(3):
            next(chunks)
    done = wait_records(hosts.stack(), [job_id], timeout=30)[0]
    assert done["status"] == "cancelled" and done["worker"] in {hosts.worker_name(r) for r in WORKERS}
    assert terminal_events(hosts, job_id) == 1


def test_a_response_cancelled_through_api_b_stops_on_its_worker(hosts: Hosts) -> None:
    a, b = hosts.client("api-a"), hosts.client("api-b")
    job_id = start_long_response(a)
    generating(b, job_id)
    assert b.responses.cancel(job_id).status == "cancelled"
    done = wait_records(hosts.stack("api-b"), [job_id], timeout=30)[0]
    assert done["status"] == "cancelled" and done["worker"] in {hosts.worker_name(r) for r in WORKERS}
    assert a.responses.retrieve(job_id).status == "cancelled"
    assert terminal_events(hosts, job_id) == 1


def test_a_batch_created_on_api_a_is_finished_by_api_b_once_api_a_stops(hosts: Hosts) -> None:
    api_a, _ = hosts.apis["api-a"]
    hosts.apis["api-b"][0].stop()  # api-a alone carries the batch at first
    a = hosts.client("api-a")
    custom_ids = [f"line{i}" for i in range(8)]
    body = {"messages": HI, "max_tokens": 40, "temperature": 0, "ignore_eos": True}  # outlasts api-a
    lines = [
        {"custom_id": c, "method": "POST", "url": "/v1/chat/completions", "body": body} for c in custom_ids
    ]
    upload = a.files.create(
        file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch"
    )
    batch = a.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_batch(a, batch.id, {"in_progress", "finalizing", "completed"})
    lease = keys.batch_part(batch.id, "lease")
    assert rdb(hosts.stack()).get(lease)  # api-a's runner holds it
    api_a.stop()
    # Lines may go on finishing on the workers, but nothing collects them or ends the batch.
    assert rdb(hosts.stack()).hget(keys.batch(batch.id), "status") == "in_progress"
    hosts.start_api("api-b")
    b = hosts.client("api-b")
    done = wait_batch(b, batch.id, {"completed", "failed", "expired", "cancelled"}, timeout=120)
    assert not alive(api_a)  # all of it while api-a was down
    assert done.status == "completed" and done.error_file_id is None, done
    assert done.request_counts is not None and done.request_counts.completed == len(custom_ids)
    output = [json.loads(x) for x in b.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in output) == custom_ids  # every line once
    assert all(x["response"]["status_code"] == 200 for x in output)
    assert all(terminal_events(hosts, x["response"]["request_id"]) == 1 for x in output)
    # api-b's runner took the lease over and ended the batch.
    log_b = hosts.apis["api-b"][0].log_path.read_text()
    assert re.search(rf"\[{batch.id}\] batch completed: {len(custom_ids)} answered", log_b), log_b[-2000:]


# --- faults --------------------------------------------------------------------------------


def test_kill_9_of_one_hosts_worker_fails_its_job_once_and_the_other_serves(hosts: Hosts, model: str) -> None:
    a, b = hosts.client("api-a"), hosts.client("api-b")
    job = long_job_on_one_worker(hosts, a)
    job_id, victim, other = job.job_id, job.role, job.other
    hosts.workers[victim].stop(signal.SIGKILL)
    # The lease lapses with nobody to renew it; the reaper of an API host ends the job.
    done = wait_records(hosts.stack(), [job_id], timeout=LEASE_SECONDS + 5 + 10)[0]
    assert (done["status"], done["error_code"]) == ("failed", "worker_lost")
    assert a.responses.retrieve(job_id).output_text  # the text it had, kept
    assert worker_of(hosts, short_chat(b, model)) == hosts.worker_name(other)
    # The host's worker comes back; the lost job's unacknowledged message is offered again (the
    # visibility timeout has passed), to either worker, and the claim refuses it.
    hosts.start_worker(victim)
    refused = f"job {job_id} is no longer queued"
    wait_for(
        lambda: any(refused in hosts.workers[r].log_path.read_text() for r in WORKERS), 90, "the redelivery"
    )
    assert terminal_events(hosts, job_id) == 1


def test_a_worker_host_cut_off_loses_its_job_once_and_rejoins_without_a_restart(
    hosts: Hosts, model: str
) -> None:
    a, b = hosts.client("api-a"), hosts.client("api-b")
    job = long_job_on_one_worker(hosts, a)
    job_id, victim_name, victim, other = job.job_id, job.name, job.role, job.other
    process = hosts.workers[victim].proc
    hosts.network.link(victim, up=False)
    try:
        done = wait_records(hosts.stack(), [job_id], timeout=LEASE_SECONDS + 5 + 10)[0]
        assert (done["status"], done["error_code"]) == ("failed", "worker_lost")
        assert worker_of(hosts, short_chat(b, model)) == hosts.worker_name(other)
        # Its heartbeat lapses too: no API host counts it as ready any more.
        wait_for(lambda: victim_name not in ready_workers(hosts.stack("api-b")), 30, f"{victim} to drop out")
    finally:
        hosts.network.link(victim, up=True)
    for api in APIS:
        wait_for(
            lambda api=api: victim_name in ready_workers(hosts.stack(api)), 60, f"{victim} back on {api}"
        )
    assert hosts.workers[victim].proc is process and alive(hosts.workers[victim])  # the same process
    # It takes work again: either the long job, or, while the other is busy with it, a short one.
    busy = start_long_response(a)
    generating(a, busy)
    if worker_of(hosts, busy) != victim_name:
        assert worker_of(hosts, short_chat(b, model)) == victim_name
    b.responses.cancel(busy)
    # The cut-off worker's own attempt to end the job, once back, changed nothing.
    assert terminal_events(hosts, job_id) == 1
    assert record(hosts.stack(), job_id)["error_code"] == "worker_lost"


def test_a_redis_cut_off_is_answered_503_as_fast_as_a_redis_that_refuses(hosts: Hosts, model: str) -> None:
    """A Redis host whose cable is pulled sends no reset: a call on a connection opened before the
    cut waited out the reply timeout (REDIS_TIMEOUT_SECONDS, 10 s: /health took 11 s). Each
    API host's connections are in use before the cut, so every answer below meets them."""
    for api in APIS:
        short_chat(hosts.client(api), model)
    http = {api: httpx.Client(base_url=hosts.apis[api][1], timeout=30) for api in APIS}
    assert all(http[api].get("/health").status_code == 200 for api in APIS)
    hosts.network.link("redis", up=False)
    try:
        for api in APIS:
            for method, path, body in (
                ("GET", "/health", None),
                ("POST", "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 2}),
                ("GET", "/metrics", None),
            ):
                started = time.monotonic()
                answered = http[api].request(method, path, json=body)
                took = time.monotonic() - started
                assert answered.status_code == 503, (api, path, answered.text)
                assert took < REDIS_GONE_BOUND_SECONDS, (api, path, took)
    finally:
        hosts.network.link("redis", up=True)
    # Everyone reconnects by themselves: the next test's set-up waits for both workers on both APIs.


def test_sigterm_drains_one_worker_within_the_grace_while_the_other_serves(hosts: Hosts, model: str) -> None:
    a, b = hosts.client("api-a"), hosts.client("api-b")
    job = long_job_on_one_worker(hosts, a)
    job_id, victim_name, victim, other = job.job_id, job.name, job.role, job.other
    stopped_at = time.monotonic()
    hosts.workers[victim].proc.send_signal(signal.SIGTERM)  # to the host's launcher, which passes it on
    assert worker_of(hosts, short_chat(b, model)) == hosts.worker_name(other)
    done = wait_records(hosts.stack(), [job_id], timeout=30)[0]
    took = time.monotonic() - stopped_at
    assert (done["status"], done["error_code"]) == ("failed", "worker_shutdown")
    assert took < GRACE_SECONDS + 5, took  # the grace, then stopped between tokens
    assert a.responses.retrieve(job_id).output_text
    hosts.workers[victim].proc.wait(30)  # the worker exits once its job has ended ...
    assert victim_name not in ready_workers(hosts.stack("api-b"))  # ... and says it is gone
    assert terminal_events(hosts, job_id) == 1
