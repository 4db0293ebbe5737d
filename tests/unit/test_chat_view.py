"""The chat completion's two renderings of one fold (api/chat_completion/serving.py): a table of
event sequences, each folded into the blocking answer and into SSE lines, and the answer equals
what a client assembles from the stream: text, tool calls, logprobs, finish_reason and usage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from api import errors
from api.chat_completion.serving import ChatStream, ChatView
from tasks import events

JOB = "chatcmpl-fold"
CALLS = (
    '{"name": "get_weather", "parameters": {"city": "Москва", "days": 3}}; {"name": "noop", "parameters": {}}'
)


def entry(token: str, logprob: float) -> events.TokenLogprob:
    data = list(token.encode())
    top = [events.TopLogprob(token=token, bytes=data, logprob=logprob)]
    return events.TokenLogprob(token=token, bytes=data, logprob=logprob, top_logprobs=top)


def finished(reason: events.FinishReason = "stop", *choices: events.FinishReason) -> events.Finished:
    return events.Finished(finish_reason=reason, prompt_tokens=7, completion_tokens=5, choices=list(choices))


STARTED = events.Started(prompt_tokens=7, worker="w1")


@dataclass
class Case:
    events: list[events.AnyEvent]
    n: int = 1
    tools: bool = False
    logprobs: bool = False
    # What the fold must come to, so that a stream and an answer that agree on nothing fail too.
    finish: list[str] = field(default_factory=lambda: ["stop"])
    error: str | None = None  # the error code, for a job that ends without an answer


FOLDS = {
    "plain text": Case([STARTED, events.Delta(text="При"), events.Delta(text="вет"), finished()]),
    "n=2 interleaved": Case(
        [
            STARTED,
            events.Delta(text="Один", index=0),
            events.Delta(text="Два", index=1),
            events.Delta(text=", три", index=1),
            events.Delta(text=", четыре", index=0),
            finished("stop", "stop", "length"),
        ],
        n=2,
        finish=["stop", "length"],
    ),
    "tool calls": Case(
        [STARTED, *(events.Delta(text=CALLS[i : i + 9]) for i in range(0, len(CALLS), 9)), finished()],
        tools=True,
        finish=["tool_calls"],
    ),
    "text with tools offered": Case(
        [STARTED, events.Delta(text="Не {знаю}"), finished()], tools=True, finish=["stop"]
    ),
    "logprobs": Case(
        [
            STARTED,
            events.Delta(text="При", logprobs=[entry("П", -0.5), entry("ри", -0.25)]),
            # The first byte of an emoji: its entry travels with no text of its own.
            events.Delta(text="", logprobs=[entry("\ufffd", -1.0)]),
            events.Delta(text="🚀", logprobs=[entry("\ufffd", -0.1)]),
            finished(),
        ],
        logprobs=True,
    ),
    "logprobs on calls, n=2": Case(
        [
            STARTED,
            events.Delta(text=CALLS[:30], index=0, logprobs=[entry("a", -0.1)]),
            events.Delta(text="Нет", index=1, logprobs=[entry("Нет", -0.2)]),
            events.Delta(text=CALLS[30:], index=0, logprobs=[entry("b", -0.3)]),
            finished("stop", "stop", "stop"),
        ],
        n=2,
        tools=True,
        logprobs=True,
        finish=["tool_calls", "stop"],
    ),
    "error mid-stream": Case(
        [STARTED, events.Delta(text="Нача"), events.Failed(code="worker_lost", message="The worker died.")],
        error="worker_lost",
    ),
    "cancelled": Case([STARTED, events.Delta(text="x"), finished("cancelled")], error="service_unavailable"),
    "length": Case([STARTED, events.Delta(text="Долгий ответ"), finished("length")], finish=["length"]),
    "time limit": Case([STARTED, events.Delta(text="Долгий"), finished("time_limit")], finish=["length"]),
}


def view(case: Case) -> ChatView:
    return ChatView(JOB, 1700000000, "m", with_tools=case.tools, n=case.n, logprobs=case.logprobs)


def blocking(case: Case) -> dict[str, Any]:
    """The answer as ChatRun.complete() folds it; an error as its body."""
    answer = view(case)
    try:
        for event in case.events:
            answer.apply(event)
    except errors.APIError as exc:
        return exc.body()
    assert answer.completion is not None
    return answer.completion.model_dump(mode="json")


def streamed(case: Case, include_usage: bool) -> list[str]:
    """The SSE lines as ChatRun.stream() renders them."""
    out = ChatStream(view(case), include_usage=include_usage)
    lines = out.opening()
    for event in case.events:
        assert not out.ended, "no line after the stream's end"
        lines += out.lines(event)
    assert out.ended
    return lines


def assemble(lines: list[str], n: int, include_usage: bool) -> dict[str, Any]:
    """What an OpenAI client rebuilds from the stream, in the blocking answer's shape."""
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    payloads = [line.removeprefix("data: ").removesuffix("\n\n") for line in lines]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    chunks = [json.loads(p) for p in payloads[:-1]]
    if "error" in chunks[-1]:
        return chunks[-1]  # in-band, after whatever came before it
    choices: list[dict[str, Any]] = [
        {"content": "", "calls": {}, "logprobs": None, "finish_reason": None} for _ in range(n)
    ]
    usage = None
    for number, chunk in enumerate(chunks):
        assert (chunk["object"], chunk["id"], chunk["model"]) == ("chat.completion.chunk", JOB, "m")
        assert ("usage" in chunk) == include_usage  # null on every chunk but the last, when asked
        if not chunk["choices"]:
            assert include_usage and number == len(chunks) - 1, "the usage chunk is the last"
            usage = chunk["usage"]
            continue
        [piece] = chunk["choices"]
        choice, delta = choices[piece["index"]], piece["delta"]
        assert choice["finish_reason"] is None, "nothing after a choice's finish chunk"
        # The role once, on each choice's first chunk, which says nothing else.
        assert ("role" in delta) == (number < n)
        assert number >= n or delta == {"role": "assistant", "content": ""}
        choice["content"] += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] == len(choice["calls"]) and call["type"] == "function"
                choice["calls"][call["index"]] = {**call, "function": dict(call["function"])}
                del choice["calls"][call["index"]]["index"]
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                choice["calls"][call["index"]]["function"]["arguments"] += call["function"]["arguments"]
        if piece.get("logprobs") is not None:
            choice["logprobs"] = choice["logprobs"] or {"content": [], "refusal": None}
            choice["logprobs"]["content"] += piece["logprobs"]["content"]
        choice["finish_reason"] = piece["finish_reason"]
    answer = {
        "id": chunks[0]["id"],
        "created": chunks[0]["created"],
        "model": chunks[0]["model"],
        "choices": [
            {
                "index": i,
                "finish_reason": c["finish_reason"],
                "content": c["content"],
                "tool_calls": list(c["calls"].values()) or None,
                "logprobs": c["logprobs"],
            }
            for i, c in enumerate(choices)
        ],
    }
    return {**answer, "usage": usage} if include_usage else answer


def comparable(answer: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    """The blocking answer with what the stream also says, in the same places."""
    choices = [
        {
            "index": c["index"],
            "finish_reason": c["finish_reason"],
            # A choice that made calls has content None; its stream said "" (the role chunk's).
            "content": c["message"]["content"] or "",
            "tool_calls": c["message"].get("tool_calls"),
            "logprobs": c["logprobs"],
        }
        for c in answer["choices"]
    ]
    out = {"id": answer["id"], "created": answer["created"], "model": answer["model"], "choices": choices}
    return {**out, "usage": answer["usage"]} if include_usage else out


@pytest.mark.parametrize("include_usage", [False, True], ids=["", "usage"])
@pytest.mark.parametrize("name", list(FOLDS))
def test_the_blocking_answer_is_what_the_stream_assembles_to(name: str, include_usage: bool) -> None:
    case = FOLDS[name]
    answer = blocking(case)
    got = assemble(streamed(case, include_usage), case.n, include_usage)
    if case.error is not None:
        assert answer["error"]["code"] == case.error
        assert got == answer  # the same error, in-band
        return
    assert "error" not in answer
    assert got == comparable(answer, include_usage)
    assert [c["finish_reason"] for c in answer["choices"]] == case.finish
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_the_table_says_what_each_fold_comes_to() -> None:
    """The expectations the table's comparisons rest on, so that an empty fold cannot pass."""
    texts = {name: blocking(case) for name, case in FOLDS.items() if case.error is None}
    assert texts["plain text"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Привет",
        "refusal": None,
    }
    assert [c["message"]["content"] for c in texts["n=2 interleaved"]["choices"]] == [
        "Один, четыре",
        "Два, три",
    ]
    calls = texts["tool calls"]["choices"][0]["message"]
    assert calls["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls["tool_calls"]] == [
        ("get_weather", {"city": "Москва", "days": 3}),
        ("noop", {}),
    ]
    assert texts["text with tools offered"]["choices"][0]["message"]["content"] == "Не {знаю}"
    entries = texts["logprobs"]["choices"][0]["logprobs"]["content"]
    assert [e["logprob"] for e in entries] == [-0.5, -0.25, -1.0, -0.1]
    assert [len(c["logprobs"]["content"]) for c in texts["logprobs on calls, n=2"]["choices"]] == [2, 1]
    assert texts["length"]["choices"][0]["message"]["content"] == "Долгий ответ"


def test_an_error_following_the_job_goes_in_band_then_done() -> None:
    out = ChatStream(view(FOLDS["plain text"]), include_usage=False)
    timeout = errors.Timeout("The request timed out.")
    lines = out.opening() + out.lines(STARTED) + out.lines(events.Delta(text="При")) + out.failed(timeout)
    assert out.ended
    assert assemble(lines, 1, include_usage=False) == timeout.body()
    assert len(lines) == 4 and json.loads(lines[1].removeprefix("data: "))["choices"][0]["delta"] == {
        "content": "При"
    }
