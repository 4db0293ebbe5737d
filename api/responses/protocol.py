"""OpenAI Responses API wire models (text only), as the official SDKs send and expect them."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from api import errors
from api.serving import structured
from api.serving.tools import FunctionDefinition, FunctionTool, ToolPlan, plan_tools, with_text_grammar
from tasks import events, jobs, sampling
from tasks.sampling import Sampling

ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made on an earlier turn, sent back as input."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """The caller's result for a call, on the next turn."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str


def _item_kind(value: Any) -> Any:
    # An input message may leave out its type ("easy input message"); the others may not.
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionToolIn(BaseModel):
    """A Responses function tool: the chat one's fields, flat."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> FunctionTool:
        function = FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict
        )
        return FunctionTool(type="function", function=function)


def _messages(items: list[InputMessage | FunctionCallItem | FunctionCallOutputItem]) -> list[jobs.Message]:
    """Input items as chat turns: consecutive calls are one assistant turn, each output a tool turn."""
    messages: list[jobs.Message] = []
    for item in items:
        if isinstance(item, InputMessage):
            messages.append(jobs.Message(role=item.role, content=item.text()))
        elif isinstance(item, FunctionCallItem):
            call = jobs.ToolCall(id=item.call_id, name=item.name, arguments=item.arguments)
            if messages and messages[-1].role == "assistant" and messages[-1].tool_calls:
                messages[-1].tool_calls.append(call)
            else:
                messages.append(jobs.Message(role="assistant", content="", tool_calls=[call]))
        else:
            messages.append(jobs.Message(role="tool", content=item.output, tool_call_id=item.call_id))
    return messages


def _chat_function(tool: Any) -> Any:
    """A Responses tool reference ({"type": "function", "name": ...}) in the chat form."""
    if isinstance(tool, dict) and tool.get("type") == "function" and "function" not in tool:
        return {"type": "function", "function": {"name": tool.get("name")}}
    return tool


def _chat_tool_choice(choice: Any) -> Any:
    """The Responses API's flat tool_choice forms in the chat API's shape, which plan_tools reads:
    {"type": "function", "name"} and {"type": "allowed_tools", "mode", "tools": [...]}."""
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") == "allowed_tools" and "allowed_tools" not in choice:
        tools = choice.get("tools")
        tools = [_chat_function(t) for t in tools] if isinstance(tools, list) else tools
        return {"type": "allowed_tools", "allowed_tools": {"mode": choice.get("mode"), "tools": tools}}
    return _chat_function(choice)


LOGPROBS_INCLUDE = "message.output_text.logprobs"  # the one `include` value served

# Fields that change what the answer means and that this server does not do.
_UNSUPPORTED: dict[str, Any] = {
    "conversation": None,
    "prompt": None,
    "reasoning": None,
    "max_tool_calls": None,
}


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: dict[str, Any] | None = None


class ResponseCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # An empty list would be a job with no prompt at all, for the worker to fail on.
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    model: str | None = None
    instructions: str | None = None
    # The sampling fields take their ranges from tasks/sampling.py; one left out (or null) gets
    # the default of tasks.sampling.Sampling (to_sampling() below).
    max_output_tokens: sampling.MaxTokens | None = None
    temperature: sampling.Temperature | None = None
    top_p: sampling.TopP | None = None
    stream: bool = False
    background: bool = False
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool = True
    # Continues a stored response: its input and output come before this input (serving.py).
    previous_response_id: str | None = Field(None, max_length=100)
    truncation: Literal["auto", "disabled"] | None = None  # None: "disabled", as OpenAI
    # --- not in the OpenAI spec (vLLM has the same) ---
    ignore_eos: bool | None = None  # generate max_output_tokens regardless of end-of-turn tokens
    # --- end of vLLM's extension ---
    text: TextOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Logprobs of the message's text, as OpenAI: asked for by `include`, `top_logprobs` alternatives.
    include: list[str] | None = None
    top_logprobs: sampling.TopLogprobs | None = None

    @property
    def logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    def function_tools(self) -> list[FunctionTool]:
        """The request's tools; anything but a function tool is refused (no built-in tools here)."""
        out = []
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") != "function":
                kind = str(tool.get("type"))[:40]
                raise errors.InvalidRequest(
                    f"tools[{i}]: only function tools are supported, not '{kind}'.",
                    param="tools",
                    code="unsupported_parameter",
                )
            try:
                out.append(FunctionToolIn.model_validate(tool).as_chat_tool())
            except ValidationError as exc:
                raise errors.InvalidRequest(
                    f"tools[{i}]: {exc.errors()[0].get('msg', 'invalid tool')}", param="tools"
                ) from None
        return out

    @cached_property
    def tool_plan(self) -> ToolPlan:
        """The tools checked and planned once per request (validation and the job both use it)."""
        return plan_tools(
            self.function_tools(), _chat_tool_choice(self.tool_choice), self.parallel_tool_calls
        )

    def grammar(self) -> str | None:
        text_grammar = structured.text_format_grammar(self.text.format if self.text else None)
        return with_text_grammar(self.tool_plan, text_grammar, "text.format")

    def unsupported_param(self) -> str | None:
        extra = self.model_extra or {}
        for name in _UNSUPPORTED:
            if extra.get(name) not in (None, [], {}, "none", "auto"):
                return name
        if any(item != LOGPROBS_INCLUDE for item in self.include or []):
            return "include"  # the other includes are of built-in tools, reasoning and inputs
        if not self.store and self.background:
            return "store"  # a background response must be stored to be polled
        return None

    def to_sampling(self, max_tokens_default: int) -> Sampling:
        """How the job samples: the fields named as Sampling's pass as they are, the rest convert."""
        return Sampling(
            **self.model_dump(include=_SAMPLING_FIELDS, exclude_none=True),
            max_tokens=self.max_output_tokens or max_tokens_default,
            logprobs=self.logprobs,
            grammar=self.grammar(),
        )

    def input_messages(self) -> list[jobs.Message]:
        """This request's own input as chat turns (no instructions, no earlier conversation)."""
        if isinstance(self.input, str):
            return [jobs.Message(role="user", content=self.input)]
        return _messages(self.input)

    def to_job(
        self,
        job_id: str,
        model: str,
        max_tokens_default: int,
        owner: str | None = None,
        history: list[jobs.Message] | None = None,
    ) -> jobs.NewJob:
        """The job; `history`: the conversation previous_response_id continues, as chat turns
        (api/responses/conversations.py), which goes between the instructions and the input."""
        messages = [jobs.Message(role="system", content=self.instructions)] if self.instructions else []
        messages += [*(history or []), *self.input_messages()]
        plan = self.tool_plan
        spec = jobs.JobSpec(
            id=job_id,
            kind="response",
            model=model,
            messages=messages,
            tools=plan.prompt_tools(),
            sampling=self.to_sampling(max_tokens_default),
            truncate=self.truncation == "auto",
        )
        options = jobs.ResponseOptions(
            instructions=self.instructions,
            metadata=self.metadata or {},
            background=self.background,
            max_output_tokens=self.max_output_tokens,
            tools=self.tools or [],
            tool_choice=self.tool_choice or ("auto" if self.tools else "none"),
            parallel_tool_calls=plan.parallel,
            store=self.store,
            previous_response_id=self.previous_response_id,
            truncation=self.truncation or "disabled",
        )
        return jobs.NewJob(spec=spec, meta=jobs.JobMeta(owner=owner, response=options))


# The request's fields that mean the same as Sampling's, under the same name; to_sampling() passes
# them through and converts the others (the token budget, logprobs asked for by `include`).
_SAMPLING_FIELDS = set(Sampling.model_fields) & set(ResponseCreateRequest.model_fields)


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[events.TokenLogprob] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: str


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    background: bool
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[OutputMessage | OutputFunctionCall] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    temperature: float
    top_p: float
    top_logprobs: int | None = None
    tool_choice: str | dict[str, Any] = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["auto", "disabled"] = "disabled"
    store: bool = True
    previous_response_id: str | None = None
    usage: ResponseUsage | None = None

    @property
    def output_text(self) -> str:
        messages = (item for item in self.output if isinstance(item, OutputMessage))
        return "".join(part.text for item in messages for part in item.content)


# --- stored conversations: GET /v1/responses/{id}/input_items, DELETE /v1/responses/{id} ----


class StoredInputMessage(BaseModel):
    """A system, developer or user message a response was given, as OpenAI lists it."""

    type: Literal["message"] = "message"
    id: str
    status: ItemStatus = "completed"
    role: Literal["system", "developer", "user"]
    content: list[InputText]


class FunctionCallOutput(BaseModel):
    type: Literal["function_call_output"] = "function_call_output"
    id: str
    call_id: str
    output: str
    status: ItemStatus = "completed"


ListedItem = StoredInputMessage | OutputMessage | OutputFunctionCall | FunctionCallOutput


class ResponseItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ListedItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
