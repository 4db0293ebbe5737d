"""Per-sequence token choice on the transformers backend: penalties, grammar, sampler, logprobs."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model.grammar import FORBIDDEN, Constraint
from model.penalties import Penalties
from model.types import SampledLogprobs, SamplingParams


class Picking(Protocol):
    """What a sequence brings to the choice of its next token (both batch runners' sequences)."""

    sampler: Sampler
    constraint: Constraint | None
    penalties: Penalties | None
    top_logprobs: int | None


def pick(seq: Picking, logits: torch.Tensor) -> tuple[int, SampledLogprobs | None]:
    """The sequence's token for its row of logits (1 x vocab), and its logprobs if it asked.

    In vLLM's order: logit_bias and penalties on the raw logits, then the grammar, then the
    sampler's temperature and truncation (model/penalties.py).
    """
    if seq.penalties is not None:
        logits = logits.float()  # a copy unless already float32; the batch's row is not reused
        ids = torch.from_numpy(seq.penalties.ids).to(logits.device)
        touched = logits[0, ids].cpu().numpy()
        logits[0, ids] = torch.from_numpy(seq.penalties.apply(touched)).to(logits.device)
    if seq.constraint is not None and seq.top_logprobs is not None:
        # The logprobs describe the masked distribution, so the mask is needed anyway: applied
        # first, one draw. (Drawing first and masking only on a refusal samples the same
        # distribution; it is only cheaper when no mask is needed at all.)
        logits = logits.float() + _mask(seq.constraint, logits)
        token = seq.sampler(logits)
        seq.constraint.commit(token)
    else:
        token = seq.sampler(logits)
        if seq.constraint is not None and not seq.constraint.accept(token):
            token = _draw_among(seq.sampler, logits, seq.constraint.allowed(logits.shape[-1]))
            seq.constraint.commit(token)
    if seq.penalties is not None:
        seq.penalties.accept(token)
    if seq.top_logprobs is None:
        return token, None
    return token, _logprobs(logits[0], seq.sampler.logprob_temperature, token, seq.top_logprobs)


def _draw_among(sampler: Sampler, logits: torch.Tensor, ids: npt.NDArray[np.int32]) -> int:
    """The sampler's draw from only the tokens `ids` (what a grammar allows): the same
    distribution as masking the rest to -inf (they would get probability 0 under every warper),
    over a few hundred logits instead of the whole vocabulary, and with only the ids, not a
    vocabulary-wide mask, sent to the device."""
    if ids.size == 0:  # a grammar with nothing left (it cannot, while it is not complete)
        raise RuntimeError("the grammar allows no token here")
    index = torch.from_numpy(ids.astype(np.int64)).to(logits.device)
    return int(ids[sampler(logits[:, index])])


def _mask(constraint: Constraint, logits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(constraint.bias(logits.shape[-1])).to(logits.device)


def _logprobs(logits: torch.Tensor, temperature: float, token: int, top: int) -> SampledLogprobs:
    """The token's log probability and the `top` best, under softmax(logits / temperature)."""
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = float(logprobs[token].item())
    if top == 0:
        return chosen, ()
    values, ids = torch.topk(logprobs, top)
    # A token the grammar forbids could never be drawn: not an alternative worth listing. (Told
    # by its logit before the temperature, which can bring -1e30 up to any size.)
    allowed = (logits[ids].float() > float(FORBIDDEN) / 2).tolist()
    best = zip(ids.tolist(), values.tolist(), allowed, strict=True)
    return chosen, tuple((i, v) for i, v, ok in best if ok)


class Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, top-p and min-p truncation (the
    order of transformers' own warpers), and a draw seeded per request."""

    def __init__(self, sampling: SamplingParams) -> None:
        self._greedy = sampling.greedy
        self._temperature = sampling.temperature
        self._top_k = TopKLogitsWarper(sampling.top_k) if sampling.top_k > 0 else None
        self._top_p = TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None
        self._min_p = MinPLogitsWarper(sampling.min_p) if sampling.min_p > 0.0 else None
        self._generator: torch.Generator | None = None
        if sampling.seed is not None and not self._greedy:
            # CPU generator: MPS has none, and CPU draws make a seed mean the same on every device.
            self._generator = torch.Generator("cpu").manual_seed(sampling.seed)

    @property
    def greedy(self) -> bool:
        return self._greedy

    @property
    def logprob_temperature(self) -> float:
        """The temperature logprobs are reported at: the request's, or 1 when greedy."""
        return 1.0 if self._greedy else self._temperature

    def __call__(self, logits: torch.Tensor) -> int:
        if self._greedy:
            return int(logits.argmax(dim=-1).item())
        scores = logits.float() / self._temperature
        for warper in (self._top_k, self._top_p, self._min_p):
            if warper is not None:
                scores = warper(None, scores)  # type: ignore[arg-type]  # input_ids unused
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
