"""Stored conversations through the official SDK and LangChain, on one stack with two API keys:
three turns by previous_response_id alone, its blocking, streamed, background and batch forms, the
404s and 400s naming previous_response_id, a chain outgrowing the context (400, or truncation
"auto"), input_items pages, DELETE, and function calls carried across turns.

The worker runs a tiny random-weight Llama with a 512-token context (tests/tiny_llama.py), so a
conversation outgrows it in two short turns, not two 4,000-token prefills of the embedded model.
Its words prove nothing, so what the model was given is read from the response's input_items
and its usage.input_tokens, never from what it answered."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.integration.conftest import Preset, Stack
from tests.integration.helpers import sdk, wait_batch, wait_response
from tests.tiny_llama import TinyLlamas, gguf_for_worker

KEY_A, KEY_B = "conversation-key-a", "conversation-key-b"
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 8}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER: Any = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}

CONTEXT = 512


@pytest.fixture(scope="module")
def conversations(
    tmp_path_factory: pytest.TempPathFactory, tiny_llamas: TinyLlamas, model_cache: Path
) -> Iterator[Stack]:
    model_dir, _ = tiny_llamas.random(context_length=CONTEXT)
    preset = Preset.api_keys(KEY_A, KEY_B).with_(
        MODEL_ID=str(gguf_for_worker(model_dir, model_cache)),
        MODEL_CACHE_DIR=str(model_cache),
        SERVED_MODEL_NAME="tiny-conversations",
        # A stream waits up to STREAM_PING_SECONDS for the job's first event, so that a prompt too
        # long is its HTTP 400; 10 s is far more than a worker takes to render one, even on busy CI.
        STREAM_PING_SECONDS="10",
    )
    with preset.named("conversations").running(tmp_path_factory) as stack:
        yield stack


@pytest.fixture(scope="module")
def client(conversations: Stack) -> openai.OpenAI:
    return sdk(conversations, KEY_A)


@pytest.fixture(scope="module")
def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def texts(client: openai.OpenAI, response_id: str) -> list[tuple[str, str]]:
    """A response's input items, oldest first, as (role or type, text)."""
    out = []
    for item in client.responses.input_items.list(response_id, order="asc", limit=100):
        if item.type == "message":
            out.append((item.role, "".join(part.text for part in item.content)))  # type: ignore[union-attr]
        elif item.type == "function_call":
            out.append(("function_call", item.call_id))
        elif item.type == "function_call_output":
            out.append(("function_call_output", item.output))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def first(client: openai.OpenAI, model_name: str) -> Any:
    """A completed first turn, with instructions that the turns after it do not inherit."""
    return client.responses.create(
        model=model_name, instructions="Answer in one word.", input="My name is Ada.", **GREEDY
    )


def test_three_turns_by_previous_response_id_alone(
    client: openai.OpenAI, model_name: str, first: Any
) -> None:
    assert first.status in ("completed", "incomplete") and first.store is True
    second = client.responses.create(
        model=model_name, previous_response_id=first.id, input="What is my name?", **GREEDY
    )
    third = client.responses.create(
        model=model_name, previous_response_id=second.id, input="Spell it.", **GREEDY
    )
    assert (second.previous_response_id, third.previous_response_id) == (first.id, second.id)
    assert third.instructions is None and third.truncation == "disabled"
    assert texts(client, third.id) == [
        ("user", "My name is Ada."),
        ("assistant", first.output_text),
        ("user", "What is my name?"),
        ("assistant", second.output_text),
        ("user", "Spell it."),
    ]  # the first turn's instructions were not carried over
    # The model was given each earlier turn: every prompt holds the one before it and its answer.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_streamed_background_and_batch_continuations_see_the_same_conversation(
    client: openai.OpenAI, model_name: str, first: Any
) -> None:
    body: dict[str, Any] = {
        "model": model_name,
        "previous_response_id": first.id,
        "input": "Who am I?",
        **GREEDY,
    }
    blocking = client.responses.create(**body)
    streamed = list(client.responses.create(**body, stream=True))[-1].response  # type: ignore[union-attr]
    assert streamed.previous_response_id == first.id
    background = wait_response(client, client.responses.create(**body, background=True).id)
    assert background.previous_response_id == first.id
    for response in (streamed, background):
        assert response.usage.input_tokens == blocking.usage.input_tokens
        assert response.output_text == blocking.output_text
        assert texts(client, response.id) == texts(client, blocking.id)
    line = {"custom_id": "turn-2", "method": "POST", "url": "/v1/responses", "body": body}
    unknown = {**line, "custom_id": "gone", "body": {**body, "previous_response_id": "resp_" + "0" * 32}}
    uploaded = client.files.create(
        file=("input.jsonl", "\n".join(json.dumps(x) for x in (line, unknown)).encode()), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/responses", completion_window="24h"
    )
    batch = wait_batch(client, batch.id, {"completed", "failed"})
    assert batch.status == "completed", batch
    [answered] = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    response = answered["response"]["body"]
    assert response["previous_response_id"] == first.id
    assert response["usage"]["input_tokens"] == blocking.usage.input_tokens
    [refused] = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert refused["custom_id"] == "gone" and refused["response"]["status_code"] == 404
    assert refused["response"]["body"]["error"]["param"] == "previous_response_id"


def test_responses_that_cannot_be_continued(
    conversations: Stack, client: openai.OpenAI, model_name: str, first: Any
) -> None:
    other = sdk(conversations, KEY_B)
    unstored = client.responses.create(model=model_name, input="Hi", store=False, **GREEDY)
    assert unstored.store is False
    for caller, response_id in [
        (other, first.id),  # another key's: as unknown to it as an id never handed out
        (client, "resp_" + "0" * 32),
        (client, "not-an-id"),
        (client, unstored.id),
    ]:
        with pytest.raises(openai.NotFoundError) as caught:
            caller.responses.create(
                model=model_name, previous_response_id=response_id, input="Go on.", **GREEDY
            )
        assert caught.value.body["param"] == "previous_response_id", response_id  # type: ignore[index]
    for call in (
        lambda: other.responses.input_items.list(first.id),
        lambda: other.responses.delete(first.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(unstored.id)
    # The worker paused, a background response stays queued for as long as the test needs.
    os.killpg(conversations.worker.proc.pid, signal.SIGSTOP)
    try:
        queued = client.responses.create(model=model_name, input="Hi", background=True, **GREEDY).id
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model=model_name, previous_response_id=queued, input="And?", **GREEDY)
        assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.delete(queued)  # cancel it first
        assert caught.value.body["param"] == "response_id"  # type: ignore[index]
        assert client.responses.cancel(queued).status == "cancelled"
    finally:
        os.killpg(conversations.worker.proc.pid, signal.SIGCONT)
    client.responses.delete(queued)  # ended: it may go now


def test_a_chain_outgrowing_the_context_is_400_unless_truncation_is_auto(
    client: openai.OpenAI, model_name: str
) -> None:
    # Two turns of ~300 tokens each: the first fits the model's 512, the pair does not.
    long = "word " * 300
    turn = client.responses.create(model=model_name, input=long, temperature=0, max_output_tokens=1)
    assert CONTEXT / 2 < turn.usage.input_tokens < CONTEXT
    body: dict[str, Any] = {
        "model": model_name, "previous_response_id": turn.id, "input": long, "temperature": 0, "max_output_tokens": 1
    }  # fmt: skip
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**body)
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**body, stream=True)  # an HTTP error too, before the stream starts
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    cut = client.responses.create(**body, truncation="auto")
    assert cut.status in ("completed", "incomplete") and cut.truncation == "auto"
    # The first turn was dropped from the prompt: about one turn's tokens, not two.
    assert cut.usage.input_tokens < turn.usage.input_tokens + 100
    # input_items list what the request was given; the cut is the worker's, on each prompt.
    assert [role for role, _ in texts(client, cut.id)] == ["user", "assistant", "user"]


def test_input_items_pages(client: openai.OpenAI, model_name: str) -> None:
    said = [f"Message {i}." for i in range(5)]
    response = client.responses.create(
        model=model_name, input=[{"role": "user", "content": s} for s in said], **GREEDY
    )
    page = client.responses.input_items.list(response.id, limit=2)  # newest first, by default
    assert [item.content[0].text for item in page.data] == said[::-1][:2]  # type: ignore[union-attr]
    assert page.has_more and page.first_id == page.data[0].id and page.last_id == page.data[1].id
    walked = list(client.responses.input_items.list(response.id, limit=2, order="asc"))  # every page
    assert [item.content[0].text for item in walked] == said  # type: ignore[union-attr]
    assert len({item.id for item in walked}) == 5
    rest = client.responses.input_items.list(response.id, order="asc", after=walked[2].id)
    assert [item.id for item in rest.data] == [item.id for item in walked[3:]] and not rest.has_more
    with pytest.raises(openai.BadRequestError):
        client.responses.input_items.list(response.id, limit=101)


def test_delete_then_get_is_404(client: openai.OpenAI, model_name: str) -> None:
    response = client.responses.create(model=model_name, input="Hi", **GREEDY)
    deleted = client.responses.with_raw_response.delete(response.id)
    assert deleted.http_response.json() == {"id": response.id, "object": "response", "deleted": True}
    for call in (
        lambda: client.responses.retrieve(response.id),
        lambda: client.responses.input_items.list(response.id),
        lambda: client.responses.delete(response.id),
        lambda: client.responses.create(model=model_name, previous_response_id=response.id, input="x"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()


def test_function_calls_carry_across_turns(client: openai.OpenAI, model_name: str) -> None:
    called = client.responses.create(
        model=model_name, input="What is the weather in Moscow?", tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, temperature=0, max_output_tokens=80,
    )  # fmt: skip
    [call] = called.output
    assert call.type == "function_call"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": -5}'}
    answered = client.responses.create(
        model=model_name, previous_response_id=called.id, input=[result], tools=[WEATHER],
        tool_choice="none", temperature=0, max_output_tokens=16,
    )  # fmt: skip
    assert answered.status in ("completed", "incomplete") and answered.output_text
    assert texts(client, answered.id) == [
        ("user", "What is the weather in Moscow?"),
        ("function_call", call.call_id),
        ("function_call_output", '{"temperature": -5}'),
    ]
    # The chain renders as the same turns sent in one request do: the same prompt.
    call_item = {
        "type": "function_call",
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments,
    }
    whole = client.responses.create(
        model=model_name, input=[{"role": "user", "content": "What is the weather in Moscow?"}, call_item, result],
        tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=16,
    )  # fmt: skip
    assert answered.usage.input_tokens == whole.usage.input_tokens
    assert answered.output_text == whole.output_text


def test_langchain_continues_by_previous_response_id(
    conversations: Stack, client: openai.OpenAI, model_name: str
) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{conversations.api_url}/v1", api_key=KEY_A, model=model_name, temperature=0,
        max_tokens=8, use_responses_api=True, use_previous_response_id=True,
    )  # type: ignore[call-arg]  # fmt: skip
    history: list[Any] = [HumanMessage("My name is Ada.")]
    reply = llm.invoke(history)
    history += [reply, HumanMessage("What is my name?")]
    second = llm.invoke(history)
    stored = client.responses.retrieve(second.response_metadata["id"])
    # LangChain sent only the new message, and the service the turns before it.
    assert stored.previous_response_id == reply.response_metadata["id"]
    assert [role for role, _ in texts(client, stored.id)] == ["user", "assistant", "user"]
