"""One generation's own state: token budget, end-of-turn ids, stop strings, incremental detokenizing.

Fed one sampled token at a time, by whichever loop drives it (one sequence, or a batch of them),
it decides alone when its sequence ends and what text each token releases.

Logprobs, when asked, ride on the text deltas. The rule: every sampled token that is not an
end-of-turn token gets exactly one TokenLogprob, carried by the first TextDelta emitted at or
after that token, so an entry waits with its text while that is held back (a possible stop
string, half a UTF-8 character). When the generation ends, waiting entries go out with the
tail delta, an empty one if there is no tail text, except after a stop string matched: then
the entries of tokens whose text starts at or after the cut are dropped, as their text is
(OpenAI does not return the stop sequence either).

Which distribution the numbers describe (the backends compute them): the one the token was
drawn from, after logit_bias, the penalties and the grammar mask, at the request's temperature
(1 when greedy), before top-k, top-p and min-p truncation, so the alternatives are finite and
comparable across those settings. vLLM's default (`--logprobs-mode raw_logprobs`, docs.vllm.ai
engine args and V1 guide) reports the model's raw output instead, "before applying any logits
post-processing such as temperature scaling or penalty adjustments"; its `processed_logprobs`
reports them "after applying all processors, including temperature and top_k/top_p", so a
token the truncation cut has no probability left. Ours sits between the two.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from model.grammar import Constraint
from model.stopping import StopStringMatcher
from model.token_bytes import TokenBytes
from model.types import (
    Completion,
    FinishReason,
    Prompt,
    SampledLogprobs,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
)

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
        token_bytes: TokenBytes | None = None,
    ) -> None:
        """`token_bytes` is shared by the engine so its cache outlives one request; without it,
        a generation that asked for logprobs makes its own."""
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
        self._token_bytes = token_bytes
        if sampling.logprobs and token_bytes is None:
            self._token_bytes = TokenBytes(self._tokenizer)
        # Entries waiting for their text, each with where its token's text starts in the text
        # fed to the stop matcher (a cut there drops it); and how much of that text was fed and
        # released so far.
        self._waiting: list[tuple[int, TokenLogprob]] = []
        self._fed = 0
        self._released = 0

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

    def feed(self, token: int, logprob: SampledLogprobs | None = None) -> list[Output]:
        """Account for one sampled token (with its logprobs, if the sequence asked); the text it
        releases, and the Completion if it ended."""
        assert not self.done, "fed after its Completion"
        self.tokens.append(token)
        if token in self._stop_ids:
            return self.finish("stop")
        if logprob is not None and self._token_bytes is not None:
            self._waiting.append((self._fed, self._entry(token, logprob)))
        out: list[Output] = []
        piece = self._decoder.step(self._tokenizer, token)
        if piece:
            self._fed += len(piece)
            text = self._matcher.feed(piece)
            if self._matcher.matched:
                # What the matcher released ends at the cut: entries of tokens from there on go.
                cut = self._released + len(text)
                self._waiting = [(start, e) for start, e in self._waiting if start < cut]
            if text or (self._matcher.matched and self._waiting):
                out.append(self._delta(text))
        if self._matcher.matched:
            return out + self.finish("stop")
        if self.generated >= self.budget:
            return out + self.finish("length")
        return out

    def finish(self, reason: FinishReason) -> list[Output]:
        """End now (also from outside: cancelled); held-back text and waiting logprobs first,
        then the Completion."""
        self.done = True
        out: list[Output] = []
        tail = self._matcher.flush()
        if tail or self._waiting:
            out.append(self._delta(tail))
        out.append(Completion(reason, len(self.prompt.token_ids), self.generated))
        return out

    def _delta(self, text: str) -> TextDelta:
        """Text to emit, with every entry waiting so far."""
        self._released += len(text)
        entries = tuple(e for _, e in self._waiting)
        self._waiting = []
        return TextDelta(text, entries)

    def _entry(self, token: int, logprob: SampledLogprobs) -> TokenLogprob:
        assert self._token_bytes is not None
        chosen, top = logprob
        alternatives = tuple(TopLogprob(*self._token_bytes(t), lp) for t, lp in top)
        return TokenLogprob(*self._token_bytes(token), chosen, alternatives)
