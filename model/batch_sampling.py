"""Every decoding row's next token from one batched forward's logits, vectorised over the batch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from model.grammar import FORBIDDEN
from model.penalties import Penalties
from model.torch_sampling import SETTINGS, Picking, draw, draw_among
from model.types import SampledLogprobs

log = logging.getLogger(__name__)

Picked = tuple[int, SampledLogprobs | None]


def pick_rows(
    rows: Mapping[int, Picking], logits: torch.Tensor, failed: dict[int, str] | None = None
) -> dict[int, Picked]:
    """Each sequence's token for its row of `logits` (`rows` maps a row to its sequence), and its
    logprobs if it asked: the per-row choice the earlier runner made (bench/dynamic_batch.py's
    `pick`, which the tests hold this to) for every row, with the batch's work done at once.

    Plain greedy rows (no penalties, grammar or logprobs) take their argmax of the batch's logits.
    Every other row gets a float32 copy and, in `pick`'s order: penalties and logit bias (one
    gather to the host and one write-back for all rows), the grammar masks of rows that report
    logprobs, then the argmax of greedy rows and one `draw` for all sampling rows. One transfer
    brings every token to the host; only then, row by row, the grammar's check-first (a refused
    token is drawn again among the allowed ones, for that row alone) and the penalties' counts.
    Drawing first and masking only on a refusal samples what masking first samples without
    truncation; with top-k, top-p or min-p it truncates among all tokens and, on a refusal,
    again among the allowed ones, which can weigh the allowed tokens differently than truncating
    the masked row once: the price of not masking the whole vocabulary at every step.
    The logprobs of the rows that ask come from one log_softmax and one topk.

    Given `failed`, a row whose own part raises (its grammar, its penalties) is left out of the
    result with the reason in `failed`, and the other rows are picked as if it were not there
    (one sequence's bad grammar must not end the batch's every job); without it, that raises.
    """
    order = sorted(rows)
    seqs = [rows[r] for r in order]
    worked = [i for i, seq in enumerate(seqs) if not _plain_greedy(seq)]
    if not worked:
        listed = logits.argmax(dim=-1).tolist()
        return {row: (int(listed[row]), None) for row in order}
    step = _Step.plan(logits, [order[i] for i in worked], [seqs[i] for i in worked])
    broken: dict[int, str] = {}  # worked index: why
    work = step.work(broken if failed is not None else None)
    chosen = step.choose(work)
    if len(worked) < len(seqs):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    tokens.index_copy_(0, step.index, chosen)
    found = step.logprobs(work, chosen)
    listed = tokens.tolist()  # the one transfer of the step's tokens
    work_row = {i: j for j, i in enumerate(worked)}
    picked: dict[int, Picked] = {}
    for i, (row, seq) in enumerate(zip(order, seqs, strict=True)):
        j = work_row.get(i, -1)
        if j in broken and failed is not None:
            failed[row] = broken[j]
            continue
        try:
            token = _settle(seq, int(listed[row]), work[j : j + 1] if j >= 0 else logits[row : row + 1])
        except Exception as exc:
            if failed is None:
                raise
            log.exception("choosing a sequence's token failed")
            failed[row] = f"token choice failed: {exc}"
            continue
        picked[row] = (token, found.get(j))
    return picked


def _settle(seq: Picking, token: int, row: torch.Tensor) -> int:
    """The sequence's drawn `token` checked by its grammar (a refused one drawn again among the
    allowed ones, from its `row` of logits as the draw saw them), and counted by its penalties."""
    if seq.constraint is not None:
        if seq.top_logprobs is not None:
            seq.constraint.commit(token)  # drawn under the mask: allowed by construction
        elif not seq.constraint.accept(token):
            token = draw_among(seq.sampler, row, seq.constraint.allowed(row.shape[-1]))
            seq.constraint.commit(token)
    if seq.penalties is not None:
        seq.penalties.accept(token)
    return token


def _plain_greedy(seq: Picking) -> bool:
    plain = seq.penalties is None and seq.constraint is None and seq.top_logprobs is None
    return plain and seq.sampler.greedy


@dataclass
class _Step:
    """One step's rows beyond plain greedy (`seqs`, at `index` of the batch's logits) and what the
    device needs of the host for them, sent before any work is queued: every index in one copy,
    every sampling setting and logprob temperature in another."""

    logits: torch.Tensor
    seqs: Sequence[Picking]
    index: torch.Tensor  # their rows of the batch's logits
    penalties: list[Penalties]  # of the rows that have them, in order
    touched: tuple[torch.Tensor, torch.Tensor]  # (row, column) of every logit those touch
    masked: list[int]  # rows that report logprobs under a grammar: masked before the draw
    masked_at: torch.Tensor
    sampling_at: torch.Tensor  # rows that are not greedy
    settings: torch.Tensor  # Sampler.settings of each sampling row
    keys: torch.Tensor  # and its key for this draw
    asked: list[int]  # rows that report logprobs
    asked_at: torch.Tensor
    temperature: torch.Tensor  # their logprob temperatures

    @classmethod
    def plan(cls, logits: torch.Tensor, rows: list[int], seqs: list[Picking]) -> _Step:
        device = logits.device
        penalized = [(j, seq.penalties) for j, seq in enumerate(seqs) if seq.penalties is not None]
        ids = [p.ids for _, p in penalized]
        sampling = [j for j, seq in enumerate(seqs) if not seq.sampler.greedy]
        asked = [j for j, seq in enumerate(seqs) if seq.top_logprobs is not None]
        masked = [j for j in asked if seqs[j].constraint is not None]
        touched_rows = np.repeat([j for j, _ in penalized], [len(i) for i in ids])
        touched_columns = np.concatenate([np.zeros(0, np.int64), *ids])
        keys = [seqs[j].sampler.key() for j in sampling]
        index, masked_at, sampling_at, asked_at, touched_row, touched_column, keys_at = _to_device(
            device, torch.long, [rows, masked, sampling, asked, touched_rows, touched_columns, keys]
        )
        settings = [value for j in sampling for value in seqs[j].sampler.settings]
        temperatures = [seqs[j].sampler.logprob_temperature for j in asked]
        flat_settings, temperature = _to_device(device, torch.float32, [settings, temperatures])
        return cls(
            logits=logits,
            seqs=seqs,
            index=index,
            penalties=[p for _, p in penalized],
            touched=(touched_row, touched_column),
            masked=masked,
            masked_at=masked_at,
            sampling_at=sampling_at,
            settings=flat_settings.view(len(sampling), len(SETTINGS)),
            keys=keys_at,
            asked=asked,
            asked_at=asked_at,
            temperature=temperature,
        )

    def work(self, broken: dict[int, str] | None = None) -> torch.Tensor:
        """The rows as float32 (a copy: the batch's logits stay as they are), with their penalties
        and logit bias, and the grammar masks of the rows that report logprobs, applied. Given
        `broken`, a grammar that raises puts its row there (by index into `seqs`) and no mask."""
        work = self.logits.index_select(0, self.index).float()
        if self.touched[0].numel():
            # One gather to the host and one write-back for every row's touched logits.
            gathered = work[self.touched].cpu().numpy()
            parts = np.split(gathered, np.cumsum([len(p.ids) for p in self.penalties])[:-1])
            values = [p.apply(part) for p, part in zip(self.penalties, parts, strict=True)]
            work[self.touched] = torch.from_numpy(np.concatenate(values)).to(work.device)
        if self.masked:
            # The logprobs describe the masked distribution, so the mask is needed anyway: applied
            # first, one draw.
            width = work.shape[-1]
            bias = np.stack([self._bias(j, width, broken) for j in self.masked])
            work.index_add_(0, self.masked_at, torch.from_numpy(bias).to(work.device))
        return work

    def _bias(self, j: int, width: int, broken: dict[int, str] | None) -> npt.NDArray[np.float32]:
        constraint = self.seqs[j].constraint
        assert constraint is not None  # masked rows are grammar rows
        try:
            return constraint.bias(width)
        except Exception as exc:
            if broken is None:
                raise
            log.exception("a sequence's grammar mask failed")
            broken[j] = f"token choice failed: {exc}"
            return np.zeros(width, dtype=np.float32)

    def choose(self, work: torch.Tensor) -> torch.Tensor:
        """Each row's token before the grammar's check: its argmax when greedy, else its draw."""
        sampling = len(self.settings)
        if sampling == 0:
            return work.argmax(dim=-1)
        if sampling == len(self.seqs):
            return draw(work, self.settings, self.keys)
        chosen = work.argmax(dim=-1)
        drawn = draw(work.index_select(0, self.sampling_at), self.settings, self.keys)
        chosen.index_copy_(0, self.sampling_at, drawn)
        return chosen

    def logprobs(self, work: torch.Tensor, chosen: torch.Tensor) -> dict[int, SampledLogprobs]:
        """The logprobs of the rows that ask, at once: the chosen token's log probability and the
        best `top_logprobs` under softmax(logits / logprob temperature), but a token the grammar
        forbids (told by its logit before the temperature, which can bring FORBIDDEN up to any
        size) is not listed. Two transfers: values, then ids."""
        if not self.asked:
            return {}
        tops = [self.seqs[j].top_logprobs or 0 for j in self.asked]
        logits = work.index_select(0, self.asked_at)
        logprobs = torch.log_softmax(logits / self.temperature[:, None], dim=-1)
        best = logprobs.gather(1, chosen.index_select(0, self.asked_at)[:, None])
        most = max(tops)
        values, ids = torch.topk(logprobs, most)
        ids = ids.masked_fill(logits.gather(1, ids) <= float(FORBIDDEN) / 2, -1)
        floats, listed = torch.cat([best, values], dim=1).tolist(), ids.tolist()
        out: dict[int, SampledLogprobs] = {}
        for i, (j, top) in enumerate(zip(self.asked, tops, strict=True)):
            pairs = zip(listed[i][:top], floats[i][1 : top + 1], strict=True)
            out[j] = (floats[i][0], tuple((t, v) for t, v in pairs if t >= 0))
        return out


def _to_device(
    device: torch.device, dtype: torch.dtype, parts: Sequence[Sequence[float] | npt.NDArray[np.generic]]
) -> list[torch.Tensor]:
    """The parts in one host-to-device copy, as views of it (a copy each would be a sync each)."""
    sizes = [len(p) for p in parts]
    kind = np.int64 if dtype == torch.long else np.float32
    flat = np.concatenate([np.asarray(p, dtype=kind) for p in parts])
    return list(torch.from_numpy(flat).to(device).split(sizes))
