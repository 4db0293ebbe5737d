"""`draw` without the full sort (model/torch_sampling.py): on 128k-wide rows, the kept set found among
the best candidates or over the whole row is `truncate`'s and transformers' warpers', and the drawn
tokens are the full sort's over many keys; rows the candidates cannot decide (a flat row whose top-p
cut lies beyond them, ties with the last candidate, a top_k beyond them) really take the sort."""

from __future__ import annotations

import pytest
import torch

from model.torch_sampling import (
    _INSIDE,
    _SORTED,
    _WHOLE_ROW,
    CANDIDATES,
    _candidates,
    _whole_row,
    draw,
    draw_sorted,
    truncate,
)
from model.types import SamplingParams
from tests.unit.test_batch_sampling import settings_of, warped

pytestmark = pytest.mark.timeout(120)

WIDTH = 128_256
KEYS = 24


def peaked(seed: int) -> torch.Tensor:
    """An LLM-like row: noise over the vocabulary, a few dozen tokens well above it."""
    generator = torch.Generator().manual_seed(seed)
    row = torch.randn(WIDTH, generator=generator) * 2
    favourites = torch.randperm(WIDTH, generator=generator)[:40]
    row[favourites] += torch.linspace(6.0, 14.0, 40)
    return row


def flat(seed: int) -> torch.Tensor:
    return torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed))


def sorted_kept(logits: torch.Tensor, sampling: SamplingParams) -> set[int]:
    probs, order = truncate(logits[None], settings_of(sampling)[0])
    return set(order[0][probs[0] > 0].tolist())


def warped_kept(logits: torch.Tensor, sampling: SamplingParams) -> set[int]:
    """What transformers' own warpers keep of the row."""
    return set(torch.nonzero(warped(logits, sampling) > 0)[:, 0].tolist())


def fast_kept(logits: torch.Tensor, sampling: SamplingParams) -> tuple[int, set[int], set[int]]:
    """The way `draw` takes the row, the kept set among the candidates (whatever the way) and the
    kept set over the whole row (what that way would keep without top-p)."""
    settings = settings_of(sampling)[0]
    scores = logits[None].float() / settings[:, :1]
    ids, probs, path, kth = _candidates(scores, settings)
    whole = _whole_row(scores, settings, kth)
    return int(path), set(ids[0][probs[0] > 0].tolist()), set(torch.nonzero(whole[0] > 0)[:, 0].tolist())


def same_draws(logits: torch.Tensor, sampling: SamplingParams) -> list[int]:
    """The drawn tokens over KEYS keys, asserted the full sort's; returned for further checks."""
    settings, keys = settings_of(SamplingParams(**{**sampling.__dict__, "seed": 7}), KEYS)
    rows = logits.expand(KEYS, -1)
    got = draw(rows, settings, keys)
    assert got.tolist() == draw_sorted(rows, settings, keys).tolist()
    return got.tolist()


def params(**kw: float) -> SamplingParams:
    return SamplingParams(max_tokens=1, **kw)  # type: ignore[arg-type]


FAST = {
    "top-k": (params(temperature=1.0, top_k=40), _INSIDE),
    "top-p": (params(temperature=0.7, top_p=0.9), _INSIDE),
    "top-k top-p": (params(temperature=1.2, top_k=30, top_p=0.8), _INSIDE),
    "min-p": (params(temperature=1.0, min_p=0.05), _INSIDE),
    "all three": (params(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02), _INSIDE),
    "top-p 0": (params(temperature=1.0, top_p=0.0), _INSIDE),
    "top_k over the candidates, no top-p": (params(temperature=1.0, top_k=3 * CANDIDATES), _SORTED),
    "no truncation": (params(temperature=0.7), _WHOLE_ROW),
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_the_candidates_keep_what_the_sort_and_the_warpers_keep(name: str) -> None:
    sampling, way = FAST[name]
    logits = peaked(0)
    path, among, whole = fast_kept(logits, sampling)
    want = sorted_kept(logits, sampling)
    assert path == way
    assert want == warped_kept(logits, sampling)
    if path != _SORTED:  # (sorted, the kept set is the reference's own)
        assert (among if path == _INSIDE else whole) == want
    tokens = same_draws(logits, sampling)
    if len(want) > 1:
        assert len(set(tokens)) > 1, "the draws really sample"


def test_a_flat_row_whose_cut_lies_beyond_the_candidates_takes_the_sort() -> None:
    """At a high temperature top_p 0.95 keeps most of the vocabulary: the candidates alone would
    keep at most CANDIDATES tokens, and the draws land beyond them."""
    sampling = params(temperature=5.0, top_p=0.95)
    logits = flat(3)
    path, among, _ = fast_kept(logits, sampling)
    want = sorted_kept(logits, sampling)
    assert path == _SORTED
    assert len(want) > 10 * CANDIDATES and want == warped_kept(logits, sampling)
    assert len(among) <= CANDIDATES
    best = set(torch.topk(logits, CANDIDATES).indices.tolist())
    tokens = same_draws(logits, sampling)
    assert sum(t not in best for t in tokens) > KEYS // 2


def tied_at_the_last_candidate() -> torch.Tensor:
    """100 tokens at 10, then 3 * CANDIDATES at 5 (the last candidates and many more), the rest at
    -10: a top_p cut inside the tied run keeps its highest ids, as the stable sort orders them."""
    generator = torch.Generator().manual_seed(4)
    row = torch.full((WIDTH,), -10.0)
    spread = torch.randperm(WIDTH, generator=generator)
    row[spread[:100]] = 10.0
    row[spread[100 : 100 + 3 * CANDIDATES]] = 5.0
    return row


def test_ties_with_the_last_candidate_take_the_sort() -> None:
    logits = tied_at_the_last_candidate()
    # exp(10) * 100 against exp(5) * 3072: the 100 hold 0.83, the run 0.17, so top_p 0.85 keeps ~390
    # of the run; the run's 2148 tokens beyond the candidates hold 0.12, under 1 - top_p: without
    # the tie the cut would be decided among the candidates.
    sampling = params(temperature=1.0, top_p=0.85)
    path, among, _ = fast_kept(logits, sampling)
    want = sorted_kept(logits, sampling)
    assert path == _SORTED
    # The stable sort keeps the run's highest ids (TopPLogitsWarper's own sort is not stable).
    run = set(torch.nonzero(logits == 5.0)[:, 0].tolist())
    assert 0 < len(run & want) < len(run)
    assert min(run & want) > max(run - want)
    assert among != want, "torch.topk's pick of the tie is not the stable sort's"
    same_draws(logits, sampling)


def test_top_k_ties_beyond_the_candidates_are_kept() -> None:
    """top_k 150 with the 150th best tied with thousands: all of them stay (TopKLogitsWarper), over
    the whole row without top-p, by the sort with it."""
    logits = tied_at_the_last_candidate()
    for sampling, way in (
        (params(temperature=1.0, top_k=150), _WHOLE_ROW),
        (params(temperature=1.0, top_k=150, top_p=0.99999), _SORTED),
    ):
        path, _, whole = fast_kept(logits, sampling)
        want = sorted_kept(logits, sampling)
        assert path == way
        assert len(want) == 100 + 3 * CANDIDATES and want == warped_kept(logits, sampling)
        if way == _WHOLE_ROW:
            assert whole == want
        same_draws(logits, sampling)


def test_rows_of_every_way_at_once_draw_what_each_draws_alone() -> None:
    """The candidates of all rows at once, then a group per way: each row's token the same as alone."""
    cases = [
        (peaked(5), params(temperature=0.7, top_p=0.9)),
        (flat(6), params(temperature=5.0, top_p=0.95)),
        (peaked(7), params(temperature=0.7)),
        (tied_at_the_last_candidate(), params(temperature=1.0, top_p=0.9)),
        (peaked(8), params(temperature=1.0, top_k=20, min_p=0.1)),
    ]
    logits = torch.stack([row for row, _ in cases])
    for seed in range(4):
        lines = [settings_of(SamplingParams(**{**s.__dict__, "seed": seed})) for _, s in cases]
        settings = torch.cat([line for line, _ in lines])
        keys = torch.cat([key for _, key in lines])
        paths = _candidates(logits / settings[:, :1], settings)[2].tolist()
        assert sorted(set(paths)) == [_INSIDE, _WHOLE_ROW, _SORTED]
        together = draw(logits, settings, keys).tolist()
        rows = zip(logits.split(1), settings.split(1), keys.split(1), strict=True)
        alone = [draw(*row).tolist()[0] for row in rows]
        assert together == alone
        assert together == draw_sorted(logits, settings, keys).tolist()


def test_bfloat16_rows_are_decided_among_the_candidates() -> None:
    """A bfloat16 row (what a model on CUDA returns) ties in runs everywhere: its 1,024th best
    ties with tokens beyond the candidates. Top-p removes that whole run, so the run's order
    cannot matter and the row is still decided among the candidates, drawing what the sort draws."""
    sampling = params(temperature=0.7, top_p=0.9)
    for seed in range(4):
        logits = peaked(seed).bfloat16()
        lowest = torch.topk(logits.float(), CANDIDATES).values[-1]
        assert int((logits.float() == lowest).sum()) > 1, "the 1,024th best ties beyond the candidates"
        path, among, _ = fast_kept(logits, sampling)
        assert path == _INSIDE
        assert among == sorted_kept(logits, sampling)
        same_draws(logits, sampling)
