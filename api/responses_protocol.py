"""OpenAI Responses API wire models (text only), as the official SDKs send and expect them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api import structured
from tasks import jobs

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


# Fields that change what the answer means and that this server does not do.
_UNSUPPORTED: dict[str, Any] = {
    "tools": None,
    "tool_choice": None,
    "previous_response_id": None,
    "conversation": None,
    "prompt": None,
    "reasoning": None,
    "include": None,
    "top_logprobs": None,
    "max_tool_calls": None,
}


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: dict[str, Any] | None = None


class ResponseCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # An empty list would be a job with no prompt at all, for the worker to fail on.
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.6, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    stream: bool = False
    background: bool = False
    metadata: dict[str, str] | None = Field(None, max_length=16)
    store: bool = True
    # --- not in the OpenAI spec (vLLM has the same) ---
    ignore_eos: bool = False  # generate max_output_tokens regardless of end-of-turn tokens
    text: TextOptions | None = None

    def unsupported_param(self) -> str | None:
        extra = self.model_extra or {}
        for name in _UNSUPPORTED:
            if extra.get(name) not in (None, [], {}, "none", "auto"):
                return name
        if not self.store and self.background:
            return "store"  # a background response must be stored to be polled
        return None

    def to_job_spec(
        self, job_id: str, model: str, max_tokens_default: int = 512, owner: str | None = None
    ) -> jobs.JobSpec:
        messages = [jobs.Message(role="system", content=self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            messages.append(jobs.Message(role="user", content=self.input))
        else:
            messages += [jobs.Message(role=m.role, content=m.text()) for m in self.input]
        return jobs.JobSpec(
            id=job_id,
            model=model,
            messages=messages,
            sampling=jobs.Sampling(
                max_tokens=self.max_output_tokens or max_tokens_default,
                temperature=self.temperature,
                top_p=self.top_p,
                ignore_eos=self.ignore_eos,
                grammar=structured.text_format_grammar(self.text.format if self.text else None),
            ),
            response=jobs.ResponseOptions(
                instructions=self.instructions,
                metadata=self.metadata or {},
                background=self.background,
                max_output_tokens=self.max_output_tokens,
            ),
            owner=owner,
        )


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


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
    output: list[OutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = False
    temperature: float
    top_p: float
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    store: bool = True
    usage: ResponseUsage | None = None

    @property
    def output_text(self) -> str:
        return "".join(part.text for item in self.output for part in item.content)
