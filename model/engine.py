"""The engine: a loaded model, its chat format, and the scheduler that batches its generations."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from model.chat import end_of_turn_ids, render_prompt, truncated
from model.generation import Generation
from model.grammar import Grammars
from model.loading import LoadedModel
from model.scheduler import Failure, Scheduler
from model.token_bytes import TokenBytes
from model.types import ChatMessage, Completion, ContextLengthExceeded, Prompt, SamplingParams, TextDelta


class Engine:
    """One loaded model, its batch runner and the scheduler that drives it, on either backend.

    The backend only turns prompt tokens into sampled tokens, for every running sequence in one
    forward pass per step; every token then passes through its sequence's Generation, where end
    of turn, the token budget, stop strings and incremental detokenization are decided the same
    way for both backends and every batch size.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._tokenizer = loaded.tokenizer
        self._stop_ids = end_of_turn_ids(loaded.tokenizer, loaded.eos_token_ids)
        self.scheduler = Scheduler(loaded.runner)
        self.grammars = Grammars(loaded.tokenizer, self._stop_ids)
        # Logprobs' token bytes, cached per id for the worker's life, not per request.
        self._token_bytes = TokenBytes(loaded.tokenizer.backend_tokenizer)

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def slots(self) -> int:
        return self.loaded.runner.capacity

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name (logit_bias): the tokenizer's, added tokens included."""
        return int(self._tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))

    def prepare(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]] = (), truncate: bool = False
    ) -> Prompt:
        """The prompt's tokens; with `truncate`, the oldest turns dropped until it fits (model/chat.py
        truncated(), a Responses request's truncation: "auto")."""
        ids = render_prompt(self._tokenizer, messages, tools)
        if len(ids) >= self.context_length and truncate:
            kept = truncated(
                messages, lambda m: len(render_prompt(self._tokenizer, m, tools)) < self.context_length
            )
            if kept is not None:
                ids = render_prompt(self._tokenizer, kept, tools)
        if len(ids) >= self.context_length:
            raise ContextLengthExceeded(len(ids), self.context_length)
        return Prompt(tuple(ids))

    def generation(self, prompt: Prompt, sampling: SamplingParams) -> Generation:
        """Its grammar, if any, is compiled here (cached): a grammar llguidance refuses raises
        ValueError before the sequence takes a slot."""
        constraint = self.grammars.constraint(sampling.grammar) if sampling.grammar else None
        return Generation(
            prompt,
            sampling,
            tokenizer=self._tokenizer,
            stop_ids=self._stop_ids,
            context_length=self.context_length,
            constraint=constraint,
            token_bytes=self._token_bytes,
        )

    def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[TextDelta | Completion]:
        """One generation on its own: text deltas as tokens come, always ending with a Completion.

        It drives the shared scheduler itself, so it is for callers that own the engine (tests,
        warm-up, the in-process benchmark), never beside a running slot loop.
        """
        key = object()
        generation = self.generation(prompt, sampling)
        self.scheduler.submit(key, generation)
        ended = False
        asked_at = -1  # should_stop is asked once before each new token, as a consumer sees them
        try:
            while not ended:
                stop = asked_at < generation.generated and should_stop()
                asked_at = generation.generated
                events = self.scheduler.stop(key) if stop else self.scheduler.step()
                for owner, event in events:
                    if owner is not key:
                        continue
                    if isinstance(event, Failure):
                        raise RuntimeError(event.message)
                    ended = isinstance(event, Completion)
                    yield event
        finally:
            if not ended:  # the consumer stopped early: free the slot
                self.scheduler.stop(key)

    def warm_up(self) -> None:
        """Run one short generation so the first user request does not pay for lazy init."""
        prompt = self.prepare([ChatMessage("user", "Hi")])
        for _ in self.stream(prompt, SamplingParams(max_tokens=2, temperature=0.0)):
            pass
