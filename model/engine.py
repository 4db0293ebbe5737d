"""The generation loop: prompt tokens in, clean text deltas out, one Completion at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from tokenizers.decoders import DecodeStream

from model.chat import end_of_turn_ids, render_prompt
from model.loading import LoadedModel
from model.stopping import StopStringMatcher
from model.types import (
    ChatMessage,
    Completion,
    ContextLengthExceeded,
    FinishReason,
    Prompt,
    SamplingParams,
    TextDelta,
)


class Engine:
    """One loaded model generating one sequence at a time, on either backend.

    The backend only turns prompt tokens into sampled tokens; every token then passes through
    this one loop, where end of turn, the token budget, stop strings, cancellation and
    incremental detokenization are decided the same way for both.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._tokenizer = loaded.tokenizer
        self._stop_ids = end_of_turn_ids(loaded.tokenizer, loaded.eos_token_ids)

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    def prepare(self, messages: Sequence[ChatMessage]) -> Prompt:
        ids = render_prompt(self._tokenizer, messages)
        if len(ids) >= self.context_length:
            raise ContextLengthExceeded(len(ids), self.context_length)
        return Prompt(tuple(ids))

    def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[TextDelta | Completion]:
        """Yield text deltas as tokens are produced; the last item is always a Completion."""
        budget = min(sampling.max_tokens, self.context_length - len(prompt.token_ids))
        decoder = DecodeStream(skip_special_tokens=True)
        matcher = StopStringMatcher(sampling.stop)
        generated = 0
        reason: FinishReason = "length"
        tokens = self.loaded.sample(prompt.token_ids, sampling)
        try:
            while generated < budget:
                if should_stop():
                    reason = "cancelled"
                    break
                token = next(tokens)
                generated += 1
                if token in self._stop_ids and not sampling.ignore_eos:
                    reason = "stop"
                    break
                piece = decoder.step(self._tokenizer.backend_tokenizer, token)
                text = matcher.feed(piece) if piece else ""
                if text:
                    yield TextDelta(text)
                if matcher.matched:
                    reason = "stop"
                    break
        finally:
            tokens.close()  # the backend's sequence ends here, whoever stopped it
        if tail := matcher.flush():
            yield TextDelta(tail)
        yield Completion(reason, len(prompt.token_ids), generated)

    def warm_up(self) -> None:
        """Run one short generation so the first user request does not pay for lazy init."""
        prompt = self.prepare([ChatMessage("user", "Hi")])
        for _ in self.stream(prompt, SamplingParams(max_tokens=2, temperature=0.0)):
            pass
