"""The transformers backend's sampler: truncation (top-k, top-p, min-p) and the seeded draw, over rows
of logits; model/batch_sampling.py chooses a step's tokens with it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from model.grammar import Constraint
from model.penalties import Penalties
from model.types import SamplingParams


class Picking(Protocol):
    """What a sequence brings to the choice of its next token (model/batch_sampling.py)."""

    sampler: Sampler
    constraint: Constraint | None
    penalties: Penalties | None
    top_logprobs: int | None


def draw_among(sampler: Sampler, logits: torch.Tensor, ids: npt.NDArray[np.int32]) -> int:
    """The sampler's draw from only the tokens `ids` (what a grammar allows): the same
    distribution as masking the rest to -inf (they would get probability 0 under every warper),
    over a few hundred logits instead of the whole vocabulary, and with only the ids, not a
    vocabulary-wide mask, sent to the device."""
    if ids.size == 0:  # a grammar with nothing left (it cannot, while it is not complete)
        raise RuntimeError("the grammar allows no token here")
    index = torch.from_numpy(ids.astype(np.int64)).to(logits.device)
    return int(ids[sampler(logits[:, index])])


# What Sampler.settings gives `draw` for each row, in this order.
SETTINGS = ("temperature", "top_k", "1 - top_p", "min_p")


class Sampler:
    """Greedy at temperature 0; otherwise temperature, then top-k, top-p and min-p truncation (the
    order of transformers' own warpers), and a draw seeded per request.

    The truncation and the draw are `draw`'s, over rows of logits at once: here one row, in
    model/batch_sampling.py every sampling row of a batch step, so a seed gives the same tokens
    either way."""

    def __init__(self, sampling: SamplingParams) -> None:
        self._greedy = sampling.greedy
        self._temperature = sampling.temperature
        self._top_k = max(sampling.top_k, 0)  # 0 and -1 are off
        # 1 - top_p in double, as TopPLogitsWarper computes it; -1 (top_p 1): nothing goes.
        self._top_p_tail = 1.0 - sampling.top_p if sampling.top_p < 1.0 else -1.0
        self._min_p = sampling.min_p
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

    @property
    def settings(self) -> list[float]:
        """This sequence's line of `draw`'s settings: temperature, top_k, 1 - top_p, min_p."""
        return [self._temperature, float(self._top_k), self._top_p_tail, self._min_p]

    def key(self) -> int:
        """The randomness of one draw (`draw`'s key), from the sequence's own generator (the
        default one when unseeded): each call takes the next."""
        return int(torch.randint(0, 2**62, (), generator=self._generator).item())

    def __call__(self, logits: torch.Tensor) -> int:
        if self._greedy:
            return int(logits.argmax(dim=-1).item())
        settings = torch.tensor([self.settings], dtype=torch.float32, device=logits.device)
        keys = torch.tensor([self.key()], dtype=torch.long, device=logits.device)
        return int(draw(logits, settings, keys)[0].item())


# How many of a row's best tokens `draw` looks at before it sorts the whole row: what top_p 0.9 leaves of
# an LLM's distribution is rarely more than a few hundred tokens, and on one CPU core torch.topk finds
# the best 1024 of 128k in ~0.7 ms where the stable sort of the row takes ~13 ms.
CANDIDATES = 1024
# How far below 1 - top_p the mass outside the candidates must stay for top-p alone to remove all of
# it: the full sort adds 128k float32 probabilities up in another order, and a mass within this of the
# threshold could come out on the other side there (the full sort decides then).
OUTSIDE_MARGIN = 1e-4

# Each row's way to its token (`_candidates`): among its candidates, over its whole row, or the sort.
_INSIDE, _WHOLE_ROW, _SORTED = 0, 1, 2


def draw(logits: torch.Tensor, settings: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token id per row of `logits` (rows x width, on the device), each row sampled from
    `truncate`'s distribution with its own line of `settings` (Sampler.settings) and its own key.

    An exponential race, as torch.multinomial draws one sample: the token with the largest
    probability / E wins, with an E ~ Exp(1) for every token. Unlike an inverse-CDF draw (one
    uniform against the cumulative sum over the whole vocabulary, where a last-bit change of any
    logit moves every boundary after it: a batch of another size computes the same row's logits
    a few ulps apart, and over 128k near-equal probabilities that changed the token every few
    draws), the winner here only changes when such noise is larger than its lead.

    The E come from a hash of the row's key and the token id (`_exponentials`), computed on the
    device: one number per row per step from the row's own CPU generator, the same tokens for a
    seed on every device, and nothing that depends on the other rows. So the winner depends only
    on the kept tokens, their probabilities and their ids, not on the order the race visits them
    in, and `truncate`'s full sort of the row is only needed where the kept set cannot be told
    otherwise: most rows find it among their best CANDIDATES (`_candidates`, all rows at once), a
    row without top-p by comparisons over its whole row (`_whole_row`), and only the rest are sorted,
    each of the last two ways as a group.
    """
    if logits.device.type == "cpu":
        # Rows without top-k or top-p: nothing the candidates could save, so they race over their
        # whole rows, each row's way its own whatever else is in the batch. Free to tell on a CPU;
        # on a GPU a wait, where the candidates' topk costs little.
        plain = (settings[:, 1] <= 0) & (settings[:, 2] < 0)
        if bool(plain.all()):
            return _row_by_row(
                _race_whole_rows, logits, settings, keys, torch.full_like(settings[:, 0], -torch.inf)
            )
        if bool(plain.any()):
            tokens = torch.empty(len(settings), dtype=torch.long)
            for part in (plain, ~plain):
                at = part.nonzero()[:, 0]
                tokens[at] = draw(logits[at], settings[at], keys[at])
            return tokens
    scores = logits.float() / settings[:, :1]
    ids, probs, path, kth = _candidates(scores, settings)
    tokens = _race(probs, ids, keys)
    ways = path.tolist()  # on a GPU the one wait of the draw, for a few bytes
    for way in (_WHOLE_ROW, _SORTED):
        taking = [i for i, w in enumerate(ways) if w == way]
        if not taking:
            continue
        at = torch.tensor(taking, device=logits.device)
        if way == _WHOLE_ROW:
            drawn = _row_by_row(_race_whole_rows, logits[at], settings[at], keys[at], kth[at])
        else:
            drawn = _row_by_row(draw_sorted, logits[at], settings[at], keys[at])
        tokens.index_copy_(0, at, drawn)
    return tokens


def _row_by_row(way: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
    """`way` over each row alone on a CPU, where one row's intermediates over the whole vocabulary (a
    few MB at 128k) stay in its caches and a batch's do not (32 rows: 20% faster for the sort, 2x
    for the whole-row race; the candidates' topk, 25% slower so, goes all at once). The same tokens
    either way; elsewhere all rows at once."""
    if rows[0].device.type != "cpu" or rows[0].shape[0] == 1:
        return way(*rows)
    return torch.cat([way(*row) for row in zip(*(t.split(1) for t in rows), strict=True)])


def draw_sorted(logits: torch.Tensor, settings: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`draw` over `truncate`'s full sort of every row: its way for the rows the candidates cannot
    decide, and what it did for every row before them (bench/sampling.py's baseline)."""
    return _race(*truncate(logits, settings), keys)


def _race_whole_rows(
    logits: torch.Tensor, settings: torch.Tensor, keys: torch.Tensor, kth: torch.Tensor
) -> torch.Tensor:
    """The race over every token of rows without top-p, by id."""
    probs = _whole_row(logits.float() / settings[:, :1], settings, kth)
    return _race(probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs), keys)


def _race(probs: torch.Tensor, ids: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The exponential race of each row's tokens `ids` (in any order) at their probabilities."""
    return ids.gather(1, (probs / _exponentials(keys, ids)).argmax(dim=-1, keepdim=True))[:, 0]


def _candidates(
    scores: torch.Tensor, settings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`truncate` over each row's best CANDIDATES only (scores: logits / temperature): their ids
    and probabilities (0 where truncated), the way each row must really take (_INSIDE where the
    candidates hold every token `truncate` keeps, so that their race is the full sort's), and the
    top-k threshold (-inf where off).

    The candidates in the full sort's order (ascending, tied scores by id, as the stable sort leaves
    them) are the last CANDIDATES of the sorted row; the full row's logsumexp gives their exact
    probabilities and the mass of the rest, which top-p removes before any candidate when it is at
    most 1 - top_p. The rest is surely gone by top-k when none of it ties with the k-th best (all
    of it scores below), by min-p when the lowest candidate goes (the rest is no more likely), or
    by top-p when the lowest candidate goes with OUTSIDE_MARGIN to spare, and with it the whole
    run of scores tied with it (the stable sort's order of a tie decides the cumulative sums
    within the run, and torch.topk does not keep it; a run that goes whole goes in any order).
    The probabilities are those of another softmax normalisation and summation order than the
    full sort's, so a float near-tie (at a cut, or between two racers) can come out the other
    way: the same kind of rounding a change of batch gives the logits.
    """
    _, top_k, top_p_tail, min_p = settings.unbind(dim=1)
    width = scores.shape[-1]
    count = min(width, CANDIDATES)
    values, ids = torch.topk(scores, count)
    ids, by_id = ids.sort(dim=-1)
    values, order = values.gather(1, by_id).sort(dim=-1, stable=True)
    ids = ids.gather(1, order)
    lowest = values[:, 0]
    # TopKLogitsWarper: below the k-th best go, ties with it stay. A k beyond the candidates is
    # left to the full sort; k at or over the width keeps all.
    k = top_k.long()
    top_k_on = (k > 0) & (k < width)
    fits = ~top_k_on | (k <= count)
    at = (count - k.clamp(1, count))[:, None]
    kth = torch.where(top_k_on & fits, values.gather(1, at)[:, 0], -torch.inf)
    kept = values.masked_fill(values < kth[:, None], -torch.inf)
    floor = torch.maximum(kth, lowest)[:, None]
    tied = (scores >= floor).sum(dim=-1) > (values >= floor).sum(dim=-1)
    # The full row's logsumexp: over the candidates where top-k leaves nothing else (a top-k row
    # whose k-th best ties with one of the rest is not drawn here).
    among = kept.logsumexp(dim=-1)
    full = torch.where(top_k_on, among, scores.logsumexp(dim=-1))
    outside = (-torch.expm1(among - full)).clamp(min=0.0)
    # TopPLogitsWarper: the cumulative sum of the full row runs through the rest first.
    cumulative = outside[:, None] + (kept - full[:, None]).exp().cumsum(dim=-1)
    gone = cumulative <= top_p_tail[:, None]
    gone[:, -1] = False
    probs = kept.masked_fill(gone, -torch.inf).softmax(dim=-1)
    # MinPLogitsWarper, as `truncate` has it; the ratio to the best decides for the rest.
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, -1:], 0.0)
    cut_by_min_p = (lowest - values[:, -1]).exp() < min_p
    # Ties with the lowest candidate outside the candidates (common in bfloat16, whose 8-bit
    # mantissa makes 128k logits tie in runs) matter only if top-p could cut through their run:
    # when the cumulative sum at the run's end, all of the rest included, is under the cut, the
    # whole run goes whatever order the stable sort gives it.
    run_end = (values == lowest[:, None]).sum(dim=-1, keepdim=True) - 1
    cut_by_p = cumulative.gather(1, run_end)[:, 0] <= top_p_tail - OUTSIDE_MARGIN
    inside = fits & ~(top_k_on & tied) & (top_k_on | cut_by_min_p | cut_by_p)
    if count == width:
        inside = torch.ones_like(inside)
    path = torch.where(inside, _INSIDE, torch.where((top_p_tail < 0) & fits, _WHOLE_ROW, _SORTED))
    return ids, probs, path, kth


def _whole_row(scores: torch.Tensor, settings: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """`truncate`'s probabilities of rows without top-p, by id, without a sort: top-k keeps the
    scores at or over the k-th best (`kth`, ties with it included), min-p the probabilities at or
    over min_p times the best one."""
    min_p = settings[:, 3:4]
    probs = scores.masked_fill(scores < kth[:, None], -torch.inf).softmax(dim=-1)
    return probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)


def truncate(logits: torch.Tensor, settings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's sampling distribution: its probabilities in ascending order (0 where truncated,
    not normalized after min-p) and the token ids in that order.

    transformers' warpers in their order (TopK, TopP, MinP) after the temperature, over one
    ascending sort of each row as vLLM's apply_top_k_top_p does: each warper only removes a run at
    the low end of the sorted row (its least likely tokens), so the row stays sorted and its last
    token, the best, always stays. The sort is stable, so tied logits (common in bfloat16) keep
    their order, whatever else is in the batch.
    """
    temperature, top_k, top_p_tail, min_p = settings.unbind(dim=1)
    scores = logits.float() / temperature[:, None]
    ordered, order = torch.sort(scores, dim=-1, stable=True)
    width = ordered.shape[-1]
    # TopKLogitsWarper: below the k-th best go, ties with it stay; 0 (off) keeps all.
    k = torch.where(top_k > 0, top_k, width).clamp(max=width).long()
    kth = ordered.gather(1, (width - k)[:, None])
    ordered = ordered.masked_fill(ordered < kth, -torch.inf)
    # TopPLogitsWarper: the least likely go while their cumulative probability is at most
    # 1 - top_p (tokens of probability 0 included); the best always stays.
    gone = ordered.softmax(dim=-1).cumsum(dim=-1) <= top_p_tail[:, None]
    gone[:, -1] = False
    ordered = ordered.masked_fill(gone, -torch.inf)
    # MinPLogitsWarper: below min_p times the best token's probability go (never the best).
    probs = ordered.softmax(dim=-1)
    return probs.masked_fill(probs < min_p[:, None] * probs[:, -1:], 0.0), order


# splitmix64's constants (Steele, Lea, Flood 2014), as signed 64-bit integers: torch has no uint64
# arithmetic, and int64 products wrap around the same way on every device.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _exponentials(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """An Exp(1) variate for each token id of each row (rows x n, float32): splitmix64's output
    function over the counter key + (id + 1) * golden ratio, a counter-based generator (as
    Philox is), so a row's variates depend only on its key and the ids."""
    z = keys[:, None] + (ids + 1) * _GOLDEN
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    z = z ^ _shift(z, 31)
    # 48 of its bits as a uniform in (0, 1), in two float32 parts so that small values keep
    # their precision; Exp(1) = -log(1 - u), exact for small u with log1p.
    high = _shift(z, 40).float()
    low = (_shift(z, 16) & 0xFFFFFF).float()
    uniform = (high + (low + 0.5) * 2.0**-24) * 2.0**-24
    return -torch.log1p(-uniform.clamp(max=1.0 - 2.0**-24))


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 values (torch's >> is arithmetic: it copies the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)
