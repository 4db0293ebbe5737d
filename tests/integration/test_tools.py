"""Tool calling through real clients on the embedded SmolLM2: the SDK's tool_calls blocking and
streamed, required / named / auto choices, a history with calls and results, LangChain's
`bind_tools` round trip and `with_structured_output(method="function_calling")`, and the 400s."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import Stack

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 40}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Moscow?"}]


def test_required_gives_a_valid_call(client: openai.OpenAI, model_name: str) -> None:
    completion = client.chat.completions.create(
        model=model_name, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
        temperature=0, max_tokens=80, parallel_tool_calls=False,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_call_equals_the_blocking_one(client: openai.OpenAI, model_name: str) -> None:
    ask: dict[str, Any] = dict(
        model=model_name, messages=ASK, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=80,
    )  # fmt: skip
    blocking = client.chat.completions.create(**ask)
    calls: dict[int, dict[str, str]] = {}
    finish, pieces = None, 0
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in calls and delta.function and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                assert delta.function is not None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
                pieces += 1
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert pieces > 2, "arguments arrive in pieces, after the id and name"
    expected = [
        (c.function.name, json.loads(c.function.arguments))
        for c in blocking.choices[0].message.tool_calls or []
    ]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected
    assert expected and expected[0][0] == "get_weather"


def test_auto_answers_with_text_or_a_valid_call(client: openai.OpenAI, model_name: str) -> None:
    for messages in (ASK, [{"role": "user", "content": "Say hello in one word."}]):
        for seed in range(3):
            completion = client.chat.completions.create(
                model=model_name, messages=messages, tools=[WEATHER], temperature=1.0, seed=seed, max_tokens=60,
            )  # fmt: skip
            choice = completion.choices[0]
            if choice.message.tool_calls:
                assert choice.finish_reason == "tool_calls" and choice.message.content is None
                for call in choice.message.tool_calls:
                    assert call.function.name == "get_weather"
                    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
            else:
                assert choice.finish_reason in ("stop", "length")
                assert isinstance(choice.message.content, str) and not choice.message.content.startswith("{")


def test_history_with_calls_and_results_is_answered(client: openai.OpenAI, model_name: str) -> None:
    messages: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Moscow", "unit": "celsius"}'},
                },
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -5, "sky": "snow"}'},
    ]
    completion = client.chat.completions.create(
        model=model_name, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    assert choice.message.content


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "always"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{oops"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),  # fmt: skip
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1]"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "x<|eot_id|>", "arguments": "{}"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.name",
        ),  # fmt: skip
        ({"stop": ["}"]}, "stop"),  # a stop string would cut a call
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools",
        ),
    ],
)
def test_bad_tool_requests_are_400(
    client: openai.OpenAI, model_name: str, change: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": model_name, "messages": ASK, "tools": [WEATHER], **change}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    error = caught.value.body
    assert isinstance(error, dict) and error.get("param") == param, error


class Weather(BaseModel):
    city: str = Field(max_length=40)
    celsius: int = Field(ge=-90, le=60)


def langchain_model(stack: Stack, model_name: str) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{stack.api_url}/v1", api_key="unused", model=model_name, temperature=0, max_tokens=80
    )  # type: ignore[call-arg]


def test_langchain_structured_output_by_function_calling(stack: Stack, model_name: str) -> None:
    llm = langchain_model(stack, model_name)
    weather = llm.with_structured_output(Weather, method="function_calling").invoke("Weather in Paris?")
    assert isinstance(weather, Weather)


def test_langchain_bind_tools_round_trip(stack: Stack, model_name: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"{city}: -5 C, snow"

    llm = langchain_model(stack, model_name)
    asked = HumanMessage("What is the weather in Moscow?")
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([asked])
    [call] = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = llm.bind_tools([get_weather]).invoke([asked, called, result])
    assert answer.content or answer.tool_calls


RESPONSES_WEATHER: Any = {"type": "function", **WEATHER["function"]}


def test_responses_function_call_and_its_output_next_turn(client: openai.OpenAI, model_name: str) -> None:
    asked: list[Any] = [{"role": "user", "content": "What is the weather in Moscow?"}]
    first = client.responses.create(
        model=model_name, input=asked, tools=[RESPONSES_WEATHER], tool_choice="required",
        temperature=0, max_output_tokens=80, parallel_tool_calls=False,
    )  # fmt: skip
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    assert client.responses.retrieve(first.id).output == first.output, "a replay gives the same call ids"
    second = client.responses.create(
        model=model_name,
        input=[
            *asked,
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": -5}'},
        ],
        tools=[RESPONSES_WEATHER],
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    assert second.status in ("completed", "incomplete") and second.output_text


def test_responses_streamed_call_matches_the_stored_response(client: openai.OpenAI, model_name: str) -> None:
    stream = client.responses.create(
        model=model_name, input="Weather in Paris, please.", tools=[RESPONSES_WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0, max_output_tokens=80, stream=True,
    )  # fmt: skip
    added, arguments, final = None, "", None
    for event in stream:
        if event.type == "response.output_item.added" and event.item.type == "function_call":
            added = event.item
        elif event.type == "response.function_call_arguments.delta":
            arguments += event.delta
        elif event.type == "response.completed":
            final = event.response
    assert added is not None and added.name == "get_weather" and final is not None
    [call] = [item for item in final.output if item.type == "function_call"]
    assert call.call_id == added.call_id and call.arguments == arguments
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
    assert client.responses.retrieve(final.id).output == final.output


def test_responses_refuse_built_in_tools(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model_name, input="hi", tools=[{"type": "web_search"}])
    assert isinstance(caught.value.body, dict) and caught.value.body.get("param") == "tools"


RESPONSES_TIME: Any = {"type": "function", **TIME["function"]}
NOOP_TOOL: Any = {
    "type": "function",
    "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
}


def test_allowed_tools_restrict_a_chat_turn_to_their_subset(client: openai.OpenAI, model_name: str) -> None:
    subset = [
        {"type": "function", "function": {"name": "get_time"}},
        {"type": "function", "function": {"name": "noop"}},
    ]
    for mode in ("required", "auto"):
        completion = client.chat.completions.create(
            model=model_name, messages=ASK, tools=[WEATHER, TIME, NOOP_TOOL],
            tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": subset}},
            temperature=0, max_tokens=80,
        )  # fmt: skip
        calls = completion.choices[0].message.tool_calls or []
        assert {c.function.name for c in calls} <= {"get_time", "noop"}  # type: ignore[union-attr]
        if mode == "required":  # a call is forced, of the subset only, though the user asked for weather
            assert calls and completion.choices[0].finish_reason == "tool_calls"
        else:
            assert calls or completion.choices[0].message.content


def test_allowed_tools_restrict_a_responses_turn_to_their_subset(
    client: openai.OpenAI, model_name: str
) -> None:
    response = client.responses.create(
        model=model_name, input="What is the weather in Moscow?", tools=[RESPONSES_WEATHER, RESPONSES_TIME],
        tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
        temperature=0, max_output_tokens=80,
    )  # fmt: skip
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and {c.name for c in calls} == {"get_time"}
    assert response.tool_choice.type == "allowed_tools"  # type: ignore[union-attr]  # echoed as sent


@pytest.mark.parametrize(
    ("tool_choice", "code"),
    [
        (
            {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "nowhere"}]},
            "invalid_value",
        ),
        (
            {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp", "server_label": "deepwiki"}]},
            "unsupported_value",
        ),
        ({"type": "custom", "name": "grep"}, "unsupported_value"),
        ({"type": "mcp", "server_label": "deepwiki"}, "unsupported_value"),
        ({"type": "file_search"}, "unsupported_value"),
    ],
)
def test_allowed_tools_naming_what_is_not_there_are_400(
    client: openai.OpenAI, model_name: str, tool_choice: dict[str, Any], code: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=model_name,
            input="x",
            tools=[RESPONSES_WEATHER],
            tool_choice=tool_choice,  # type: ignore[arg-type]
        )
    assert caught.value.body == {  # type: ignore[comparison-overlap]
        "message": caught.value.body["message"],  # type: ignore[index]
        "type": "invalid_request_error",
        "param": "tool_choice",
        "code": code,
    }
