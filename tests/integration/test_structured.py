"""Structured outputs through real clients on the embedded SmolLM2: the SDK's
`chat.completions.parse` with a Pydantic model, LangChain's `with_structured_output`, json_object,
streamed, the Responses API's `text.format`, and many sampled generations against a table of
schemas, every one valid."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import Stack


class City(BaseModel):
    name: str = Field(max_length=40)
    country: Literal["Russia", "France", "Japan", "Other"]
    is_capital: bool


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.parse(
        model=model_name,
        messages=[{"role": "user", "content": "Describe Moscow as JSON."}],
        response_format=City,
        max_tokens=100,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert choice.message.parsed.country in ("Russia", "France", "Japan", "Other")


def test_langchain_with_structured_output(stack: Stack, model_name: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{stack.api_url}/v1", api_key="unused", model=model_name, temperature=0, max_tokens=100
    )  # type: ignore[call-arg]
    city = llm.with_structured_output(City, method="json_schema").invoke("Describe Paris as JSON.")
    assert isinstance(city, City)


def test_json_object_streamed_is_one_object(client: openai.OpenAI, model_name: str) -> None:
    stream = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the budget ran out mid-object, as OpenAI's would
        assert finish == "length" and text.startswith("{")


def test_responses_text_format(client: openai.OpenAI, model_name: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["да", "нет"]},
            "уверенность": {"type": "integer", "minimum": 0, "maximum": 10},
        },
        "required": ["answer", "уверенность"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=model_name,
        input="Москва — столица России?",
        text={"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)


TABLE: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["n"],
    },
    {"type": "array", "items": {"enum": ["красный", "green", "синий"]}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
        },
        "required": ["name", "tags"],
        "additionalProperties": False,
    },
    {"anyOf": [{"type": "boolean"}, {"type": "string", "pattern": "^[A-Z]{2,4}$"}]},
    {
        "$defs": {
            "p": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "type": "array",
        "items": {"$ref": "#/$defs/p"},
        "maxItems": 2,
    },
]


def test_a_hundred_sampled_generations_all_follow_their_schema(
    client: openai.OpenAI, model_name: str
) -> None:
    def one(i: int) -> tuple[dict[str, Any], str, str | None]:
        schema = TABLE[i % len(TABLE)]
        completion = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": f"Answer {i} in JSON, please."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "t", "schema": schema, "strict": True},
            },
            max_tokens=120,
            temperature=1.0,
            seed=i,
        )
        choice = completion.choices[0]
        return schema, choice.message.content or "", choice.finish_reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(100)))
    finished = [(schema, text) for schema, text, reason in results if reason == "stop"]
    assert len(finished) >= 90, [r for r in results if r[2] != "stop"][:3]  # bounded schemas close
    for schema, text in finished:
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}},
        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        {"type": "xml"},
    ],
    ids=["unsupported-keyword", "no-name", "unknown-type"],
)
def test_a_schema_the_server_cannot_follow_is_refused_before_queueing(
    stack: Stack, response_format: dict[str, Any]
) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "response_format": response_format}
    r = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format"
