"""The earlier DynamicCache batch runner (TorchBatch), kept as the baseline of bench/kv_cache.py, with
its per-row token choice (`pick`: bench/sampling.py's baseline and the tests' reference).

bench imports model, never the reverse: what the worker runs is model/slot_batch.py's SlotBatch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from model.grammar import FORBIDDEN, Constraint
from model.loading import LoadedModel
from model.penalties import Penalties, penalties_for
from model.scheduler import PREFILL_BATCH_TOKENS, PREFILL_CHUNK_TOKENS
from model.torch_sampling import Picking, Sampler, draw_among
from model.types import SampledLogprobs, SamplingParams, StepOutput

log = logging.getLogger(__name__)


def pick(seq: Picking, logits: torch.Tensor) -> tuple[int, SampledLogprobs | None]:
    """The sequence's token for its row of logits (1 x vocab), and its logprobs if it asked: the
    earlier runner's choice, one row at a time; the worker's is model/batch_sampling.py's
    `pick_rows`, which the tests check against this one.

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
        # first, one draw. (Drawing first and masking only on a refusal, the cheaper way taken
        # otherwise, samples the same distribution without truncation; with top-k, top-p or
        # min-p it truncates among all tokens and, on a refusal, again among the allowed ones,
        # which can weigh the allowed tokens differently than truncating the masked row once.)
        logits = logits.float() + _grammar_mask(seq.constraint, logits)
        token = seq.sampler(logits)
        seq.constraint.commit(token)
    else:
        token = seq.sampler(logits)
        if seq.constraint is not None and not seq.constraint.accept(token):
            token = draw_among(seq.sampler, logits, seq.constraint.allowed(logits.shape[-1]))
            seq.constraint.commit(token)
    if seq.penalties is not None:
        seq.penalties.accept(token)
    if seq.top_logprobs is None:
        return token, None
    return token, row_logprobs(logits[0], seq.sampler.logprob_temperature, token, seq.top_logprobs)


def _grammar_mask(constraint: Constraint, logits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(constraint.bias(logits.shape[-1])).to(logits.device)


def row_logprobs(logits: torch.Tensor, temperature: float, token: int, top: int) -> SampledLogprobs:
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


def with_dynamic_batch(loaded: LoadedModel) -> LoadedModel:
    """`loaded` (a transformers model) with a fresh TorchBatch as its runner, as many slots, over the
    same weights: the runner it came with is left out, so the two never share a cache."""
    assert loaded.backend == "transformers", "TorchBatch runs transformers models only"
    runner = TorchBatch(loaded.model, torch.device(loaded.device), loaded.runner.capacity)
    return replace(loaded, runner=runner)


@dataclass
class _Seq:
    sampler: Sampler
    constraint: Constraint | None
    prompt: Sequence[int]
    pending: list[int]  # prompt tokens still to prefill (all but the prompt's last)
    next_token: int  # the token fed at the next decode step: the prompt's last, then each sampled
    admitted: int  # admission order: prefill is first come, first served
    cache: DynamicCache | None  # its own cache while prefilling; None once its row is in the batch
    penalties: Penalties | None = None  # logit_bias and penalties, None when all are off
    top_logprobs: int | None = None  # alternatives to report per token; None: no logprobs asked
    length: int = 0  # tokens whose KV the sequence holds: the position of the next one fed
    source: int | None = None  # the slot of a sibling whose prompt KV it waits for, not prefilling


class TorchBatch:
    """Every decoding sequence in one batched forward per step, over one transformers DynamicCache:
    the path before SlotBatch (model/slot_batch.py), kept for the benchmark's side-by-side
    (with_dynamic_batch). Each step's concatenation copies every row's whole KV.

    The batch cache holds one row per decoding sequence, left-padded to a common length; a 2-D
    attention mask hides each row's padding and explicit position ids give each row its own
    positions, so padding never changes a sequence's logits. A new prompt but its last token is
    prefilled on its own cache, at most PREFILL_CHUNK_TOKENS per step while others decode (so
    their streams keep a token every step); its cache rows then join the batch, the shorter side
    left-padded, and its last prompt token is its first decode step. A dropped sequence's row is
    removed and leading columns that became padding in every row are trimmed.

    Per step, as LlamaCppBatch: one decode forward for every sequence whose prompt is in, then
    prefill chunks of the others; a slot returns a token only when it sampled one.

    Why not transformers' own continuous batching (`model.init_continuous_batching`): its manager
    runs generation on a background thread over a paged cache, and its per-request logits
    processing is limited to built-in temperature/top-k/top-p warpers. The sequence here keeps its
    own sampler (a seeded CPU generator per request), and grammars and penalties need a per-sequence
    logits mask and penalties at every step; a plain batched forward with cache classes leaves the
    logits of each row to us.

    A sibling of the same prompt (`share_from`) does not prefill: once the sibling's prompt is
    in, its KV for those positions is copied (from the sibling's own cache, or sliced out of its
    batch row) into the new sequence's cache, which then joins like any prefilled one. Were the
    sibling to end first, the first one waiting takes what it had and prefills the rest, and the
    others wait for that one instead.

    Every layer is a full DynamicLayer (the cache is built without the model config), so rows
    can be padded and merged uniformly. Tested on Llama-architecture models only; sliding-window
    or hybrid-attention models would keep full caches and are not verified here.
    """

    def __init__(self, model: Any, device: torch.device, slots: int) -> None:
        self._model = model
        self._device = device
        self._capacity = slots
        self._seqs: dict[int, _Seq] = {}
        self._rows: list[int] = []  # the slot of each batch-cache row, in row order
        self._cache: DynamicCache | None = None
        self._clock = 0
        self._vocab_size = int(model.config.vocab_size)  # the width of a row of logits
        self.shared_prefill_tokens = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def can_admit(self, positions: int) -> bool:
        # The cache grows as it is used (no preallocated pool), so only the slot count limits.
        return len(self._seqs) < self._capacity

    def add(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        positions: int,
        constraint: Constraint | None = None,
        generated: int = 0,
        share_from: int | None = None,
    ) -> int:
        slot = next(i for i in range(self._capacity) if i not in self._seqs)
        self._clock += 1
        self._seqs[slot] = _Seq(
            Sampler(sampling),
            constraint,
            prompt,
            list(prompt[:-1]),
            int(prompt[-1]),
            self._clock,
            DynamicCache(),
            penalties=penalties_for(sampling, prompt, generated, self._vocab_size),
            top_logprobs=sampling.top_logprobs if sampling.logprobs else None,
            source=None if share_from is None else self._source(share_from, prompt),
        )
        return slot

    def drop(self, slot: int) -> None:
        seq = self._seqs.get(slot)
        if seq is None:
            return
        with torch.inference_mode():
            self._hand_over(slot)
            del self._seqs[slot]
            if slot in self._rows:  # else it never decoded: its own prefill cache goes with it
                self._remove_row(self._rows.index(slot))

    def step(self) -> StepOutput:
        out = StepOutput()
        with torch.inference_mode():
            self._share()
            prefilled = [(slot, s) for slot, s in self._seqs.items() if not s.pending and s.cache is not None]
            for slot, seq in sorted(prefilled, key=lambda p: p[1].admitted):
                self._join(slot, seq)
            decoding = bool(self._rows)
            if decoding and not self._decode(out):
                return out
            self._prefill(out, PREFILL_CHUNK_TOKENS if decoding else PREFILL_BATCH_TOKENS)
        return out

    def _decode(self, out: StepOutput) -> bool:
        """One token for every row; False when the forward failed (the newest row then fails)."""
        assert self._cache is not None
        seqs = [self._seqs[slot] for slot in self._rows]
        width = self._cache.get_seq_length()
        lengths = torch.tensor([s.length for s in seqs], device=self._device)
        columns = torch.arange(width + 1, device=self._device)
        # A row of `length` tokens sits right-aligned in `width` columns; the new token is the last.
        mask = (columns.unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()
        tokens = torch.tensor([[s.next_token] for s in seqs], device=self._device)
        try:
            result = self._model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=lengths.unsqueeze(1),
                cache=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        except RuntimeError as exc:  # out of memory, most likely: the newest gives its room back
            log.warning("batched decode of %d sequences failed: %s", len(seqs), exc)
            self._crop_to(width)
            newest = max(self._rows, key=lambda slot: self._seqs[slot].admitted)
            out.failed[newest] = f"decode failed: {exc}"
            return False
        self._cache = result.cache
        logits = result.logits[:, -1, :]
        for row, (slot, seq) in enumerate(zip(self._rows, seqs, strict=True)):
            seq.next_token, logprobs = pick(seq, logits[row : row + 1])
            seq.length += 1
            out.tokens[slot] = seq.next_token
            if logprobs is not None:
                out.logprobs[slot] = logprobs
        return True

    def _prefill(self, out: StepOutput, budget: int) -> None:
        waiting = sorted(
            ((slot, seq) for slot, seq in self._seqs.items() if seq.pending and seq.source is None),
            key=lambda p: p[1].admitted,
        )
        for slot, seq in waiting:
            if budget <= 0:
                return
            chunk = seq.pending[:budget]
            positions = torch.arange(seq.length, seq.length + len(chunk), device=self._device)
            try:
                result = self._model(
                    input_ids=torch.tensor([chunk], device=self._device),
                    position_ids=positions.unsqueeze(0),
                    cache=seq.cache,
                    use_cache=True,
                    logits_to_keep=1,  # none are needed; a 128k vocabulary's for every token are large
                )
            except RuntimeError as exc:
                log.warning("prefill of %d tokens failed: %s", len(chunk), exc)
                out.failed[slot] = f"prefill failed: {exc}"
                seq.pending, seq.cache = [], None
                continue
            budget -= len(chunk)
            seq.pending = seq.pending[len(chunk) :]
            seq.length += len(chunk)
            seq.cache = result.cache

    def _source(self, share_from: int, prompt: Sequence[int]) -> int | None:
        """The slot whose prefill a new sequence of `prompt` will share: `share_from`, or the one
        that one waits for itself; None when there is nothing to share."""
        slot = share_from
        sibling = self._seqs.get(slot)
        if sibling is not None and sibling.source is not None:  # a waiting one waits for one that prefills
            slot = sibling.source
            sibling = self._seqs[slot]
        head = len(prompt) - 1
        # Its prompt but the last token (what it prefills) must begin with this one's.
        if sibling is None or head == 0 or len(sibling.prompt) - 1 < head:
            return None
        return slot if list(sibling.prompt[:head]) == list(prompt[:head]) else None

    def _share(self) -> None:
        """Hand each waiting sibling the prompt KV of the one it waits for, once that is in."""
        for seq in self._seqs.values():
            if seq.source is not None and not self._seqs[seq.source].pending:
                self._take(seq, seq.source)

    def _hand_over(self, slot: int) -> None:
        """A sequence ends: the oldest sibling waiting for its prompt takes what it holds of it
        and prefills the rest; the others wait for that one."""
        waiting = sorted(
            ((s, seq) for s, seq in self._seqs.items() if seq.source == slot), key=lambda p: p[1].admitted
        )
        if not waiting:
            return
        heir, seq = waiting[0]
        self._take(seq, slot)
        for _, other in waiting[1:]:
            other.source = heir

    def _take(self, seq: _Seq, source: int) -> None:
        """Give `seq` (waiting, with nothing of its own) a copy of the KV `source` holds of its prompt."""
        seq.source = None
        n = min(len(seq.pending), self._seqs[source].length)
        cache = self._prefix(source, n) if n else None
        if cache is None:
            return  # nothing to take: it prefills on its own
        seq.cache, seq.length, seq.pending = cache, n, seq.pending[n:]
        self.shared_prefill_tokens += n

    def _prefix(self, slot: int, n: int) -> DynamicCache | None:
        """A copy of the KV of the slot's first `n` positions, from its own cache or its batch row."""
        seq = self._seqs[slot]
        if seq.cache is not None:
            row, start = 0, 0
            layers = _layers(seq.cache)
        elif slot in self._rows:
            assert self._cache is not None
            row, start = self._rows.index(slot), self._cache.get_seq_length() - seq.length
            layers = _layers(self._cache)
        else:  # its prefill failed: nothing kept
            return None
        copy = DynamicCache()
        for layer in layers:
            keys, values = _kv(layer)
            # Cloned, not viewed: the batch cache's rows are re-cut as sequences come and go.
            taken = DynamicLayer()
            taken.lazy_initialization(keys, values)
            taken.keys = keys[row : row + 1, :, start : start + n].clone()
            taken.values = values[row : row + 1, :, start : start + n].clone()
            copy.layers.append(taken)
        return copy

    def _join(self, slot: int, seq: _Seq) -> None:
        """Move a prefilled sequence's cache into the batch as its last row."""
        cache, seq.cache = seq.cache, None
        assert cache is not None
        rows = len(self._rows)
        self._rows.append(slot)
        if self._cache is None:
            self._cache = cache
            return
        width, length = self._cache.get_seq_length(), cache.get_seq_length()
        # A one-token prompt has no KV before its decode step, and a batch of only such rows has
        # none yet either: the side without layers becomes zero rows shaped like the other's. When
        # neither has any, the next forward creates every row's layers at once.
        if length == 0:
            if width > 0:
                _stack(self._cache, _zero_rows(self._cache, 1))
            return
        if width == 0:
            _stack(cache, _zero_rows(cache, rows), first=True)
            self._cache = cache
            return
        _stack(self._cache, cache)

    def _remove_row(self, row: int) -> None:
        del self._rows[row]
        if not self._rows:
            self._cache = None
            return
        assert self._cache is not None
        keep = [i for i in range(len(self._rows) + 1) if i != row]
        self._cache.batch_select_indices(torch.tensor(keep, device=self._device))
        # Columns that are now padding in every row only cost attention work: slice them off
        # (a view; the next step's concatenation copies the rest anyway).
        unused = self._cache.get_seq_length() - max(self._seqs[slot].length for slot in self._rows)
        if unused > 0:
            for layer in _layers(self._cache):
                keys, values = _kv(layer)
                layer.keys, layer.values = keys[..., unused:, :], values[..., unused:, :]

    def _crop_to(self, width: int) -> None:
        """Undo a failed forward's appends: layers it reached hold one column too many."""
        assert self._cache is not None
        for layer in _layers(self._cache):
            extra = layer.get_seq_length() - width
            if extra > 0:
                layer.crop(-extra)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers, each a plain DynamicLayer whose key/value rows can be padded and merged."""
    layers = cache.layers
    assert all(isinstance(layer, DynamicLayer) for layer in layers), "a layer kind TorchBatch cannot merge"
    return layers  # type: ignore[return-value]  # narrowed by the assert above


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    # Every layer has seen at least one prompt token by the time its sequence joins the batch.
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _zero_rows(like: DynamicCache, rows: int) -> DynamicCache:
    """A cache of `rows` all-padding rows as wide as `like`."""
    zeros = DynamicCache()
    for layer in _layers(like):
        keys, values = _kv(layer)
        blank = DynamicLayer()
        blank.lazy_initialization(keys, values)
        blank.keys = keys.new_zeros((rows, *keys.shape[1:]))
        blank.values = values.new_zeros((rows, *values.shape[1:]))
        zeros.layers.append(blank)
    return zeros


def _stack(base: DynamicCache, other: DynamicCache, *, first: bool = False) -> None:
    """Put `other`'s rows after `base`'s (before them if `first`), left-padding the narrower side.

    DynamicCache has no merge of two caches; its layers' keys and values are plain
    [batch, heads, positions, head_dim] tensors, concatenated here on the batch axis.
    """
    width, length = base.get_seq_length(), other.get_seq_length()
    grow, pad = max(length - width, 0), max(width - length, 0)
    for mine, theirs in zip(_layers(base), _layers(other), strict=True):
        (keys, values), (new_keys, new_values) = _kv(mine), _kv(theirs)
        key_parts = [_pad_left(keys, grow), _pad_left(new_keys, pad)]
        value_parts = [_pad_left(values, grow), _pad_left(new_values, pad)]
        if first:
            key_parts.reverse()
            value_parts.reverse()
        mine.keys, mine.values = torch.cat(key_parts), torch.cat(value_parts)


def _pad_left(kv: torch.Tensor, columns: int) -> torch.Tensor:
    """Zero key/value columns before a row's own: masked out, they never reach the softmax."""
    if columns == 0:
        return kv
    return torch.nn.functional.pad(kv, (0, 0, columns, 0))
