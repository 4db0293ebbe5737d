"""POST /v1/chat/completions end to end: API -> Celery -> worker (SmolLM2) -> pub/sub -> client."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from model.loading import llama_cpp_installed
from tests.integration.conftest import Stack

CYRILLIC = re.compile("[а-яА-ЯёЁ]")


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order; comments and blank lines skipped."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def greedy(client: openai.OpenAI, model: str, content: str, max_tokens: int = 24, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        **kw,
    )


def streamed_text(
    client: openai.OpenAI, model: str, content: str, max_tokens: int = 24, **kw: Any
) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        **kw,
    ):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


# --- the seed's two curl examples, byte for byte the same bodies -----------------------------


def test_seed_blocking_example_answers_in_russian(stack: Stack) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Ты полезный помощник."},
            {"role": "user", "content": "Расскажи про космос кратко."},
        ],
        "stream": False,
    }
    r = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert CYRILLIC.search(choice["message"]["content"]), choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_seed_streaming_example_streams_clean_chunks(stack: Stack) -> None:
    body = {"messages": [{"role": "user", "content": "Напиши поэму."}], "stream": True}
    with httpx.stream("POST", f"{stack.api_url}/v1/chat/completions", json=body, timeout=600) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert all("\ufffd" not in piece for piece in contents)
    assert CYRILLIC.search("".join(contents))
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


# --- through the official client ---------------------------------------------------------------


def test_blocking_completion_with_openai_client(client: openai.OpenAI, model_name: str) -> None:
    resp = greedy(client, model_name, "What is the capital of France?", max_tokens=8)
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == model_name
    assert resp.choices[0].message.content
    assert resp.usage is not None
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 8
    assert resp.usage.completion_tokens <= 8


def test_streamed_text_equals_blocking_text_under_greedy(client: openai.OpenAI, model_name: str) -> None:
    prompt = "Name three planets of the solar system."
    blocking = greedy(client, model_name, prompt, max_tokens=24)
    text, reason = streamed_text(client, model_name, prompt, max_tokens=24)
    assert text == blocking.choices[0].message.content
    assert reason == blocking.choices[0].finish_reason


def test_stream_usage_chunk_when_asked(client: openai.OpenAI, model_name: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.prompt_tokens > 0
    assert 0 < last.usage.completion_tokens <= 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, model_name: str) -> None:
    def sample(seed: int) -> str:
        resp = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": "Write a word."}],
            temperature=1.0,
            top_p=1.0,
            max_tokens=16,
            seed=seed,
        )
        return resp.choices[0].message.content or ""

    first, again, other = sample(1234), sample(1234), sample(99)
    assert first == again
    assert first != other  # 16 tokens at temperature 1 from a 49k vocabulary


def test_stop_string_cuts_the_answer_blocking_and_streamed(client: openai.OpenAI, model_name: str) -> None:
    prompt = "Count from one to ten in words."
    full = greedy(client, model_name, prompt, max_tokens=32).choices[0].message.content or ""
    assert len(full) > 12, full
    stop = full[6:10]
    expected = full[: full.index(stop)]
    blocking = greedy(client, model_name, prompt, max_tokens=32, stop=[stop, "zzzz-never"])
    assert blocking.choices[0].message.content == expected
    assert blocking.choices[0].finish_reason == "stop"
    text, reason = streamed_text(client, model_name, prompt, max_tokens=32, stop=stop)
    assert (text, reason) == (expected, "stop")


def test_max_completion_tokens_and_length_reason(client: openai.OpenAI, model_name: str) -> None:
    resp = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Tell me a long story about a dragon."}],
        temperature=0,
        max_completion_tokens=5,
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


def test_content_parts_and_developer_role_mean_the_same(client: openai.OpenAI, model_name: str) -> None:
    plain = client.chat.completions.create(
        model=model_name,
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is two plus two?"},
        ],
        temperature=0,
        max_tokens=12,
    )
    parts = client.chat.completions.create(
        model=model_name,
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "You answer briefly."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is two "}, {"type": "text", "text": "plus two?"}],
            },
        ],
        temperature=0,
        max_tokens=12,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content
    assert parts.usage == plain.usage


def test_concurrent_requests_all_complete(client: openai.OpenAI, model_name: str) -> None:
    prompts = [f"Write the number {i} in words." for i in range(4)]
    sequential = [greedy(client, model_name, p, max_tokens=8).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: greedy(client, model_name, p, max_tokens=8), prompts))
    assert len({r.id for r in results}) == len(prompts)
    # Each answer is its own prompt's, as it is alone: none lost, swapped or mixed.
    assert all(sequential)
    assert [r.choices[0].message.content for r in results] == sequential


def test_unknown_harmless_fields_are_ignored(stack: Stack) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "some_future_field": {"x": 1},
        "n": 1,
        "logprobs": False,
        "user": "tester",
        "presence_penalty": 0,
    }
    r = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


# --- errors --------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "Hi"}]
INVALID: list[tuple[str, Any, int, str | None, str | None]] = [
    # (case, body, status, param, code)
    ("not json", b"{bad json", 400, None, "invalid_json"),
    ("json array", [1, 2], 400, None, "invalid_json"),
    ("no messages", {}, 400, "messages", "missing_required_parameter"),
    ("empty messages", {"messages": []}, 400, "messages", "invalid_value"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    (
        "tool turn without its call",
        {"messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages[0]",
        "invalid_value",
    ),
    (
        "no content",
        {"messages": [{"role": "user"}]},
        400,
        "messages[0].content",
        "missing_required_parameter",
    ),
    (
        "number content",
        {"messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
        "invalid_value",
    ),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
        "invalid_value",
    ),
    ("temperature high", {"messages": MSG, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("temperature negative", {"messages": MSG, "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ("top_p zero", {"messages": MSG, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("top_p above one", {"messages": MSG, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("max_tokens zero", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max_tokens text", {"messages": MSG, "max_tokens": "many"}, 400, "max_tokens", "invalid_value"),
    (
        "max_completion_tokens negative",
        {"messages": MSG, "max_completion_tokens": -1},
        400,
        "max_completion_tokens",
        "invalid_value",
    ),
    ("five stops", {"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("empty stop", {"messages": MSG, "stop": [""]}, 400, "stop", "invalid_value"),
    ("stream not bool", {"messages": MSG, "stream": "yes please"}, 400, "stream", "invalid_value"),
    ("n above MAX_N", {"messages": MSG, "n": 99}, 400, "n", "invalid_value"),
    (
        "functions",  # tools' deprecated forerunner
        {"messages": MSG, "functions": [{"name": "f", "parameters": {}}]},
        400,
        "functions",
        "unsupported_parameter",
    ),
    ("logprobs not bool", {"messages": MSG, "logprobs": "some"}, 400, "logprobs", "invalid_value"),
    (
        "unknown response format",
        {"messages": MSG, "response_format": {"type": "xml"}},
        400,
        "response_format",
        "invalid_value",
    ),
    (
        "penalty out of range",
        {"messages": MSG, "frequency_penalty": 2.5},
        400,
        "frequency_penalty",
        "invalid_value",
    ),
    (
        "audio out",
        {"messages": MSG, "modalities": ["text", "audio"]},
        400,
        "modalities",
        "unsupported_parameter",
    ),
    ("unknown model", {"messages": MSG, "model": "gpt-5"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("case", "body", "status", "param", "code"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests_get_openai_errors(
    stack: Stack, case: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    for stream in (False, True):
        if isinstance(body, dict) and stream:
            payload: dict[str, Any] = {"content": json.dumps({"stream": True, **body}).encode()}
        elif isinstance(body, bytes):
            payload = {"content": body}
        else:
            payload = {"content": json.dumps(body).encode()}
        r = httpx.post(
            f"{stack.api_url}/v1/chat/completions",
            headers={"content-type": "application/json"},
            timeout=30,
            **payload,
        )
        assert r.status_code == status, (case, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["code"]) == (param, code), case
        assert error["message"] and "Traceback" not in error["message"] and "/" not in error["message"]


def test_openai_client_raises_typed_errors(client: openai.OpenAI, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_name, messages=MSG, temperature=5)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MSG)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_400(stack: Stack, stream: bool) -> None:
    # SmolLM2's context is 8192 tokens; this is well beyond it in any tokenization.
    body = {"messages": [{"role": "user", "content": "слово " * 9000}], "stream": stream}
    r = httpx.post(f"{stack.api_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "8192" in error["message"]


# --- models and health ---------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI, model_name: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model_name]
    card = client.models.retrieve(model_name)
    assert (card.id, card.object, card.owned_by) == (model_name, "model", "llmq") and card.created > 0
    # The extension, fenced under `llmq`, as the SDK keeps unknown fields.
    assert card.llmq["workers"] >= 1 and card.llmq["slots"] >= 1 and card.llmq["context_length"] == 8192  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_reports_the_ready_worker(stack: Stack, model_name: str) -> None:
    r = httpx.get(f"{stack.api_url}/health", timeout=5)
    assert r.status_code == 200
    workers = r.json()["workers"]
    model = r.json()["models"][model_name]
    assert (model["ready"], model["workers"]) == (True, [w["name"] for w in workers])
    assert workers and workers[0]["model"] == model_name
    assert workers[0]["device"] == "cpu"
    # The embedded model is a GGUF: ENGINE=auto runs it on llama.cpp wherever that is installed.
    assert workers[0]["engine"] == ("llama.cpp" if llama_cpp_installed() else "transformers")


def test_unknown_route_is_404_in_error_shape(stack: Stack) -> None:
    r = httpx.get(f"{stack.api_url}/v1/nothing-here", timeout=5)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
