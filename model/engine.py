"""The generation loop: prompt tokens in, clean text deltas out, one Completion at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from tokenizers.decoders import DecodeStream
from transformers.generation.logits_process import TopPLogitsWarper

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
    """One loaded model generating one sequence at a time.

    The loop is written out rather than delegated to `model.generate` so that every token passes
    through one place where cancellation, stop strings and incremental detokenization are decided,
    without a streamer thread competing with the compute threads on small machines.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._model = loaded.model
        self._tokenizer = loaded.tokenizer
        self._stop_ids = end_of_turn_ids(loaded.tokenizer, loaded.model.generation_config)

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
        sample = _Sampler(sampling, self.loaded.device)
        generated = 0
        reason: FinishReason = "length"

        with torch.inference_mode():
            input_ids = torch.tensor([prompt.token_ids], device=self.loaded.device)
            cache = None
            while generated < budget:
                if should_stop():
                    reason = "cancelled"
                    break
                out = self._model(input_ids=input_ids, cache=cache, use_cache=True)
                cache = out.cache
                token = sample(out.logits[:, -1, :])
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
                input_ids = torch.tensor([[token]], device=self.loaded.device)
        if tail := matcher.flush():
            yield TextDelta(tail)
        yield Completion(reason, len(prompt.token_ids), generated)

    def warm_up(self) -> None:
        """Run one short generation so the first user request does not pay for lazy init."""
        prompt = self.prepare([ChatMessage("user", "Hi")])
        for _ in self.stream(prompt, SamplingParams(max_tokens=2, temperature=0.0)):
            pass


class _Sampler:
    """Greedy at temperature 0; otherwise temperature and nucleus sampling, seeded per request."""

    def __init__(self, sampling: SamplingParams, device: torch.device) -> None:
        self._greedy = sampling.greedy
        self._temperature = sampling.temperature
        self._top_p = TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None
        self._generator: torch.Generator | None = None
        if sampling.seed is not None and not self._greedy:
            # CPU generator: MPS has none, and CPU draws make a seed mean the same on every device.
            self._generator = torch.Generator("cpu").manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self._greedy:
            return int(logits.argmax(dim=-1).item())
        scores = logits.float() / self._temperature
        if self._top_p is not None:
            scores = self._top_p(None, scores)  # type: ignore[arg-type]  # input_ids unused
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
