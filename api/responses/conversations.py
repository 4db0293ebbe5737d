"""Stored conversations: what a response was given and what it answered, as chat turns to continue
it (previous_response_id) and as the items GET /v1/responses/{id}/input_items lists.

A response's job record already holds everything (tasks/jobs.py): its spec's messages are the
whole conversation it was given, the one it continued included, already rendered as chat turns
(function calls and their outputs too), and its event log is its output. So a stored response
needs nothing written beside them, and continuing one reads one record and one log: the chain is
flattened at each turn, never walked. That keeps a continuation one read however long the chain
is, and each response self-contained for its JOB_TTL_SECONDS, whichever of its predecessors has
expired or been deleted since. The price is that each turn's record repeats the turns before it;
MAX_MESSAGES bounds how many (fit_history()), as it bounds one request's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from api import errors
from api.responses.protocol import (
    FunctionCallOutput,
    InputText,
    ListedItem,
    OutputFunctionCall,
    OutputMessage,
    OutputText,
    ResponseItemList,
    StoredInputMessage,
)
from model.chat import truncated
from tasks import jobs


def given(spec: jobs.JobSpec, options: jobs.ResponseOptions) -> list[jobs.Message]:
    """The conversation a response was given, without its instructions (which a continuation does
    not carry over, as OpenAI documents): its spec's messages but the instructions' system turn."""
    return spec.messages[1:] if options.instructions else list(spec.messages)


def answered(output: Sequence[OutputMessage | OutputFunctionCall]) -> list[jobs.Message]:
    """A response's output as chat turns: its message an assistant turn, its calls one assistant
    turn with those calls, as api/responses/protocol.py renders such items within one request."""
    messages: list[jobs.Message] = []
    for item in output:
        if isinstance(item, OutputMessage):
            messages.append(jobs.Message(role="assistant", content="".join(p.text for p in item.content)))
        else:
            call = jobs.ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)
            if messages and messages[-1].tool_calls:
                messages[-1].tool_calls.append(call)
            else:
                messages.append(jobs.Message(role="assistant", content="", tool_calls=[call]))
    return messages


def fit_history(
    history: list[jobs.Message], new: list[jobs.Message], room: int, truncation: Literal["auto", "disabled"]
) -> list[jobs.Message]:
    """The history that goes before `new` within `room` messages (MAX_MESSAGES, less the
    instructions' turn): all of it, or under truncation "auto" the most recent whole turns that
    fit. Without it a conversation over the bound is a 400, as one that outgrows the model's context."""
    if len(history) + len(new) <= room:
        return history
    if truncation == "auto":
        kept = truncated([*history, *new], lambda m: len(m) <= room)
        if kept is not None and kept[-len(new) :] == new:
            return kept[: len(kept) - len(new)]
    raise errors.ContextLengthExceeded(
        f"The conversation has {len(history) + len(new)} messages; at most {room} are allowed. "
        "Send truncation: 'auto' to drop its oldest turns.",
        param="previous_response_id",
    )


def _item_id(prefix: str, response_id: str, index: int) -> str:
    """An item's id, the same every time the response's items are listed."""
    return prefix + hashlib.sha256(f"{response_id}:{index}".encode()).hexdigest()[:32]


def items(response_id: str, messages: Sequence[jobs.Message]) -> list[ListedItem]:
    """Chat turns as the input items OpenAI lists, oldest first: a turn with calls is one
    function_call item per call, a tool turn a function_call_output."""
    out: list[ListedItem] = []
    for message in messages:
        if message.tool_calls:
            for call in message.tool_calls:
                item_id = _item_id("fc_", response_id, len(out))
                out.append(
                    OutputFunctionCall(
                        id=item_id,
                        call_id=call.id,
                        name=call.name,
                        arguments=call.arguments,
                        status="completed",
                    )
                )
        elif message.role == "tool":
            item_id = _item_id("fco_", response_id, len(out))
            out.append(
                FunctionCallOutput(id=item_id, call_id=message.tool_call_id or "", output=message.content)
            )
        elif message.role == "assistant":
            item_id = _item_id("msg_", response_id, len(out))
            content = [OutputText(text=message.content)]
            out.append(OutputMessage(id=item_id, status="completed", content=content))
        else:
            item_id = _item_id("msg_", response_id, len(out))
            text = [InputText(type="input_text", text=message.content)]
            out.append(StoredInputMessage(id=item_id, role=message.role, content=text))  # type: ignore[arg-type]
    return out


def page(
    listed: list[ListedItem],
    *,
    limit: int,
    order: Literal["asc", "desc"],
    after: str | None = None,
    before: str | None = None,
) -> ResponseItemList:
    """One page of a response's items, as OpenAI's cursor pagination: in `order`, those after the
    item `after` and before the item `before` (unknown ids: 400 naming them), at most `limit`."""
    ordered = listed if order == "asc" else listed[::-1]
    ids = [item.id for item in ordered]
    start, end = 0, len(ordered)
    if after is not None:
        if after not in ids:
            raise errors.InvalidRequest(f"No item with id '{after[:80]}' in this response.", param="after")
        start = ids.index(after) + 1
    if before is not None:
        if before not in ids:
            raise errors.InvalidRequest(f"No item with id '{before[:80]}' in this response.", param="before")
        end = ids.index(before)
    data = ordered[start:end][:limit]
    return ResponseItemList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=start + len(data) < end,
    )
