"""Webhook events as pure logic: the settings that register endpoints, who gets which event, the
event body, and signatures that the openai SDK's own verifier accepts, or refuses when the body,
the timestamp or the secret is wrong."""

from __future__ import annotations

import base64
import json
import time

import openai
import pytest
from pydantic import ValidationError

from api.edge.auth import owner_tag
from api.webhooks.endpoints import Event, batch_event, endpoints, job_event, signed_headers
from tasks.jobs import JobMeta, ResponseOptions
from tasks.settings import Settings, webhook_key
from tasks.webhooks import Ending

SECRET = "whsec_" + base64.b64encode(b"a key of thirty-two bytes, really").decode()
SDK = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


def settings(**env: object) -> Settings:
    return Settings(_env_file=None, **env)  # type: ignore[call-arg]


def test_the_sdk_unwraps_what_we_sign_and_refuses_a_wrong_secret_body_or_timestamp() -> None:
    event = Event("evt_1", "response.completed", "resp_1", 1_800_000_000.5, None)
    body = event.body().encode()
    headers = signed_headers(webhook_key(SECRET), event.id, body)
    unwrapped = SDK.webhooks.unwrap(body, headers, secret=SECRET)
    assert (unwrapped.type, unwrapped.id, unwrapped.data.id, unwrapped.created_at) == (
        "response.completed",
        "evt_1",
        "resp_1",
        1_800_000_000,
    )
    assert json.loads(body)["object"] == "event"
    other = "whsec_" + base64.b64encode(b"another key").decode()
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.unwrap(body, headers, secret=other)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.unwrap(body.replace(b"resp_1", b"resp_2"), headers, secret=SECRET)
    stale = {**headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.unwrap(body, stale, secret=SECRET)


@pytest.mark.parametrize("kind", ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"])
def test_every_batch_event_unwraps_as_its_type(kind: str) -> None:
    ending = Ending(id="batch_1", kind="batch", status=kind.removeprefix("batch."), at=5.0)
    event = batch_event("1-0", ending, None)
    assert event is not None
    body = event.body().encode()
    assert (
        SDK.webhooks.unwrap(body, signed_headers(webhook_key(SECRET), event.id, body), secret=SECRET).type
        == kind
    )


def test_only_background_responses_make_events() -> None:
    ending = Ending(id="resp_1", kind="response", status="cancelled", at=5.0)
    background = JobMeta(owner="o", response=ResponseOptions(background=True)).model_dump_json()
    blocking = JobMeta(response=ResponseOptions(background=False)).model_dump_json()
    event = job_event("1-0", ending, background)
    assert event is not None and (event.type, event.owner) == ("response.cancelled", "o")
    assert event.id == job_event("1-0", ending, background).id  # type: ignore[union-attr]  # stable
    assert job_event("1-0", ending, blocking) is None
    assert job_event("1-0", ending.model_copy(update={"batch": "batch_1"}), background) is None
    assert job_event("1-0", ending.model_copy(update={"kind": "chat"}), background) is None
    assert job_event("1-0", ending, None) is None  # the record expired


def test_endpoints_get_their_events_of_their_keys_only() -> None:
    registered = [
        {"url": "https://a.example/hook", "secret": SECRET, "events": ["batch.completed"]},
        {"url": "http://b.example:8080/", "secret": "plain-secret", "api_keys": ["sk-b"]},
    ]
    everyone, batches, team_b = endpoints(
        settings(webhook_url="https://all.example/", webhook_secret=SECRET, webhook_endpoints=registered)
    )
    assert everyone.wants("response.failed", None) and everyone.wants("batch.expired", "x")
    assert batches.wants("batch.completed", "x") and not batches.wants("batch.failed", "x")
    assert team_b.wants("response.completed", owner_tag("sk-b"))
    assert not team_b.wants("response.completed", owner_tag("sk-a")) and not team_b.wants(
        "batch.failed", None
    )
    assert team_b.key == b"plain-secret" and everyone.key == b"a key of thirty-two bytes, really"


@pytest.mark.parametrize(
    "env",
    [
        {"webhook_url": "ftp://files.example/"},
        {"webhook_url": "/relative", "webhook_secret": SECRET},
        {"webhook_url": "https://a.example/"},  # no secret
        {"webhook_url": "https://a.example/", "webhook_secret": "whsec_not*base64"},
        {"webhook_endpoints": [{"url": "file:///etc/passwd", "secret": SECRET}]},
        {"webhook_endpoints": [{"url": "https://a.example/", "secret": ""}]},
        {"webhook_endpoints": [{"url": "https://a.example/", "secret": SECRET, "events": ["chat.done"]}]},
    ],
)
def test_settings_refuse_endpoints_that_could_never_work(env: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        settings(**env)


def test_two_endpoints_with_one_url_are_refused() -> None:
    twice = [{"url": "https://a.example/", "secret": SECRET}] * 2
    with pytest.raises(ValueError, match="its own URL"):
        endpoints(settings(webhook_endpoints=twice))


def test_endpoints_are_read_from_json_and_an_empty_variable_means_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEBHOOK_ENDPOINTS", "")
    assert settings().webhook_endpoint_list == []
    monkeypatch.setenv("WEBHOOK_ENDPOINTS", json.dumps([{"url": "https://a.example/", "secret": SECRET}]))
    assert [e.url for e in settings().webhook_endpoint_list] == ["https://a.example/"]
    monkeypatch.setenv("WEBHOOK_ENDPOINTS", "[{")
    with pytest.raises(ValidationError):
        settings()
