"""Failure behaviour with real processes: killed and stopped workers, Redis going away, overload,
deadlines, slow readers and aborted requests. Each bound asserted here is documented in README's
"Failure behaviour" section; the bounds are hang detectors, not performance figures."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tasks import events, keys
from tests.integration.conftest import Preset, Stack, restart_worker, stack_fixture
from tests.integration.helpers import (
    LONG_PROMPT,
    TERMINAL,
    job_events,
    long_chat,
    rdb,
    sdk,
    start_long_response,
    wait_for,
    wait_records,
    wait_response,
)
from tests.processes import start_redis, start_worker


def wait_status(
    stack: Stack, job_id: str, statuses: set[str] | frozenset[str], timeout: float
) -> dict[str, str]:
    return wait_records(stack, [job_id], statuses, timeout)[0]


def wait_running_with_text(client: openai.OpenAI, job_id: str, timeout: float = 60) -> None:
    wait_for(
        lambda: (r := client.responses.retrieve(job_id)).status == "in_progress" and r.output_text,
        timeout,
        f"{job_id} to be generating",
    )


def indexes_empty(stack: Stack) -> bool:
    client = rdb(stack)
    return client.zcard(keys.QUEUED) == 0 and client.scard(keys.RUNNING) == 0


# --- worker faults -------------------------------------------------------------------------


faults = stack_fixture(Preset.default().faults().named("faults"))


def test_sigkill_mid_stream_fails_the_job_in_band_and_it_never_reruns(faults: Stack) -> None:
    with httpx.stream("POST", f"{faults.api_url}/v1/chat/completions", json=long_chat(), timeout=120) as r:
        payloads = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
        job_id = json.loads(next(payloads))["id"]
        for _ in range(5):
            next(payloads)
        killed_at = time.monotonic()
        faults.worker.stop(signal.SIGKILL)  # parent and pool child, no chance to clean up
        rest = list(payloads)
        ended_after = time.monotonic() - killed_at
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["error"]["code"] == "worker_lost"
    assert ended_after < 30, ended_after
    record = rdb(faults).hgetall(keys.job(job_id))
    assert (record["status"], record["error_code"]) == ("failed", "worker_lost")

    restart_worker(faults)
    # The unacknowledged message comes back (visibility timeout 5 s); the claim refuses it.
    faults.worker.wait_until(
        lambda: f"job {job_id} is no longer queued" in faults.worker.log_path.read_text(), 60
    )
    assert sum(isinstance(e, events.Started) for e in job_events(faults, job_id)) == 1
    assert rdb(faults).hgetall(keys.job(job_id))["status"] == "failed"


def test_sigkill_keeps_partial_text_for_pollers(faults: Stack) -> None:
    client = sdk(faults)
    job_id = start_long_response(client)
    wait_running_with_text(client, job_id)
    partial = client.responses.retrieve(job_id).output_text
    faults.worker.stop(signal.SIGKILL)
    record = wait_status(faults, job_id, TERMINAL, timeout=30)
    assert record["error_code"] == "worker_lost"
    failed = client.responses.retrieve(job_id)
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.code == "worker_lost"
    assert failed.output_text.startswith(partial)
    restart_worker(faults)
    assert indexes_empty(faults)


def test_generation_longer_than_visibility_timeout_runs_once(faults: Stack) -> None:
    client = sdk(faults)
    job_id = start_long_response(client)
    wait_running_with_text(client, job_id)
    time.sleep(5)  # past the 5 s visibility timeout: Redis now offers the message again
    # A worker joining now restores unacknowledged messages at start-up and receives this one
    # while the first worker is still generating it; the claim makes it a no-op.
    second = start_worker(faults.env, faults.log_dir, name="worker-second")
    try:
        second.wait_until(lambda: f"job {job_id} is no longer queued" in second.log_path.read_text(), 120)
        assert client.responses.retrieve(job_id).status == "in_progress"
    finally:
        second.stop()
    cancelled = client.responses.cancel(job_id)
    assert cancelled.status == "cancelled"
    assert sum(isinstance(e, events.Started) for e in job_events(faults, job_id)) == 1
    assert len([e for e in job_events(faults, job_id) if events.is_terminal(e)]) == 1


def test_sigterm_mid_generation_fails_the_job_within_the_grace_period(faults: Stack) -> None:
    client = sdk(faults)
    job_id = start_long_response(client)
    wait_running_with_text(client, job_id)
    stopped_at = time.monotonic()
    faults.worker.proc.send_signal(signal.SIGTERM)  # the Celery parent, as `docker stop` does
    record = wait_status(faults, job_id, TERMINAL, timeout=30)
    took = time.monotonic() - stopped_at
    assert (record["status"], record["error_code"]) == ("failed", "worker_shutdown")
    assert took < 2 + 5, took  # grace 2 s, then stopped between tokens
    assert client.responses.retrieve(job_id).output_text
    faults.worker.proc.wait(30)  # the worker exits once the job has ended
    faults.worker.stop()
    restart_worker(faults)


def test_restarted_worker_takes_queued_jobs_once_ready(faults: Stack) -> None:
    """Work queued while the model's only worker goes away waits for the next one; new requests
    meanwhile get 503 model_unavailable (the model is known, nothing serves it) to retry."""
    client = sdk(faults)
    running = start_long_response(client)
    wait_running_with_text(client, running)
    job = client.responses.create(input="Hi", temperature=0, max_output_tokens=4, background=True)
    faults.worker.stop()  # warm shutdown: the running job ends at the grace period, it unregisters
    health = httpx.get(f"{faults.api_url}/health", timeout=5)
    assert health.status_code == 503
    assert health.json()["error"]["code"] == "no_ready_worker"
    assert wait_status(faults, running, TERMINAL, timeout=30)["error_code"] == "worker_shutdown"
    with pytest.raises(openai.InternalServerError) as refused:
        client.responses.create(input="Hi", max_output_tokens=4, background=True)
    assert refused.value.status_code == 503 and refused.value.body["code"] == "model_unavailable"  # type: ignore[index]
    assert int(refused.value.response.headers["Retry-After"]) > 0
    assert client.responses.retrieve(job.id).status == "queued"
    restart_worker(faults)
    assert wait_status(faults, job.id, TERMINAL, timeout=60)["status"] in ("completed", "incomplete")
    assert httpx.get(f"{faults.api_url}/health", timeout=5).status_code == 200


# --- Redis faults --------------------------------------------------------------------------


def test_redis_outage_gives_fast_503_and_everything_recovers(faults: Stack, tmp_path: Path) -> None:
    client = sdk(faults)
    ask: Any = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}]}
    before = client.chat.completions.create(**ask, max_tokens=4, temperature=0).choices[0].message.content
    assert before
    port = int(faults.redis_url.rsplit(":", 1)[1].split("/")[0])
    faults.redis.stop()
    started = time.monotonic()
    r = httpx.post(
        f"{faults.api_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}]},
        timeout=10,
    )
    assert time.monotonic() - started < 2
    assert r.status_code == 503
    assert "Retry-After" in r.headers
    assert r.json()["error"]["code"] == "service_unavailable"
    health = httpx.get(f"{faults.api_url}/health", timeout=5)
    assert (health.status_code, health.json()["error"]["code"]) == (503, "redis_unavailable")
    assert httpx.get(f"{faults.api_url}/v1/models", timeout=2).status_code == 200  # still responsive

    faults.redis, _ = start_redis(tmp_path, port=port)
    # The worker re-registers (heartbeat) and consumes again; the API reconnects by itself.
    faults.worker.wait_until(lambda: httpx.get(f"{faults.api_url}/health", timeout=5).status_code == 200, 60)
    answer = client.chat.completions.create(**ask, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content == before  # served as before the outage


# --- overload and deadlines ----------------------------------------------------------------


limits = stack_fixture(
    Preset.default()
    .with_(MAX_QUEUED="2", QUEUE_TIMEOUT_SECONDS="3", MAX_GENERATION_SECONDS="12")
    .named("limits")
)


def test_admission_control_refuses_beyond_max_queued_before_enqueueing(limits: Stack) -> None:
    client = sdk(limits)
    running = start_long_response(client)
    wait_running_with_text(client, running)
    waiting = [client.responses.create(input="Hi", max_output_tokens=2, background=True).id for _ in range(2)]
    model = client.models.list().data[0].id
    celery_queue_before = rdb(limits).llen(keys.generate_list(model))
    for body in (
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
    ):
        r = httpx.post(f"{limits.api_url}/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) > 0
        assert r.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        client.responses.create(input="Hi", background=True)
    assert rdb(limits).llen(keys.generate_list(model)) == celery_queue_before  # nothing was enqueued
    assert rdb(limits).zcard(keys.QUEUED) == rdb(limits).zcard(keys.queued_of(model)) == 2
    for job_id in [*waiting, running]:
        client.responses.cancel(job_id)
    assert indexes_empty(limits)


def test_queue_deadline_ends_a_waiting_job_without_running_it(limits: Stack) -> None:
    client = sdk(limits)
    running = start_long_response(client)
    wait_running_with_text(client, running)
    late = client.responses.create(input="Hi", max_output_tokens=2, background=True)
    record = wait_status(limits, late.id, TERMINAL, timeout=30)  # deadline 3 s + reaper period
    assert (record["status"], record["error_code"]) == ("failed", "queue_timeout")
    assert not any(isinstance(e, events.Started) for e in job_events(limits, late.id))
    client.responses.cancel(running)


def test_generation_time_limit_ends_with_what_it_has(limits: Stack) -> None:
    client = sdk(limits)
    job_id = start_long_response(client)
    done = wait_response(client, job_id)
    assert done.status == "incomplete"
    assert done.incomplete_details is not None and done.incomplete_details.reason == "time_limit"
    assert done.output_text and done.usage is not None and done.usage.output_tokens < 3000
    # Chat completions report the time limit as a budget: finish_reason "length".
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=3000,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].finish_reason == "length"
    assert indexes_empty(limits)


# --- slow readers and many aborted requests ------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_does_not_slow_the_worker_or_grow_the_api(stack: Stack) -> None:
    body = long_chat(max_tokens=120)
    rss_before = rss_kb(stack.api.proc.pid)
    with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        chat_id = json.loads(next(line for line in lines if line.startswith("data: "))[6:])["id"]
        # Read nothing more: the worker must still finish at its own pace.
        record = wait_status(stack, chat_id, TERMINAL, timeout=300)
        assert record["status"] in ("completed", "incomplete")
        other = httpx.post(
            f"{stack.api_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert other.status_code == 200  # another request is served while this reader stalls
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    text = "".join(
        json.loads(p[6:])["choices"][0]["delta"].get("content", "")
        for p in rest[:-1]
        if json.loads(p[6:])["choices"]
    )
    assert len(text) > 60
    assert rss_kb(stack.api.proc.pid) - rss_before < 50_000


def _api_connections(stack: Stack) -> tuple[int, int]:
    """(normal, pubsub) Redis connections the API holds."""
    clients = [c for c in rdb(stack).client_list() if c.get("name") == "llmq-api"]
    pubsub = sum(1 for c in clients if int(c.get("sub", 0)) or int(c.get("psub", 0)))
    return len(clients) - pubsub, pubsub


@pytest.mark.timeout(420)
def test_a_thousand_requests_with_aborts_leak_nothing(stack: Stack) -> None:
    url = f"{stack.api_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}

    def one(i: int) -> str:
        if i % 10 < 3:  # 300 aborts: the client goes away mid-request, streamed or blocking
            try:
                with httpx.stream("POST", url, json={**body, "stream": i % 2 == 0}, timeout=0.05) as r:
                    r.read()
            except httpx.TimeoutException:
                return "aborted"
            return "finished-before-abort"
        r = httpx.post(url, json={**body, "stream": i % 3 == 0}, timeout=120)
        assert r.status_code == 200, r.text
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(50)))  # warm the API's connection pool to its working size
        deadline = time.monotonic() + 60
        while not indexes_empty(stack) and time.monotonic() < deadline:
            time.sleep(0.2)
        baseline = _api_connections(stack)
        outcomes = list(pool.map(one, range(1000)))
    assert outcomes.count("ok") == 700
    assert outcomes.count("aborted") + outcomes.count("finished-before-abort") == 300
    deadline = time.monotonic() + 120
    while not indexes_empty(stack) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert indexes_empty(stack)  # every job reached a terminal state, kills and aborts included
    time.sleep(1)
    normal, pubsub = _api_connections(stack)
    assert pubsub == 0
    assert rdb(stack).pubsub_channels(keys.job_channel("*")) == []  # no job channel left subscribed
    assert normal <= max(baseline[0], 1) + 8  # bounded by concurrency, not by request count
