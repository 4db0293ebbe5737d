"""The typed values that go into and come out of the engine."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from model.grammar import Constraint

FinishReason = Literal["stop", "length", "cancelled"]

# Which library runs the forward pass. Both share the tokenizer, chat template and decode loop
# (model/engine.py), so a request renders to the same prompt tokens on either.
Backend = Literal["transformers", "llama.cpp"]


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made: `arguments` is JSON text, as OpenAI carries it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a "tool" turn: the call it answers


GREEDY_BELOW = 1e-5

# What a backend reports of one sampled token when its sequence asked for logprobs: the token's
# log probability and the top alternatives as (token id, log probability), best first.
SampledLogprobs = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence samples. The service's defaults and ranges are tasks/sampling.py's, which
    fills in every field; the defaults here are the engine's own, for direct callers (tests,
    bench): they leave the model's distribution as it is, as vLLM's and transformers' do."""

    max_tokens: int  # no default: how long is for the caller to say
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past end-of-turn tokens (benchmarks, soak tests)
    # An llguidance grammar (structured outputs, model/grammar.py) every token must follow.
    grammar: str | None = None
    # Each of these is off at its default. Ranges are validated by the API; model/penalties.py
    # and the backends' samplers apply them in vLLM's order (see model/penalties.py).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias in [-100, 100]) added to that token's logit; ids outside the model's
    # vocabulary are ignored.
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token (0..20), with `logprobs`
    # Not in OpenAI's spec: vLLM's extensions, with vLLM's meanings.
    repetition_penalty: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0

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
class TopLogprob:
    """One of the most likely tokens at a position: its text, exact bytes and log probability."""

    token: str  # `bytes` decoded as UTF-8, errors replaced (half a character reads as U+FFFD)
    bytes: builtins.bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's text, exact bytes and log probability, and the most likely tokens there
    (best first; empty unless top_logprobs was asked). model/generation.py says which
    distribution these come from."""

    token: str
    bytes: builtins.bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text, never ending in a broken UTF-8 sequence or a partial stop string.

    With `logprobs` asked, every sampled token other than an end-of-turn token has exactly one
    entry, in order, on the first delta emitted at or after it (model/generation.py).
    """

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


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


@dataclass
class StepOutput:
    """What one forward pass over the running sequences produced, by slot."""

    tokens: dict[int, int] = field(default_factory=dict)  # a sampled token for each slot that decoded
    failed: dict[int, str] = field(default_factory=dict)  # slots whose sequence could not go on, and why
    # Slots whose sequence was put out to give the others room in the KV memory; the scheduler
    # starts them again later from their prompt and the tokens they had (nothing is lost).
    preempted: set[int] = field(default_factory=set)
    # Only for the slots whose sequence asked for logprobs: those of the token it sampled.
    logprobs: dict[int, SampledLogprobs] = field(default_factory=dict)


class BatchRunner(Protocol):
    """A backend's forward passes over up to `capacity` sequences at once, each in its own slot.

    The runner owns the model's KV memory and each sequence's sampler; it knows nothing of stop
    conditions, text or jobs (model/scheduler.py and model/generation.py decide those). Every
    step decodes one token for each slot whose prompt is in, and feeds pending prompt tokens of
    the others within a per-step budget (chunked prefill), so a long prompt never freezes the
    streams already running.

    Sequences of one prompt (a request's `n` choices) share its prefill: one given `share_from`
    takes the KV of that sibling's prompt instead of computing it again, and decodes from the
    prompt's last token with its own sampler like any other.
    """

    # Prompt tokens sequences took from a sibling's KV instead of prefilling them (for metrics).
    shared_prefill_tokens: int

    @property
    def capacity(self) -> int: ...

    def can_admit(self, positions: int) -> bool:
        """Whether a sequence needing `positions` new KV positions now (its prompt and room to
        grow, less what it shares with a sibling) can start at once."""
        ...

    def add(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        positions: int,
        constraint: Constraint | None = None,
        generated: int = 0,
        share_from: int | None = None,
    ) -> int:
        """Start a sequence in a free slot (the one whose cache shares most of the prompt); its slot.
        A `constraint` (its grammar) vets every token the sequence samples. The last `generated`
        tokens of `prompt` are ones the sequence sampled before it was preempted: they count
        as generated for the frequency and presence penalties.

        `share_from`: the slot of a running sequence whose prompt begins with this one's. The new
        sequence waits for that prompt's prefill and takes its KV; if the sibling ends first, it
        prefills what it could not take itself. `positions` then counts only its own."""
        ...

    def step(self) -> StepOutput: ...

    def drop(self, slot: int) -> None:
        """End the slot's sequence and free its slot (a prompt prefix may stay cached for reuse)."""
        ...
