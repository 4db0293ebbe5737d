"""The typed values that go into and come out of the engine."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled"]

# Which library runs the forward pass. Both share the tokenizer, chat template and decode loop
# (model/engine.py), so a request renders to the same prompt tokens on either.
Backend = Literal["transformers", "llama.cpp"]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-turn tokens (benchmarks, soak tests)

    @property
    def greedy(self) -> bool:
        # As vLLM does: a temperature this small is greedy in effect, and dividing logits by
        # it (5e-324 is valid JSON) would overflow to inf and make sampling NaN.
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Prompt:
    """A rendered, tokenized chat prompt that fits the model's context."""

    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class TextDelta:
    """New text, never ending in a broken UTF-8 sequence or a partial stop string."""

    text: str


@dataclass(frozen=True)
class Completion:
    """The last item of every generation."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class ContextLengthExceeded(ValueError):
    """The prompt leaves no room for a single new token in the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, "
            f"but the messages take {prompt_tokens} tokens."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class TokenSampler(Protocol):
    """A backend's forward pass and sampling: prompt tokens in, one sampled token id at a time out.

    The generator runs until its consumer stops iterating (end of turn, budget, stop string or
    cancellation are the engine's decisions, not the backend's); closing it frees the sequence.
    """

    def __call__(self, prompt: Sequence[int], sampling: SamplingParams) -> Generator[int, None, None]: ...
