"""Webhooks against a real receiver: a small HTTP server this module runs, which verifies every
request with the official SDK (`client.webhooks.unwrap`) as it arrives. Every event type arrives
once, signed; a receiver that answers 500, answers too late or is down gets the event once it
recovers, under the same webhook-id; an API instance killed between an ending and its delivery
loses nothing (another instance delivers it).

The stack retries fast (small backoff, 1 s timeout) so that recoveries fit in the module's time,
has two slots and a short queue deadline, so that a response made to wait behind two long ones
fails (`queue_timeout`), the one cheap real failure."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest

from tasks import keys
from tests.integration.conftest import Preset, Stack
from tests.integration.helpers import rdb, sdk, start_long_response, wait_batch, wait_for, wait_records
from tests.processes import BIN, ROOT, free_port, start_api, wait_healthy

SECRET = "whsec_" + base64.b64encode(b"the receiver's signing key, 32 b").decode()
BATCH_SECRET = "only-batches-secret"  # a plain (not whsec_) secret, as the SDK also accepts
WRONG = "whsec_" + base64.b64encode(b"someone else's key").decode()
TIMEOUT_SECONDS = 1.0
ADMIN = {"Authorization": "Bearer the-admin-key"}
# Greedy SmolLM2 answers this in a few tokens and ends its turn: a response that completes.
ENDS_BY_ITSELF = "Reply with the single word: yes"
ENDED = {"completed", "failed", "expired", "cancelled"}
pytestmark = pytest.mark.timeout(120)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int  # what the receiver answered (0: it answered nothing, too late)
    event: Any  # the SDK's unwrapped event


class Receiver:
    """An HTTP server on a fixed port that can answer 2xx, 500, too late, or be down."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"
        self.got: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                secret = BATCH_SECRET if self.path == "/batches" else SECRET
                # Verified now, as a receiver does: the SDK refuses a timestamp 5 minutes old.
                event = openai.OpenAI(api_key="-").webhooks.unwrap(body, headers, secret=secret)
                mode = receiver.mode
                answered = {"ok": 200, "500": 500, "slow": 0}[mode]
                with receiver._lock:
                    receiver.got.append(Received(self.path, headers, body, answered, event))
                if mode == "slow":
                    time.sleep(TIMEOUT_SECONDS * 3)
                    answered = 200  # too late: the sender has given up on it
                self.send_response(answered)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of(self, subject: str, path: str = "/hook") -> list[Received]:
        with self._lock:
            return [r for r in self.got if r.event.data.id == subject and r.path == path]

    def delivered(self, subject: str, path: str = "/hook", timeout: float = 60) -> Received:
        """The one request about `subject` answered 2xx (waits for it; fails if there are two)."""
        wait_for(
            lambda: [r for r in self.of(subject, path) if r.answered == 200], timeout, f"{subject}'s event"
        )
        (ok,) = [r for r in self.of(subject, path) if r.answered == 200]
        return ok


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def hooks(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    only_batches = [{"url": receiver.url("/batches"), "secret": BATCH_SECRET, "events": ["batch.completed"]}]
    preset = Preset.slots(2).with_(
        WEBHOOK_URL=receiver.url("/hook"),
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_ENDPOINTS=json.dumps(only_batches),
        WEBHOOK_TIMEOUT_SECONDS=str(TIMEOUT_SECONDS),
        WEBHOOK_BACKOFF_SECONDS="0.3",
        WEBHOOK_BACKOFF_MAX_SECONDS="1",
        QUEUE_TIMEOUT_SECONDS="4",
        ADMIN_API_KEY="the-admin-key",
    )
    with preset.named("webhooks").running(tmp_path_factory) as stack:
        yield stack


def short_response(client: openai.OpenAI, **body: Any) -> str:
    return client.responses.create(input="Hi", max_output_tokens=2, background=True, **body).id


def deliveries(stack: Stack, subject: str) -> list[dict[str, Any]]:
    """`subject`'s deliveries, as GET /v1/webhooks/deliveries lists them (with the admin key)."""
    url = f"{stack.api_url}/v1/webhooks/deliveries"
    listed = httpx.get(url, params={"limit": 50}, headers=ADMIN, timeout=10).json()["data"]
    return [d for d in listed if d["subject"] == subject]


def attempts(stack: Stack, subject: str) -> list[dict[str, Any]]:
    return [a for d in deliveries(stack, subject) for a in d["attempt_log"]]


def check(received: Received, subject: str, kind: str) -> None:
    """The event is OpenAI's shape, and the SDK refuses it under another secret."""
    assert received.event.type == kind and received.event.data.id == subject
    assert received.headers["webhook-id"] == received.event.id and received.event.id.startswith("evt_")
    assert json.loads(received.body)["object"] == "event"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="-").webhooks.unwrap(received.body, received.headers, secret=WRONG)


def test_every_background_response_ending_arrives_once_signed(hooks: Stack, receiver: Receiver) -> None:
    client = sdk(hooks)
    blocking = client.responses.create(input="Hi", max_output_tokens=2)  # not background: no event
    chat = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    incomplete = short_response(client)
    completed = client.responses.create(
        input=ENDS_BY_ITSELF, max_output_tokens=200, temperature=0, background=True
    ).id
    ended = wait_records(hooks, [incomplete, completed], timeout=60)
    assert [r["status"] for r in ended] == ["incomplete", "completed"], ended
    # Two long ones fill both slots: a third waits past the queue deadline and fails.
    longs = [start_long_response(client) for _ in range(2)]
    wait_records(hooks, longs, {"in_progress"}, timeout=60)
    failing = short_response(client)
    wait_records(hooks, [failing], {"failed"}, timeout=60)
    for long in longs:
        client.responses.cancel(long)
    for subject, kind in [
        (completed, "response.completed"),
        (incomplete, "response.incomplete"),
        (failing, "response.failed"),
        *[(long, "response.cancelled") for long in longs],
    ]:
        check(receiver.delivered(subject), subject, kind)
    # Endings are fanned out in the order they happened: by now the earlier two have been passed over.
    assert not receiver.of(blocking.id) and not receiver.of(chat.id)
    assert not [r for r in receiver.got if r.path == "/batches"]


def test_every_batch_ending_arrives_once_signed(hooks: Stack, receiver: Receiver) -> None:
    client = sdk(hooks)
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
    quick = {**line, "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}
    count = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 3000, "ignore_eos": True}
    long = {**line, "body": count}

    def submit(lines: list[Any]) -> str:
        content = "".join(json.dumps(x) + "\n" for x in lines).encode()
        uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
        return client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id

    completed, failed, cancelled, expired = (
        submit([quick]),
        submit(["not json"]),
        submit([long]),
        submit([long]),
    )
    db = rdb(hooks)
    wait_for(lambda: db.hget(keys.batch(cancelled), "status") == "in_progress", 60, "the batch to start")
    client.batches.cancel(cancelled)
    # The completion window closes now: the batch's record says when it does (Redis's clock).
    wait_for(lambda: db.hget(keys.batch(expired), "status") == "in_progress", 60, "the batch to start")
    now = db.time()[0]
    spec = json.loads(db.hget(keys.batch(expired), "spec") or "{}")
    db.hset(keys.batch(expired), mapping={"spec": json.dumps({**spec, "expires_at": now}), "expires_at": now})
    for batch_id, status in [
        (completed, "completed"),
        (failed, "failed"),
        (cancelled, "cancelled"),
        (expired, "expired"),
    ]:
        assert wait_batch(client, batch_id, ENDED).status == status
        check(receiver.delivered(batch_id), batch_id, f"batch.{status}")
    # The second endpoint asked for batch.completed only, and gets it under its own secret.
    assert receiver.delivered(completed, "/batches").event.type == "batch.completed"
    assert [r.event.type for r in receiver.got if r.path == "/batches"] == ["batch.completed"]
    # The operator's command lists them, straight from Redis (delivered once each answer is recorded).
    batch_ids = {completed, failed, cancelled, expired}

    def listed() -> set[tuple[str, str]]:
        run = subprocess.run(
            [str(BIN / "python"), "-m", "api.webhooks", "list", "--limit", "50"],
            cwd=ROOT,
            env={**os.environ, **hooks.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        states = [json.loads(line) for line in run.stdout.splitlines()]
        return {(d["subject"], d["status"]) for d in states if d["subject"] in batch_ids}

    expected = {(b, "delivered") for b in batch_ids}
    wait_for(lambda: listed() == expected, 30, "every batch's delivery listed as delivered", every=0.5)


@pytest.mark.parametrize("mode", ["500", "slow", "down"])
def test_a_failing_receiver_gets_the_event_after_it_recovers_under_the_same_id(
    hooks: Stack, receiver: Receiver, mode: str
) -> None:
    client = sdk(hooks)
    if mode == "down":
        receiver.stop()
    else:
        receiver.mode = mode
    subject = short_response(client)
    wait_for(lambda: len(attempts(hooks, subject)) >= 2, 60, "two failed attempts")
    if mode == "down":
        receiver.start()
    receiver.mode = "ok"
    ok = receiver.delivered(subject)
    assert all(r.headers["webhook-id"] == ok.headers["webhook-id"] for r in receiver.of(subject))
    (delivery,) = wait_for(
        lambda: [d for d in deliveries(hooks, subject) if d["status"] == "delivered"], 10, "the record"
    )
    assert delivery["url"] == receiver.url("/hook") and delivery["event_id"] == ok.event.id
    errors = [a["error"] for a in delivery["attempt_log"]]
    assert errors[-1] is None and all(errors[:-1]) and delivery["attempts"] == len(errors), delivery
    if mode != "down":  # the receiver saw the failed attempts too
        assert len(receiver.of(subject)) >= 3
    metrics = httpx.get(f"{hooks.api_url}/metrics", timeout=10).text
    assert 'llmq_webhook_deliveries_total{outcome="delivered"}' in metrics
    assert (
        "llmq_webhook_attempts_failed_total" in metrics and "llmq_webhook_oldest_pending_seconds" in metrics
    )
    # The deliveries name every key's jobs and the receivers: the admin key only.
    refused = httpx.get(f"{hooks.api_url}/v1/webhooks/deliveries", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"


def test_an_api_killed_between_ending_and_delivery_loses_nothing(hooks: Stack, receiver: Receiver) -> None:
    client = sdk(hooks)
    receiver.mode = "slow"
    # The API dies with one delivery failing, an attempt at it under way (the receiver has the
    # request, the API has not recorded it), and one ending that no API has read yet.
    failing = short_response(client)
    wait_for(lambda: attempts(hooks, failing), 60, "a failed attempt")
    unseen = start_long_response(client, max_output_tokens=200)
    sent = len(receiver.of(failing))
    wait_for(lambda: len(receiver.of(failing)) > sent, 30, "another attempt under way")
    hooks.api.stop(signal.SIGKILL)
    receiver.mode = "ok"
    wait_records(hooks, [unseen], timeout=60)
    hooks.api, hooks.api_url = start_api(hooks.env, hooks.log_dir, name="api-after-kill")
    wait_healthy(hooks.api, hooks.api_url, timeout=60)
    ok = receiver.delivered(failing)
    check(ok, failing, "response.incomplete")
    assert {r.headers["webhook-id"] for r in receiver.of(failing)} == {ok.event.id}
    check(receiver.delivered(unseen), unseen, "response.incomplete")
