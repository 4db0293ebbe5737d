"""OpenAI wire models for chat completions and models, as the official clients send and expect them."""

from __future__ import annotations

import time
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from api.serving import structured
from api.serving.tools import FunctionTool, ToolCallIn, ToolPlan, plan_tools, with_text_grammar
from tasks import events, jobs, sampling
from tasks.sampling import Sampling


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None  # required; only a turn that made tool_calls may omit it
    name: str | None = None  # accepted and ignored, as Llama-3 templates have no place for it
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool turn: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _calls_need_no_content(cls, data: Any) -> Any:
        if isinstance(data, dict) and "content" not in data and data.get("tool_calls"):
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _shape(self) -> ChatMessageIn:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required, except for an assistant turn that made tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the 'tool_call_id' it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant turn has tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_job_message(self) -> jobs.Message:
        calls = [
            jobs.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in self.tool_calls or []
        ]
        return jobs.Message(
            role=self.role, content=self.text(), tool_calls=calls, tool_call_id=self.tool_call_id
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of OpenAI's request that change what the answer means. We refuse them rather than
# silently ignoring them; each maps to the value that means "not used".
_UNSUPPORTED: dict[str, Any] = {
    "functions": None,  # the deprecated forerunner of tools
    "function_call": None,
    "audio": None,
    "prediction": None,
    "web_search_options": None,
}


class ChatCompletionRequest(BaseModel):
    # Unknown fields are ignored (forward compatibility with newer clients).
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessageIn] = Field(min_length=1)
    model: str | None = None  # optional, as in the original service's curl examples: the served model
    # The sampling fields take their ranges from tasks/sampling.py; one left out (or null) gets
    # the default of tasks.sampling.Sampling (to_sampling() below).
    max_tokens: sampling.MaxTokens | None = None
    max_completion_tokens: sampling.MaxTokens | None = None
    temperature: sampling.Temperature | None = None
    top_p: sampling.TopP | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: sampling.Seed | None = None
    user: str | None = None
    n: sampling.Choices | None = None  # at most MAX_N, checked in api/chat_completion/serving.py validate()
    presence_penalty: sampling.Penalty | None = None
    frequency_penalty: sampling.Penalty | None = None
    # Token id (as a string, JSON keys being strings) to a bias added to its logit.
    logit_bias: dict[str, float] | None = Field(None, max_length=sampling.MAX_LOGIT_BIAS)
    logprobs: bool | None = None
    top_logprobs: sampling.TopLogprobs | None = None
    # --- not in the OpenAI spec: vLLM's extensions, with vLLM's meanings (tasks/sampling.py) ---
    ignore_eos: bool | None = None  # generate max_tokens regardless of end-of-turn tokens
    top_k: sampling.TopK | None = None
    min_p: sampling.MinP | None = None
    repetition_penalty: sampling.RepetitionPenalty | None = None
    # --- end of vLLM's extensions ---
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids; got '{key[:20]}'")
            if not -sampling.LOGIT_BIAS_BOUND <= bias <= sampling.LOGIT_BIAS_BOUND:
                bound = sampling.LOGIT_BIAS_BOUND
                raise ValueError(f"bias for token {key} must be between {-bound:g} and {bound:g}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > sampling.MAX_STOPS:
            raise ValueError(f"at most {sampling.MAX_STOPS} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def unsupported_param(self) -> str | None:
        """The first field that asks for something this service does not do, if any."""
        extra = self.model_extra or {}
        for name, neutral in _UNSUPPORTED.items():
            if name in extra and extra[name] not in (neutral, None, [], {}):
                return name
        if self.modalities and set(self.modalities) != {"text"}:
            return "modalities"
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @cached_property
    def tool_plan(self) -> ToolPlan:
        """The tools checked and planned once per request (validation and the job both use it)."""
        return plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls)

    def grammar(self) -> str | None:
        """What every token must follow: the tool-call grammar, else the response_format's."""
        text_grammar = structured.chat_grammar(self.response_format)
        return with_text_grammar(self.tool_plan, text_grammar, "response_format")

    def to_sampling(self, max_tokens_default: int) -> Sampling:
        """How the job samples: the fields named as Sampling's pass as they are, the rest convert."""
        return Sampling(
            **self.model_dump(include=_SAMPLING_FIELDS, exclude_none=True),
            max_tokens=self.max_completion_tokens or self.max_tokens or max_tokens_default,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            grammar=self.grammar(),
        )

    def to_job(
        self, job_id: str, model: str, max_tokens_default: int, owner: str | None = None
    ) -> jobs.NewJob:
        spec = jobs.JobSpec(
            id=job_id,
            kind="chat",
            model=model,
            messages=[m.to_job_message() for m in self.messages],
            tools=self.tool_plan.prompt_tools(),
            sampling=self.to_sampling(max_tokens_default),
        )
        return jobs.NewJob(spec=spec, meta=jobs.JobMeta(owner=owner))


# The request's fields that mean the same as Sampling's, under the same name; to_sampling() passes
# them through and converts the others (the token budget, the stop list, the bias's string keys).
_SAMPLING_FIELDS = (set(Sampling.model_fields) & set(ChatCompletionRequest.model_fields)) - {
    "max_tokens",
    "stop",
    "logit_bias",
}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


FinishReason = Literal["stop", "length", "tool_calls"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _calls_when_made(self, handler: Any) -> dict[str, Any]:
        # OpenAI's message has tool_calls only when calls were made.
        data: dict[str, Any] = handler(self)
        if self.tool_calls is None:
            data.pop("tool_calls", None)
        return data


class ChoiceLogprobs(BaseModel):
    content: list[events.TokenLogprob] | None
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call: its first piece has the id and name, the next ones arguments only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    @model_serializer
    def _wire(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        # OpenAI's deltas carry only the fields that changed: role once, then content or calls.
        fields = (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
        return {k: v for k, v in fields if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None
