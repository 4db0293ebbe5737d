"""Durable background jobs through the Responses API: poll, resume, cancel, survive restarts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from tasks import keys
from tests.integration.conftest import Stack
from tests.integration.helpers import (
    LONG_PROMPT,
    TERMINAL,
    long_chat,
    rdb,
    record,
    start_long_response,
    wait_for,
    wait_response,
)
from tests.processes import start_api


def raw_events(stack: Stack, response_id: str, starting_after: int | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"stream": "true"}
    if starting_after is not None:
        params["starting_after"] = starting_after
    with httpx.stream("GET", f"{stack.api_url}/v1/responses/{response_id}", params=params, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


@contextmanager
def busy_worker(client: openai.OpenAI, model: str) -> Iterator[str]:
    """Keep the only worker busy with a long background job; cancel it afterwards."""
    job_id = start_long_response(client, 2000, model=model)
    try:
        running = wait_response(client, job_id, {"in_progress"} | TERMINAL)
        assert running.status == "in_progress"
        yield job_id
    finally:
        client.responses.cancel(job_id)


def test_background_job_polls_to_the_blocking_result(client: openai.OpenAI, model_name: str) -> None:
    kwargs: dict[str, Any] = {
        "model": model_name,
        "input": "Name a color.",
        "temperature": 0,
        "max_output_tokens": 16,
    }
    blocking = client.responses.create(**kwargs)
    assert blocking.status in ("completed", "incomplete")
    created = client.responses.create(**kwargs, background=True, metadata={"ticket": "42"})
    assert created.status == "queued"
    assert created.id.startswith("resp_")
    assert created.background is True
    done = wait_response(client, created.id)
    assert done.status == blocking.status
    assert done.output_text == blocking.output_text
    assert done.usage is not None and done.usage.output_tokens == blocking.usage.output_tokens  # type: ignore[union-attr]
    assert done.metadata == {"ticket": "42"}
    if done.status == "incomplete":
        assert done.incomplete_details is not None
        assert done.incomplete_details.reason == "max_output_tokens"


def test_instructions_and_message_input(client: openai.OpenAI, model_name: str) -> None:
    response = client.responses.create(
        model=model_name,
        instructions="Отвечай по-русски.",
        input=[{"role": "user", "content": "Привет!"}],
        temperature=0,
        max_output_tokens=8,
    )
    assert response.instructions == "Отвечай по-русски."
    assert response.output_text
    assert "\ufffd" not in response.output_text


def test_streamed_response_events_are_ordered_and_complete(client: openai.OpenAI, model_name: str) -> None:
    stream = client.responses.create(
        model=model_name, input="Name a color.", temperature=0, max_output_tokens=16, stream=True
    )
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-4].text == text
    assert events[-1].response.output_text == text
    blocking = client.responses.create(
        model=model_name, input="Name a color.", temperature=0, max_output_tokens=16
    )
    assert text == blocking.output_text


def test_resume_from_any_point_matches_the_uninterrupted_stream(
    stack: Stack, client: openai.OpenAI, model_name: str
) -> None:
    job = client.responses.create(
        model=model_name, input="Describe the sea.", temperature=0, max_output_tokens=24, background=True
    )
    # Resume while the job is queued or running, then again once it has finished.
    live_tail = raw_events(stack, job.id, starting_after=2)
    full = raw_events(stack, job.id)
    assert [e["sequence_number"] for e in full] == list(range(len(full)))
    assert live_tail == full[3:]
    for n in (0, 1, 4, len(full) // 2, len(full) - 2, len(full) - 1):
        assert raw_events(stack, job.id, starting_after=n) == full[n + 1 :], n
    # And through the SDK.
    resumed = list(client.responses.retrieve(job.id, stream=True, starting_after=5))
    assert [e.sequence_number for e in resumed] == list(range(6, len(full)))


def test_in_progress_response_already_holds_partial_text(client: openai.OpenAI, model_name: str) -> None:
    job_id = start_long_response(client, 400, model=model_name)
    try:
        partial = wait_for(
            lambda: (r := client.responses.retrieve(job_id)).status == "in_progress" and r.output_text and r,
            60,
            f"{job_id} to hold partial text",
        )
        assert partial.status == "in_progress"
        assert partial.output_text
        assert partial.usage is None
    finally:
        client.responses.cancel(job_id)


def test_cancel_queued_and_running_jobs(client: openai.OpenAI, model_name: str) -> None:
    with busy_worker(client, model_name) as running_id:
        queued = client.responses.create(model=model_name, input="Hi", max_output_tokens=4, background=True)
        cancelled = client.responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        assert client.responses.cancel(queued.id).status == "cancelled"  # repeat is harmless
        stopped = client.responses.cancel(running_id)
        assert stopped.status == "cancelled"
        assert stopped.output_text  # what was generated before the cancel is kept
        assert stopped.usage is not None and stopped.usage.output_tokens < 2000
    # The worker takes the next job and the cancelled queued one never ran.
    nxt = client.responses.create(model=model_name, input="Hi", temperature=0, max_output_tokens=4)
    assert nxt.status in ("completed", "incomplete")
    assert client.responses.retrieve(queued.id).output == []


def test_cancelling_a_finished_job_leaves_it_as_it_was(client: openai.OpenAI, model_name: str) -> None:
    done = client.responses.create(model=model_name, input="Hi", temperature=0, max_output_tokens=4)
    after = client.responses.cancel(done.id)
    assert (after.status, after.output_text) == (done.status, done.output_text)


def test_unknown_ids_are_404(stack: Stack, client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_doesnotexist")
    r = httpx.get(f"{stack.api_url}/v1/responses/resp_nope", params={"stream": "true"}, timeout=10)
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    chat = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(chat.id)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, 400, "tools"),
        ({"input": "x", "previous_response_id": "resp_1"}, 404, "previous_response_id"),  # no such response
        ({"input": "x", "truncation": "sometimes"}, 400, "truncation"),
        ({"input": "x", "conversation": "conv_1"}, 400, "conversation"),
        ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
        ({"input": "x", "temperature": 9}, 400, "temperature"),
        ({"input": 5}, 400, "input"),
        ({}, 400, "input"),
        ({"input": "x", "model": "gpt-5"}, 404, "model"),  # model_not_found, as OpenAI answers
        ({"input": "x", "include": ["reasoning.encrypted_content"]}, 400, "include"),
        ({"input": "x", "top_logprobs": 3}, 400, "top_logprobs"),  # without the logprobs include
        (
            {"input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 21},
            400,
            "top_logprobs",
        ),
    ],
)
def test_invalid_response_requests(stack: Stack, body: dict[str, Any], status: int, param: str) -> None:
    r = httpx.post(f"{stack.api_url}/v1/responses", json=body, timeout=10)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_jobs_survive_an_api_restart(stack: Stack, client: openai.OpenAI, model_name: str) -> None:
    job = client.responses.create(
        model=model_name, input="Hi", temperature=0, max_output_tokens=8, background=True
    )
    other, url = start_api(stack.env, stack.log_dir, name="api-second")
    try:
        second = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        stack.api.stop()  # the API that took the job goes away
        done = wait_response(second, job.id)
        assert done.status in ("completed", "incomplete")
        assert done.output_text
    finally:
        other.stop()
        restarted, new_url = start_api(stack.env, stack.log_dir, name="api-restarted")
        stack.api, stack.api_url = restarted, new_url
        client.base_url = httpx.URL(f"{new_url}/v1/")
    assert client.responses.retrieve(job.id).output_text == done.output_text


def test_chat_stream_disconnect_frees_the_worker(
    stack: Stack, client: openai.OpenAI, model_name: str
) -> None:
    body = long_chat(max_tokens=2000, model=model_name)
    with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        chat_id = json.loads(first[6:])["id"]
        for _ in range(5):
            next(lines)
    # The connection is closed; the worker must stop that generation and take the next job.
    start = time.monotonic()
    nxt = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert nxt.choices[0].message.content, nxt  # the next job was answered, with text
    assert time.monotonic() - start < 30  # a bound on a hang, not a performance figure
    stopped = record(stack, chat_id)
    assert stopped["status"] == "cancelled"
    assert int(stopped["completion_tokens"]) < 2000


def test_queued_stream_gets_keepalive_pings(stack: Stack, client: openai.OpenAI, model_name: str) -> None:
    # The stack runs with STREAM_PING_SECONDS=1.
    with busy_worker(client, model_name):
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            pings = 0
            for line in lines:
                if line.startswith(": ping"):
                    pings += 1
                if pings == 2:
                    break
    assert pings == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"input": LONG_PROMPT, "max_output_tokens": 2000}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 2000},
        ),
    ],
    ids=["responses", "chat"],
)
def test_blocking_request_whose_client_goes_away_is_cancelled(
    stack: Stack, path: str, body: dict[str, Any]
) -> None:
    r = rdb(stack)
    before = set(r.keys(keys.job("*")))
    # The client gives up after 3 s and closes the connection; 2,000 tokens take far longer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{stack.api_url}{path}",
            json={**body, "ignore_eos": True, "temperature": 0},
            timeout=httpx.Timeout(30, read=3),
        )
    (key,) = {k for k in set(r.keys(keys.job("*"))) - before if k.count(":") == 2}
    # 30 s: a bound on a hang, not a performance figure.
    wait_for(lambda: r.hget(key, "status") not in ("queued", "in_progress"), 30, f"{key} to end", every=0.2)
    ended = r.hgetall(key)
    assert ended["status"] == "cancelled", ended
    assert int(ended["completion_tokens"]) < 2000


def test_logprobs_blocking_and_streamed_equal_the_chat_completions_ones(
    client: openai.OpenAI, model_name: str
) -> None:
    ask = "Напиши одно предложение о Москве."
    chat = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": ask}],
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content
    want = [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in chat.choices[0].logprobs.content]
    body: dict[str, Any] = dict(
        model=model_name,
        input=ask,
        max_output_tokens=16,
        temperature=0,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    response = client.responses.create(**body)
    assert response.top_logprobs == 2
    [part] = [p for item in response.output if item.type == "message" for p in item.content]
    assert part.type == "output_text" and part.text == chat.choices[0].message.content
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in part.logprobs or []] == want
    for got, chat_entry in zip(part.logprobs or [], chat.choices[0].logprobs.content, strict=True):
        assert got.logprob == pytest.approx(chat_entry.logprob, abs=1e-4)
    streamed, done = [], None
    for event in client.responses.create(**body, stream=True):
        if event.type == "response.output_text.delta":
            streamed += event.logprobs or []
        elif event.type == "response.output_text.done":
            done = event.logprobs
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in part.logprobs or []]
    assert done is not None and [e.token for e in done] == [e.token for e in streamed]
    # Without the include there are none, as before.
    plain = client.responses.create(model=model_name, input=ask, max_output_tokens=4, temperature=0)
    assert plain.top_logprobs is None
    assert all(not p.logprobs for item in plain.output if item.type == "message" for p in item.content)
