"""Rendering a conversation into prompt tokens with the model's own chat template."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from jinja2 import TemplateError

from model.types import ChatMessage

# Meta's Llama-3 Instruct template, used when a tokenizer ships none (e.g. a bare tokenizer.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# OpenAI's newer "developer" role means what "system" means to Llama-3-era templates.
ROLE_ALIASES = {"developer": "system"}

# Tokens that end an assistant turn across the chat formats Llama-family models use. Models often
# declare only <|end_of_text|> as EOS while their template ends turns with <|eot_id|>.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>")


# Tool calling as Meta's Llama-3.1 JSON format words it, for templates without a tool section (the
# production Llama-3 8B's, SmolLM2's): tools go into the system turn, calls are written back as the
# JSON the model was asked for, results come back in the turn Llama-3.1 gives them ("ipython").
# The API constrains calls to exactly this shape (api/serving/tools.py), so what a model reads in its
# history is what it writes.
TOOL_PROMPT = (
    "You have access to the following functions. To call a function, respond with JSON for a "
    'function call in the format {"name": function name, "parameters": dictionary of argument '
    'name and its value}. To call several, separate the calls with "; ". Do not use variables.'
)
CALL_SEPARATOR = "; "


def render_prompt(
    tokenizer: Any, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = ()
) -> list[int]:
    """Token ids of the conversation followed by the assistant's generation header.

    `tools` are OpenAI function tools ({"type": "function", "function": {...}}). A template with
    its own tool section (Llama-3.1's and later) renders them and the history's calls and results
    itself; any other template, or one that refuses the conversation (Llama-3.1's takes one call
    per turn), gets them as plain turns written in TOOL_PROMPT's format.

    Text in a message that spells a control token (`<|eot_id|>`, `<|start_header_id|>`, ...) is
    encoded as plain text; only the tokens the template itself writes are control tokens, so a
    user cannot forge turns. transformers does this with `sanitize_control_tokens`; the llama.cpp
    workers' ChatTokenizer marks message content only, so a conversation whose tool definitions,
    call names, ids or arguments spell a control token takes the plain path, where they are
    content too.
    """
    template = tokenizer.chat_template or LLAMA3_CHAT_TEMPLATE
    uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)
    native = [_native(m) for m in messages] if uses_tools and _has_tool_section(template) else None
    if native is not None and not _spells_control_token(tokenizer, native, tools):
        try:
            # None, not []: a template tests `tools is not none` before writing its tool section.
            return _apply(tokenizer, template, native, list(tools) or None)
        except (TemplateError, ValueError):  # raise_exception raises one or the other per renderer
            pass  # e.g. "This model only supports single tool-calls at once!"
    if uses_tools:
        return _apply(tokenizer, template, _plain(messages, tools, template), None)
    conversation = [{"role": ROLE_ALIASES.get(m.role, m.role), "content": m.content} for m in messages]
    return _apply(tokenizer, template, conversation, None)


def _apply(
    tokenizer: Any, template: str, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[int]:
    ids = tokenizer.apply_chat_template(
        conversation,
        tools=tools,
        chat_template=template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    return [int(i) for i in ids]


def _has_tool_section(template: str) -> bool:
    return "tools" in template and "tool_calls" in template


def _spells_control_token(tokenizer: Any, conversation: list[dict[str, Any]], tools: Sequence[Any]) -> bool:
    """Whether anything the template gets (names, ids, arguments once parsed, so with JSON
    escapes undone, tool definitions) spells a control token."""
    text = json.dumps([conversation, list(tools)], ensure_ascii=False)
    return any(token in text for token in _control_tokens(tokenizer))


def _control_tokens(tokenizer: Any) -> list[str]:
    decoder = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return [t.content for t in decoder.values() if t.special and not t.content.isspace()]


def _native(message: ChatMessage) -> dict[str, Any]:
    """A turn as Hugging Face chat templates take it (arguments as objects, not JSON text)."""
    turn: dict[str, Any] = {"role": ROLE_ALIASES.get(message.role, message.role), "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": json.loads(c.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _plain(
    messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]], template: str
) -> list[dict[str, Any]]:
    """The conversation with tools, calls and results as ordinary turns (TOOL_PROMPT's format)."""
    result_role = "ipython" if "<|start_header_id|>" in template else "tool"
    turns: list[dict[str, Any]] = []
    for m in messages:
        content = m.content
        if m.tool_calls:
            calls = CALL_SEPARATOR.join(
                json.dumps({"name": c.name, "parameters": json.loads(c.arguments)}, ensure_ascii=False)
                for c in m.tool_calls
            )
            content = f"{content}\n{calls}" if content else calls
        role = result_role if m.role == "tool" else ROLE_ALIASES.get(m.role, m.role)
        turns.append({"role": role, "content": content})
    if tools:
        listing = "\n\n".join(json.dumps(t, ensure_ascii=False, indent=4) for t in tools)
        prompt = f"{TOOL_PROMPT}\n\n{listing}"
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


def end_of_turn_ids(tokenizer: Any, declared: Iterable[int]) -> frozenset[int]:
    """Every token id that ends the assistant's turn: those the model declares as EOS, the
    tokenizer's EOS, and every end-of-turn token its vocabulary has."""
    ids = {int(i) for i in declared}
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return frozenset(ids)


# --- truncation: "auto" ---------------------------------------------------------------------
# A conversation too long for its model (a Responses chain continued by previous_response_id)
# may be cut at its oldest turns: its leading system turns (the instructions) stay, and so does a
# suffix that is a conversation on its own: one that does not open with a tool result, whose call
# would then be gone. The last turn (the new input) always stays.

M = TypeVar("M", bound="HasRole")


class HasRole(Protocol):
    @property
    def role(self) -> str: ...


def _head_length(messages: Sequence[HasRole]) -> int:
    head = 0
    while head < len(messages) - 1 and messages[head].role in ("system", "developer"):
        head += 1
    return head


def truncated(messages: Sequence[M], fits: Callable[[list[M]], bool]) -> list[M] | None:
    """The conversation with the fewest oldest turns dropped that `fits`, or None if even the
    head and the last turn do not. `fits` is taken to be monotone: dropping more never makes a
    conversation that fitted stop fitting; it is called O(log n) times (a render each, on a worker)."""
    head = _head_length(messages)
    starts = [p for p in range(head, len(messages)) if messages[p].role != "tool"]
    if not starts:  # only tool results after the head: no cut leaves a well-formed conversation
        starts = [len(messages) - 1]

    def cut(p: int) -> list[M]:
        return [*messages[:head], *messages[p:]]

    low, high = 0, len(starts) - 1
    if not fits(cut(starts[high])):
        return None
    while low < high:  # the first start whose cut fits
        middle = (low + high) // 2
        if fits(cut(starts[middle])):
            high = middle
        else:
            low = middle + 1
    return cut(starts[low])
