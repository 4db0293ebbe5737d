"""OpenAI wire models for chat completions and models, as the official clients send and expect them."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from api import structured
from tasks import jobs


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted and ignored, as Llama-3 templates have no place for it

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of OpenAI's request that change what the answer means. We refuse them rather than
# silently ignoring them; each maps to the value that means "not used".
_UNSUPPORTED: dict[str, Any] = {
    "n": 1,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "logprobs": False,
    "top_logprobs": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "audio": None,
    "prediction": None,
    "web_search_options": None,
}


class ChatCompletionRequest(BaseModel):
    # Unknown fields are ignored (forward compatibility with newer clients).
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessageIn] = Field(min_length=1)
    model: str | None = None  # optional, as in the seed's curl examples: the served model
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.6, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI documents it
    user: str | None = None
    # --- not in the OpenAI spec (vLLM has the same) ---
    ignore_eos: bool = False  # generate max_tokens regardless of end-of-turn tokens
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
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

    def to_job_spec(self, job_id: str, model: str, max_tokens_default: int = 512) -> jobs.JobSpec:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return jobs.JobSpec(
            id=job_id,
            model=model,
            messages=[jobs.Message(role=m.role, content=m.text()) for m in self.messages],
            sampling=jobs.Sampling(
                max_tokens=self.max_completion_tokens or self.max_tokens or max_tokens_default,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=self.seed,
                stop=stops,
                ignore_eos=self.ignore_eos,
                grammar=structured.chat_grammar(self.response_format),
            ),
        )


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        # OpenAI's deltas carry only the fields that changed: role once, then content.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmq"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
