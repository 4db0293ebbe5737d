"""Tool calling: the request's function tools and tool_choice, the grammar a call follows, and
the reading of a generation's text back into OpenAI tool calls, whole or as it streams.

The model writes calls in Meta's Llama-3.1 JSON format, `{"name": "f", "parameters": {...}}`,
several separated by "; " (model/chat.py TOOL_PROMPT asks for it, and renders past calls the same
way). Every mode but `none` is grammar-constrained (llguidance, as structured outputs are):

    required / a named function   one call (or several, with parallel_tool_calls) of the allowed
                                  functions, arguments valid against each one's `parameters`
    auto                          that, or plain text that does not start with "{"
    allowed_tools                 auto or required, over the subset of functions it names
    none                          no tools in the prompt, no grammar, plain text

The grammar fixes the call's exact spelling (key order, ", " and ": " separators, as json.dumps
writes them), so reading it back needs no guessing: ToolCallReader walks the text once, and
streams a call's id and name first, then its arguments in pieces, as OpenAI streams them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import llguidance
from pydantic import BaseModel, ConfigDict, Field

from api import errors
from api.serving import structured
from tasks import jobs

# OpenAI's rule for function names; it also keeps names free of JSON escapes in the grammar.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128  # OpenAI's limit
CALL_PREFIX = '{"name": "'
CALL_MIDDLE = '", "parameters": '
CALL_END = "}"
CALL_SEPARATOR = "; "  # model/chat.py CALL_SEPARATOR: the same text both ways
# Arguments as json.dumps writes them, with no whitespace choice left to a model that could pad
# an object with newlines until its tokens run out (as structured outputs, api/serving/structured.py).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # every call is grammar-constrained, strict or not


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


Mode = Literal["none", "auto", "required"]


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its job: the prompt's tools and the grammar calls follow."""

    mode: Mode
    tools: tuple[FunctionTool, ...]
    allowed: tuple[str, ...]  # the functions a call may name (one, for a named tool_choice)
    parallel: bool

    @property
    def calls_possible(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def prompt_tools(self) -> list[dict[str, Any]]:
        """The tools as the prompt shows them (none under tool_choice "none", as vLLM does)."""
        if not self.calls_possible:
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools if t.function.name in self.allowed]

    def grammar(self) -> str | None:
        if not self.calls_possible:
            return None
        by_name = {t.function.name: t.function.parameters or EMPTY_PARAMETERS for t in self.tools}
        schemas = tuple(
            (name, json.dumps(structured.closed(by_name[name]), sort_keys=True, ensure_ascii=False))
            for name in self.allowed
        )
        return _grammar(schemas, self.parallel, self.mode == "auto")


def with_text_grammar(plan: ToolPlan, text_grammar: str | None, param: str) -> str | None:
    """What every token must follow: the tool-call grammar, else the text format's (`param`), which
    cannot also hold while calls are possible (one grammar decides the first character)."""
    if plan.calls_possible and text_grammar is not None:
        raise errors.InvalidRequest(
            f"'{param}' cannot be combined with 'tools' unless tool_choice is 'none'.",
            param=param,
            code="unsupported_parameter",
        )
    return plan.grammar() or text_grammar


def _refuse(message: str, param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param=param, code="invalid_value")


def plan_tools(
    tools: list[FunctionTool] | None, tool_choice: Any, parallel_tool_calls: bool | None
) -> ToolPlan:
    """The request's tools checked (names, schemas, tool_choice) before anything is queued."""
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise _refuse(f"At most {MAX_TOOLS} tools are allowed; got {len(tools)}.", "tools")
    names: list[str] = []
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not NAME_PATTERN.match(name):
            raise _refuse(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'; got '{name[:80]}'.",
                "tools",
            )
        if name in names:
            raise _refuse(f"The tool name '{name}' is used twice.", "tools")
        names.append(name)
        parameters = tool.function.parameters or EMPTY_PARAMETERS
        if parameters.get("type") != "object":
            # A call's arguments are an object (OpenAI requires it); the reader relies on it too.
            raise _refuse(f"tools[{i}].function.parameters must be a schema of type 'object'.", "tools")
        structured.check_schema(parameters, "tools")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    choice = "auto" if tool_choice is None and tools else tool_choice or "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise _refuse(
                f"tool_choice must be 'none', 'auto', 'required' or a function; got '{choice[:40]}'.",
                "tool_choice",
            )
        if choice != "none" and not tools:
            raise _refuse(f"tool_choice '{choice}' needs 'tools'.", "tool_choice")
        result = ToolPlan(choice, tuple(tools), tuple(names), parallel)  # type: ignore[arg-type]
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        mode, allowed = _allowed_choice(choice, names)
        result = ToolPlan(mode, tuple(tools), allowed, parallel)
    else:
        name = _named_choice(choice)
        if name not in names:
            raise _refuse(f"tool_choice names '{str(name)[:64]}', which is not among 'tools'.", "tool_choice")
        result = ToolPlan("required", tuple(tools), (name,), parallel)
    result.grammar()  # compiled now, so a schema llguidance refuses is a 400 before queueing
    return result


def _unsupported(message: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(message, param="tool_choice", code="unsupported_value")


def _allowed_choice(choice: dict[str, Any], names: list[str]) -> tuple[Mode, tuple[str, ...]]:
    """OpenAI's `allowed_tools` choice, in the chat form ({"type": "allowed_tools", "allowed_tools":
    {"mode", "tools": [{"type": "function", "function": {"name"}}]}}; the Responses API's flat form
    is converted to it first): its mode, and the declared functions a call may name, in their
    declared order. Only function tools can be allowed: there are no others here."""
    allowed = choice.get("allowed_tools")
    mode = allowed.get("mode") if isinstance(allowed, dict) else None
    subset = allowed.get("tools") if isinstance(allowed, dict) else None
    if mode not in ("auto", "required") or not isinstance(subset, list) or not subset:
        raise _refuse(
            "tool_choice of type 'allowed_tools' needs a mode ('auto' or 'required') and a non-empty "
            "list of tools.",
            "tool_choice",
        )
    chosen: set[str] = set()
    for i, tool in enumerate(subset):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _unsupported(
                f"tool_choice allows tools[{i}] of type '{str(kind)[:40]}': only function tools are allowed."
            )
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise _refuse(f"tool_choice's allowed tools[{i}] needs a function name.", "tool_choice")
        if name not in names:
            raise _refuse(f"tool_choice allows '{name[:64]}', which is not among 'tools'.", "tool_choice")
        chosen.add(name)
    return mode, tuple(n for n in names if n in chosen)


def _named_choice(choice: Any) -> str:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if isinstance(kind, str) and kind != "function":
        # OpenAI's other forms (a custom or MCP tool, a hosted tool) name tools that cannot exist here.
        raise _unsupported(f"tool_choice of type '{kind[:40]}' is not supported; only function tools are.")
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise _refuse(
            "tool_choice must be 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    return name


@lru_cache(maxsize=256)
def _grammar(schemas: tuple[tuple[str, str], ...], parallel: bool, text_allowed: bool) -> str:
    """An llguidance Lark grammar: calls of the named functions, each `parameters` its own %json."""
    rules = []
    alternatives = []
    for i, (name, schema) in enumerate(schemas):
        options = {**json.loads(schema), "x-guidance": _JSON_STYLE}
        rules.append(f"args{i}: %json {json.dumps(options, ensure_ascii=False)}")
        alternatives.append(f"{json.dumps(CALL_PREFIX + name + CALL_MIDDLE)} args{i} {json.dumps(CALL_END)}")
    calls = f"call ({json.dumps(CALL_SEPARATOR)} call)*" if parallel else "call"
    # Text under "auto" is anything not opening with "{", so the first character decides.
    start = "start: calls | TEXT\nTEXT: /[^{](.|\\n)*/" if text_allowed else "start: calls"
    lark = "\n".join([start, f"calls: {calls}", "call: " + "\n    | ".join(alternatives), *rules])
    grammar: str = llguidance.LLMatcher.grammar_from_lark(lark)
    if problem := llguidance.LLMatcher.validate_grammar(grammar):
        raise _refuse(f"The tools cannot be used: {problem[:300]}", "tools")
    return grammar


# --- reading calls back --------------------------------------------------------------------


def call_id(job_id: str, index: int) -> str:
    """A call's id, the same every time the job's events are read (a response is rebuilt by
    replaying them); a hash, so it does not reveal the job id a caller reads the job with."""
    return "call_" + hashlib.sha256(f"{job_id}:{index}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsPiece:
    index: int
    text: str


ToolEvent = Content | CallStarted | ArgumentsPiece


ReaderState = Literal["prefix", "name", "middle", "arguments", "end", "separator", "broken"]
# The fixed text of each literal state, and the state after it.
_LITERALS: dict[ReaderState, str] = {
    "prefix": CALL_PREFIX, "middle": CALL_MIDDLE, "end": CALL_END, "separator": CALL_SEPARATOR
}  # fmt: skip
_AFTER: dict[ReaderState, ReaderState] = {
    "prefix": "name", "middle": "arguments", "end": "separator", "separator": "prefix"
}  # fmt: skip


class ToolCallReader:
    """A generation's text in, what it means out: content, or calls started and their arguments.

    The first character decides: "{" opens calls (the grammar allows nothing else there), any
    other is text to the end. Within a call the reader tracks the arguments' JSON nesting (and
    strings, where braces do not count) to know where they end, so each piece of arguments goes
    out as soon as it arrives.
    """

    def __init__(self, job_id: str) -> None:
        self._job_id = job_id
        self.calls: list[jobs.ToolCall] = []
        self._mode: Literal["unknown", "text", "calls"] = "unknown"
        self._pending = ""  # call text not yet consumed
        self._state: ReaderState = "prefix"
        self._name = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def feed(self, text: str) -> list[ToolEvent]:
        if self._mode == "unknown" and text:
            self._mode = "calls" if text[0] == "{" else "text"
        if self._mode == "text":
            return [Content(text)] if text else []
        self._pending += text
        out: list[ToolEvent] = []
        while self._pending and self._step(out):
            pass
        return out

    def _step(self, out: list[ToolEvent]) -> bool:
        """Consume what the current state can; False when it needs more text."""
        if self._state in ("prefix", "middle", "end", "separator"):
            literal = _LITERALS[self._state]
            if len(self._pending) < len(literal):
                if not literal.startswith(self._pending):
                    self._state = "broken"
                return False
            if not self._pending.startswith(literal):
                self._state = "broken"
                return False
            self._pending = self._pending[len(literal) :]
            self._state = _AFTER[self._state]
            if self._state == "arguments":
                self.calls.append(
                    jobs.ToolCall(id=call_id(self._job_id, len(self.calls)), name=self._name, arguments="")
                )
                out.append(CallStarted(len(self.calls) - 1, self.calls[-1].id, self._name))
            return True
        if self._state == "name":
            end = self._pending.find('"')
            if end < 0:
                return False
            self._name, self._pending = self._pending[:end], self._pending[end:]
            self._state = "middle"
            return True
        if self._state == "arguments":
            taken = self._scan_arguments()
            piece, self._pending = self._pending[:taken], self._pending[taken:]
            if piece:
                self.calls[-1].arguments += piece
                out.append(ArgumentsPiece(len(self.calls) - 1, piece))
            return self._state != "arguments"
        return False  # broken: the text left the grammar's form (it cannot, constrained); stop reading

    def _scan_arguments(self) -> int:
        """How much of the pending text belongs to the arguments; switches state at their end."""
        for i, ch in enumerate(self._pending):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._state = "end"
                    return i + 1
        return len(self._pending)


class ToolCallIn(BaseModel):
    """An assistant turn's call in the history the client sends back."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str


ToolCallIn.model_rebuild()


def check_call(name: str, arguments: str, param: str) -> None:
    """A past call as the prompt renders it back: a function name by OpenAI's rule, and arguments
    that are one JSON object (`param` names the call)."""
    if not NAME_PATTERN.match(name):
        raise _refuse(f"{param}.name must be 1-64 letters, digits, '_' or '-'.", f"{param}.name")
    check_arguments(arguments, f"{param}.arguments")


def check_arguments(arguments: str, param: str) -> None:
    """Past calls are rendered back as JSON objects, so their arguments must be one."""
    try:
        value = json.loads(arguments)
    except ValueError:
        raise _refuse(f"{param} must be a JSON object; it is not valid JSON.", param) from None
    if not isinstance(value, dict):
        raise _refuse(f"{param} must be a JSON object.", param)
