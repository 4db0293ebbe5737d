"""Stored conversations without a server: truncation's cut (model/chat.py truncated()), a chain
rendered as chat turns and listed as items, the MAX_MESSAGES bound, and input_items pagination
(api/responses/conversations.py)."""

from __future__ import annotations

from typing import Any

import pytest

from api import errors
from api.responses import conversations
from api.responses.protocol import OutputFunctionCall, OutputMessage, OutputText, ResponseCreateRequest
from model.chat import truncated
from tasks import jobs


def msg(role: str, content: str = "", **fields: Any) -> jobs.Message:
    return jobs.Message(role=role, content=content, **fields)


def call_turn(*call_ids: str) -> jobs.Message:
    calls = [jobs.ToolCall(id=c, name="get_weather", arguments='{"city": "Oslo"}') for c in call_ids]
    return msg("assistant", tool_calls=calls)


def roles(messages: list[jobs.Message]) -> list[str]:
    return [m.role for m in messages]


CHAIN = [
    msg("system", "Be brief."),
    msg("user", "one"),
    msg("assistant", "1"),
    msg("user", "two"),
    call_turn("c1", "c2"),
    msg("tool", "sunny", tool_call_id="c1"),
    msg("tool", "rain", tool_call_id="c2"),
    msg("assistant", "2"),
    msg("user", "three"),
]


def test_truncation_keeps_the_head_and_the_fewest_drops_that_fit() -> None:
    assert truncated(CHAIN, lambda m: True) == CHAIN
    assert truncated(CHAIN, lambda m: len(m) <= 7) == [CHAIN[0], *CHAIN[3:]]
    assert truncated(CHAIN, lambda m: len(m) <= 6) == [CHAIN[0], *CHAIN[4:]]
    kept = truncated(CHAIN, lambda m: len(m) <= 5)
    assert kept is not None
    # A cut may not open with the results of a dropped call: past the calls' turn, the next
    # cut is after its results.
    assert [m.content for m in kept] == ["Be brief.", "2", "three"]
    assert truncated(CHAIN, lambda m: len(m) <= 1) is None  # the head and the last turn stay


def test_truncation_never_orphans_a_tool_result_and_keeps_a_last_tool_turn() -> None:
    chain = [msg("user", "weather?"), call_turn("c1"), msg("tool", "sunny", tool_call_id="c1")]
    kept = truncated(chain, lambda m: len(m) <= 2)
    assert kept is not None and roles(kept) == ["assistant", "tool"]
    assert truncated(chain, lambda m: len(m) <= 1) is None


def test_truncation_calls_fits_a_logarithmic_number_of_times() -> None:
    long = [msg("system", "s"), *(msg("user" if i % 2 else "assistant", str(i)) for i in range(1000))]
    calls: list[int] = []

    def fits(m: list[jobs.Message]) -> bool:
        calls.append(len(m))
        return len(m) <= 10

    kept = truncated(long, fits)
    assert kept is not None and len(kept) == 10 and kept[-1] == long[-1]
    assert len(calls) <= 12


def test_a_chain_is_the_earlier_input_without_instructions_and_its_output() -> None:
    request = ResponseCreateRequest.model_validate(
        {
            "instructions": "Answer in French.",
            "input": [
                {"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
        }
    )
    job = request.to_job("resp_1", "m", 16)
    assert job.spec.messages[0] == msg("system", "Answer in French.")
    given = conversations.given(job.spec, job.meta.response or jobs.ResponseOptions())
    assert roles(given) == ["user", "assistant", "tool"]  # the instructions are not carried over
    output = [
        OutputFunctionCall(id="fc_1", call_id="c2", name="f", arguments="{}", status="completed"),
        OutputFunctionCall(id="fc_2", call_id="c3", name="g", arguments='{"a": 1}', status="completed"),
    ]
    [turn] = conversations.answered(output)
    assert turn.role == "assistant" and [c.id for c in turn.tool_calls] == ["c2", "c3"]
    text = conversations.answered(
        [OutputMessage(id="msg_1", status="completed", content=[OutputText(text="Hi")])]
    )
    assert text == [msg("assistant", "Hi")]
    # The next request's job: its own instructions, the chain, then its input.
    follow = ResponseCreateRequest.model_validate({"input": "and tomorrow?", "instructions": "Be brief."})
    history = [*given, turn]
    spec = follow.to_job("resp_2", "m", 16, history=history).spec
    assert spec.messages == [msg("system", "Be brief."), *history, msg("user", "and tomorrow?")]


def test_a_chain_over_max_messages_is_400_unless_truncation_is_auto() -> None:
    history, new = CHAIN[1:], [msg("user", "four")]
    assert conversations.fit_history(history, new, 9, "disabled") == history
    with pytest.raises(errors.ContextLengthExceeded) as caught:
        conversations.fit_history(history, new, 8, "disabled")
    assert caught.value.param == "previous_response_id"
    assert caught.value.code == "context_length_exceeded"
    assert conversations.fit_history(history, new, 3, "auto") == [msg("assistant", "2"), msg("user", "three")]
    with pytest.raises(errors.ContextLengthExceeded):
        conversations.fit_history(history, [msg("user", "a"), msg("user", "b")], 1, "auto")


def test_listed_items_have_openai_types_and_stable_ids() -> None:
    listed = conversations.items("resp_1", CHAIN)
    assert [i.type for i in listed] == [
        "message", "message", "message", "message",
        "function_call", "function_call", "function_call_output", "function_call_output",
        "message", "message",
    ]  # fmt: skip
    assert [getattr(i, "role", None) for i in listed[:3]] == ["system", "user", "assistant"]
    assert listed[2].model_dump()["content"][0]["type"] == "output_text"
    assert listed[1].model_dump()["content"][0] == {"type": "input_text", "text": "one"}
    assert [getattr(i, "call_id", None) for i in listed[4:8]] == ["c1", "c2", "c1", "c2"]
    assert listed[4].id.startswith("fc_") and listed[6].id.startswith("fco_")
    assert len({i.id for i in listed}) == len(listed)
    assert [i.id for i in conversations.items("resp_1", CHAIN)] == [i.id for i in listed]
    assert conversations.items("resp_2", CHAIN)[0].id != listed[0].id


def test_pages_follow_openai_cursors() -> None:
    listed = conversations.items("resp_1", CHAIN)
    ids = [i.id for i in listed]
    first = conversations.page(listed, limit=4, order="desc")
    assert [i.id for i in first.data] == ids[::-1][:4]
    assert (first.first_id, first.last_id, first.has_more) == (ids[-1], ids[-4], True)
    rest = conversations.page(listed, limit=100, order="desc", after=first.last_id)
    assert [i.id for i in rest.data] == ids[::-1][4:] and not rest.has_more
    asc = conversations.page(listed, limit=3, order="asc", after=ids[0], before=ids[3])
    assert [i.id for i in asc.data] == ids[1:3] and not asc.has_more
    empty = conversations.page(listed, limit=5, order="asc", after=ids[-1])
    assert (empty.data, empty.first_id, empty.last_id, empty.has_more) == ([], None, None, False)
    with pytest.raises(errors.InvalidRequest) as caught:
        conversations.page(listed, limit=5, order="asc", after="msg_nope")
    assert caught.value.param == "after"
