"""One generation's own state: token budget, end-of-turn ids, stop strings, incremental detokenizing.

Fed one sampled token at a time, by whichever loop drives it (one sequence, or a batch of them),
it decides alone when its sequence ends and what text each token releases.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from model.grammar import Constraint
from model.stopping import StopStringMatcher
from model.types import Completion, FinishReason, Prompt, SamplingParams, TextDelta

Output = TextDelta | Completion


class Generation:
    """Tokens in, clean text deltas out, and exactly one Completion at the end."""

    def __init__(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        tokenizer: Any,
        stop_ids: frozenset[int],
        context_length: int,
        constraint: Constraint | None = None,
    ) -> None:
        self.prompt = prompt
        self.constraint = constraint  # the grammar its tokens follow; the backend applies it
        self.sampling = sampling
        self.budget = min(sampling.max_tokens, context_length - len(prompt.token_ids))
        self._tokenizer = tokenizer.backend_tokenizer
        self._stop_ids = frozenset() if sampling.ignore_eos else stop_ids
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._matcher = StopStringMatcher(sampling.stop)
        self.tokens: list[int] = []  # sampled so far
        self.done = False

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The prompt and every token sampled so far: what a preempted sequence resumes from."""
        return self.prompt.token_ids + tuple(self.tokens)

    def feed(self, token: int) -> list[Output]:
        """Account for one sampled token; the text it releases, and the Completion if it ended."""
        assert not self.done, "fed after its Completion"
        self.tokens.append(token)
        if token in self._stop_ids:
            return self.finish("stop")
        out: list[Output] = []
        piece = self._decoder.step(self._tokenizer, token)
        if piece and (text := self._matcher.feed(piece)):
            out.append(TextDelta(text))
        if self._matcher.matched:
            return out + self.finish("stop")
        if self.generated >= self.budget:
            return out + self.finish("length")
        return out

    def finish(self, reason: FinishReason) -> list[Output]:
        """End now (also from outside: cancelled); held-back text first, then the Completion."""
        self.done = True
        out: list[Output] = []
        if tail := self._matcher.flush():
            out.append(TextDelta(tail))
        out.append(Completion(reason, len(self.prompt.token_ids), self.generated))
        return out
