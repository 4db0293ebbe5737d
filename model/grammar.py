"""Grammar-constrained decoding (structured outputs), the same on both backends: llguidance.

A sequence with a grammar gets a Constraint. Each step its backend samples as usual, then asks
the constraint whether the grammar allows that token: almost always it does, and that costs one
check. Only when it does not is the full vocabulary mask computed, the forbidden logits set to
-inf and the token sampled again from the same distribution (llama.cpp's common_sampler_sample
does the same), so a 128k vocabulary does not cost a full mask per token.

Grammars arrive as llguidance grammar text, made by the API from a JSON schema
(api/serving/structured.py); each is compiled once per worker and copied per sequence.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

# Compiled grammars kept per worker: a repeated schema costs a copy, not a compile.
CACHE_SIZE = 64
# Added to a forbidden token's logit: finite, so no inf - inf makes a NaN anywhere, and far
# below any real logit, so softmax gives it exactly 0.
FORBIDDEN = np.float32(-1e30)


class Constraint:
    """One sequence's grammar state: what it has accepted, and what it allows next."""

    def __init__(self, matcher: Any, stop_ids: frozenset[int], grammars: Grammars | None = None) -> None:
        self._matcher = matcher
        self._stop_ids = stop_ids
        self._grammars = grammars

    def accept(self, token: int) -> bool:
        """Take the token if the grammar allows it here; False (nothing taken) if not."""
        if token in self._stop_ids:
            # llguidance's try_consume_tokens counts an end-of-turn token as 0 consumed even where
            # it ends the grammar, so those are checked against the grammar being complete.
            return bool(self._matcher.is_accepting() and self._matcher.consume_token(token))
        return bool(self._matcher.try_consume_tokens([token]) == 1)

    def commit(self, token: int) -> None:
        """Take a token sampled under the mask (so allowed by construction)."""
        self._matcher.consume_token(token)

    def allowed(self, vocab_size: int) -> npt.NDArray[np.int32]:
        """The token ids the grammar allows next (below `vocab_size`), ascending."""
        return np.flatnonzero(self._mask(vocab_size)).astype(np.int32)

    def bias(self, vocab_size: int) -> npt.NDArray[np.float32]:
        """What to add to a row of `vocab_size` logits: 0 where the grammar allows the token next,
        FORBIDDEN where it does not (padding rows of an embedding larger than the tokenizer's
        vocabulary never are). An addition, not a masked assignment: on a 128k vocabulary
        numpy's boolean-indexed write took 0.9 ms, this about 0.06 ms."""
        bias = self._mask(vocab_size).astype(np.float32)
        bias -= 1.0
        bias *= -FORBIDDEN
        if bias.size < vocab_size:
            bias = np.concatenate([bias, np.full(vocab_size - bias.size, FORBIDDEN, dtype=np.float32)])
        return bias

    def _mask(self, vocab_size: int) -> npt.NDArray[np.uint8]:
        """One 0/1 byte per token id the grammar knows (at most `vocab_size`): 1 where it allows
        that token next. Counted: each is a full-vocabulary mask computed."""
        if self._grammars is not None:
            self._grammars.masks += 1
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little", count=min(vocab_size, bits.size * 8))


class Grammars:
    """The worker's grammar compiler: the tokenizer bridged once, grammars compiled once each."""

    def __init__(self, tokenizer: Any, stop_ids: frozenset[int]) -> None:
        self._tokenizer_json: str = tokenizer.backend_tokenizer.to_str()
        self._stop_ids = stop_ids
        self._lltokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # pool threads prepare jobs while the loop decodes
        self.compiled = 0  # grammars compiled so far (a cache miss each), for tests and metrics
        self.masks = 0  # full-vocabulary masks computed (a refused sample each)

    def constraint(self, grammar: str) -> Constraint:
        """A fresh constraint for one sequence; raises ValueError for a grammar llguidance refuses."""
        import llguidance  # only workers that see a grammar pay for loading it

        with self._lock:
            if self._lltokenizer is None:
                # ~1 s for a 128k vocabulary, once per worker.
                self._lltokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json, eos_token=sorted(self._stop_ids)
                )
            template = self._compiled.get(grammar)
            if template is None:
                template = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
                if template.is_error():
                    raise ValueError(f"the grammar could not be compiled: {template.get_error()}")
                self.compiled += 1
                self._compiled[grammar] = template
                if len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(grammar)
            return Constraint(template.deep_copy(), self._stop_ids, self)
