"""One sequence's logit_bias and repetition, frequency and presence penalties, applied sparsely.

Both backends share this bookkeeping; each only gathers the touched logits of its row and
writes them back (a numpy view of llama.cpp's buffer, a torch row). Only ids that are biased or
were seen are touched, so a 128k vocabulary costs nothing per token beyond them, and a sequence
with every setting at its default gets no Penalties at all.

The order is vLLM's (v1 Sampler): logit_bias is a logits processor on the raw logits, then
`apply_penalties`: the repetition penalty, then frequency and presence. The grammar mask, the
temperature and the top-k/top-p/min-p truncation come after, in the backends' samplers.

- logit_bias (OpenAI): the bias is added to the token's logit.
- repetition_penalty (vLLM, after CTRL and transformers' RepetitionPenaltyLogitsProcessor):
  for every token of the prompt or the generated text, a positive logit is divided by it and
  any other multiplied, so the token always becomes less likely (for a penalty above 1).
- frequency_penalty and presence_penalty (OpenAI): logit[j] -= frequency_penalty * count[j] +
  presence_penalty * (count[j] > 0), with count[j] how often j was generated so far in this
  sequence (the prompt does not count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from model.types import SamplingParams

FloatArray = npt.NDArray[np.float32]


def penalties_for(
    sampling: SamplingParams, tokens: Sequence[int], generated: int, vocab_size: int
) -> Penalties | None:
    """The sequence's penalties, or None when every one is at its default (nothing to apply).

    `tokens` is what the sequence starts from; its last `generated` are tokens it sampled
    before (a preempted sequence resumes from its prompt and those), counted as generated.
    """
    bias = {t: float(b) for t, b in sampling.logit_bias if 0 <= t < vocab_size}
    counting = sampling.frequency_penalty != 0.0 or sampling.presence_penalty != 0.0
    repeating = sampling.repetition_penalty != 1.0
    if not (bias or counting or repeating):
        return None
    return Penalties(sampling, bias, tokens, generated)


class Penalties:
    """Its touched ids in first-seen order, each with its bias, whether the prompt or the output
    holds it, and how often it was generated; growing arrays, so a step costs O(touched ids)."""

    def __init__(
        self, sampling: SamplingParams, bias: dict[int, float], tokens: Sequence[int], generated: int
    ) -> None:
        # A logit_bias id outside the vocabulary is dropped by penalties_for (ignored rather than
        # clamped: clamping would bias some unrelated token). The API validates ids anyway.
        self._frequency = np.float32(sampling.frequency_penalty)
        self._presence = np.float32(sampling.presence_penalty)
        self._repetition = np.float32(sampling.repetition_penalty)
        self._counting = sampling.frequency_penalty != 0.0 or sampling.presence_penalty != 0.0
        self._repeating = sampling.repetition_penalty != 1.0
        self._biased = bool(bias)
        self._index: dict[int, int] = {}
        self._ids = np.zeros(max(16, len(bias)), dtype=np.int64)
        self._bias = np.zeros_like(self._ids, dtype=np.float32)
        self._seen = np.zeros_like(self._ids, dtype=bool)
        self._counts = np.zeros_like(self._ids, dtype=np.float32)
        # The slot is taken before the array is indexed: taking one may grow (replace) the arrays.
        for token, value in bias.items():
            i = self._slot(token)
            self._bias[i] = value
        split = len(tokens) - generated
        if self._repeating:  # only the repetition penalty looks at the prompt
            for token in tokens[:split]:
                i = self._slot(token)
                self._seen[i] = True
        for token in tokens[split:]:
            self.accept(token)

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        """The token ids whose logits `apply` changes (first-seen order)."""
        return self._ids[: len(self._index)]

    def accept(self, token: int) -> None:
        """Count one token the sequence sampled."""
        if not (self._counting or self._repeating):
            return  # logit_bias alone never changes
        i = self._slot(token)
        self._seen[i] = True
        self._counts[i] += 1

    def apply(self, logits: FloatArray) -> FloatArray:
        """The logits of `ids` (gathered from a row, in that order) as they should be."""
        n = len(self._index)
        out = logits.astype(np.float32, copy=True)
        if self._biased:
            out += self._bias[:n]
        if self._repeating:
            seen = self._seen[:n]
            scaled = np.where(out > 0, out / self._repetition, out * self._repetition)
            out = np.where(seen, scaled, out).astype(np.float32, copy=False)
        if self._counting:
            counts = self._counts[:n]
            out -= self._frequency * counts + self._presence * (counts > 0)
        return out

    def apply_to_row(self, row: FloatArray) -> None:
        """Apply in place to a full row of logits (a numpy view, e.g. of llama.cpp's buffer)."""
        ids = self.ids
        row[ids] = self.apply(row[ids])

    def _slot(self, token: int) -> int:
        i = self._index.get(token)
        if i is not None:
            return i
        i = len(self._index)
        if i == self._ids.size:
            self._grow()
        self._index[token] = i
        self._ids[i] = token
        return i

    def _grow(self) -> None:
        size = self._ids.size * 2
        self._ids = np.resize(self._ids, size)
        self._bias = np.concatenate([self._bias, np.zeros(size - self._bias.size, dtype=np.float32)])
        self._seen = np.concatenate([self._seen, np.zeros(size - self._seen.size, dtype=bool)])
        self._counts = np.concatenate([self._counts, np.zeros(size - self._counts.size, dtype=np.float32)])
