"""The event protocol between a worker and the API: what a job says while it runs.

Each job has an append-only log of events (a Redis list) and a pub/sub channel. An event's
sequence number is its index in the log, assigned inside Redis when it is appended, and the
same `"<seq> <json>"` line is published live. A reader subscribes first, then reads the log from
where it left off, so a late or lagging reader catches up with no gap and no duplicate.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

# "time_limit": stopped at MAX_GENERATION_SECONDS with the text it had.
FinishReason = Literal["stop", "length", "cancelled", "time_limit"]


class _Event(BaseModel):
    seq: int = Field(-1, exclude=True)  # the log index; set when read back, never stored


class Started(_Event):
    type: Literal["started"] = "started"
    prompt_tokens: int
    worker: str


class TopLogprob(BaseModel):
    """OpenAI's logprob entry: a token's text, its exact UTF-8 bytes, its log probability."""

    token: str
    bytes: list[int]
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Delta(_Event):
    type: Literal["delta"] = "delta"
    text: str
    index: int = 0  # the choice, for a request with n > 1
    # One entry per sampled token this text (or an earlier delta's) carries, when asked for.
    logprobs: list[TokenLogprob] | None = None


class Finished(_Event):
    type: Literal["finished"] = "finished"
    finish_reason: FinishReason  # the first choice's; with n > 1 each one's is in `choices`
    prompt_tokens: int
    completion_tokens: int  # every choice's together
    choices: list[FinishReason] = Field(default_factory=list)

    def reason_of(self, index: int) -> FinishReason:
        return self.choices[index] if self.choices else self.finish_reason


class Failed(_Event):
    type: Literal["failed"] = "failed"
    code: str
    message: str


Event = Annotated[Started | Delta | Finished | Failed, Field(discriminator="type")]
AnyEvent = Started | Delta | Finished | Failed
_adapter: TypeAdapter[Event] = TypeAdapter(Event)


def encode(event: AnyEvent) -> str:
    return event.model_dump_json()


def decode(seq: int, payload: str | bytes) -> AnyEvent:
    event = _adapter.validate_json(payload)
    event.seq = seq
    return event


def decode_published(message: str | bytes) -> AnyEvent:
    text = message.decode() if isinstance(message, bytes) else message
    seq, _, payload = text.partition(" ")
    return decode(int(seq), payload)


def is_terminal(event: AnyEvent) -> bool:
    return isinstance(event, Finished | Failed)
