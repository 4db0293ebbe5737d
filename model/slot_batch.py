"""The transformers backend's batch runner over KV allocated once (SlotBatch): the default."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model.batch_sampling import pick_rows
from model.decode_graphs import DecodeGraphs, row_bucket, width_bucket
from model.grammar import Constraint
from model.penalties import Penalties, penalties_for
from model.scheduler import PREFILL_BATCH_TOKENS, PREFILL_CHUNK_TOKENS
from model.slot_attention import SLOT_SDPA, rows_apart
from model.slot_cache import SlotCache
from model.torch_sampling import Sampler
from model.types import SamplingParams, StepOutput

log = logging.getLogger(__name__)


@dataclass
class _Seq:
    sampler: Sampler
    constraint: Constraint | None
    prompt: Sequence[int]
    pending: list[int]  # prompt tokens still to prefill (all but the prompt's last)
    next_token: int  # the token fed at the next decode step: the prompt's last, then each sampled
    admitted: int  # admission order: prefill is first come, first served
    penalties: Penalties | None = None  # logit_bias and penalties, None when all are off
    top_logprobs: int | None = None  # alternatives to report per token; None: no logprobs asked
    length: int = 0  # tokens whose KV its row holds: the position of the next one fed
    source: int | None = None  # the slot of a sibling whose prompt KV it waits for, not prefilling
    failed: bool = False  # its prefill failed: it neither decodes nor prefills until dropped

    @property
    def decoding(self) -> bool:
        return not self.pending and self.source is None and not self.failed


class SlotBatch:
    """Every decoding sequence in one batched forward per step, over KV allocated once (SlotCache).

    Slot i's sequence owns row i of the store. A new prompt but its last token is prefilled
    straight into its row, at most PREFILL_CHUNK_TOKENS per step while others decode (so their
    streams keep a token every step); its last prompt token is its first decode step. A decode
    step runs rows 0..h (h the highest decoding slot), each writing its new token's KV at its own
    position and attending to its own columns only; rows in that range that do not decode (free,
    or still prefilling) ride along masked to one column and write where their own next token will
    overwrite it. New sequences take the lowest free slot, so the range stays as small as the
    batch. A dropped sequence's row is simply no longer read.

    Per step, as LlamaCppBatch: one decode forward for every sequence whose prompt is in, then
    prefill chunks of the others; a slot returns a token only when it sampled one.

    A sibling of the same prompt (`share_from`) does not prefill: once the sibling's prompt is in,
    its row's columns for those positions are copied into the new sequence's row. Were the sibling
    to end first, the first one waiting takes what it had and prefills the rest, and the others
    wait for that one instead.

    Every slot may hold the model's whole context, so nothing is preempted; memory is slots x
    the longest row's positions (allocated in chunks as rows grow) x the KV of one position.

    Why not transformers' own continuous batching (`model.init_continuous_batching`): its manager
    runs generation on a background thread over a paged cache, and its per-request logits
    processing is limited to built-in temperature/top-k/top-p warpers (5.x); grammars, penalties,
    logit bias and per-request seeds need each row's logits at every step. Its Cache classes do not
    fit either: StaticCache writes every row at one shared position, DynamicCache grows by
    concatenation; the store here is a Cache subclass, so the model's own attention runs on it.

    Tested on Llama-architecture models (full attention in every layer) only.
    """

    def __init__(
        self,
        model: Any,
        device: torch.device,
        slots: int,
        max_positions: int,
        *,
        static_shapes: bool = False,
        graphs: bool = False,
        attend_apart: bool = True,
    ) -> None:
        """`static_shapes` rounds each decode forward's rows and columns up to buckets
        (model/decode_graphs.py); `graphs` (CUDA only, implies it) replays the step as CUDA graphs;
        `attend_apart` False keeps the CPU's decode attention one masked call (the bench's baseline)."""
        self._model = model
        self._device = device
        self._capacity = slots
        self._seqs: dict[int, _Seq] = {}
        self._clock = 0
        config = model.config.get_text_config()
        self._vocab_size = int(model.config.vocab_size)  # the width of a row of logits
        eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
        self.cache = SlotCache(
            int(config.num_hidden_layers),
            slots,
            max_positions,
            additive_mask=model.dtype if eager else None,
        )
        self.shared_prefill_tokens = 0
        self._cache_checked = False
        use_graphs = graphs and device.type == "cuda"
        self._static = static_shapes or use_graphs
        self.graphs = DecodeGraphs(model, self.cache) if use_graphs else None
        # On the CPU, rows of very different lengths attend one by one (model/slot_attention.py);
        # the registered attention is transformers' SDPA whenever the forward does not ask for that.
        apart = attend_apart and device.type == "cpu" and not self._static
        if apart and getattr(config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(SLOT_SDPA)
        self._rows_apart = apart and getattr(config, "_attn_implementation", None) == SLOT_SDPA

    @property
    def capacity(self) -> int:
        return self._capacity

    def can_admit(self, positions: int) -> bool:
        # Every slot can hold the whole context: only the slot count limits.
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
            penalties=penalties_for(sampling, prompt, generated, self._vocab_size),
            top_logprobs=sampling.top_logprobs if sampling.logprobs else None,
            source=None if share_from is None else self._source(share_from, prompt),
        )
        return slot

    def drop(self, slot: int) -> None:
        if slot not in self._seqs:
            return
        with torch.inference_mode():
            self._hand_over(slot)
        del self._seqs[slot]  # its row is left as it is: whoever takes the slot overwrites it

    def step(self) -> StepOutput:
        out = StepOutput()
        with torch.inference_mode():
            self._share()
            decoding = any(seq.decoding for seq in self._seqs.values())
            if decoding and not self._decode(out):
                return out
            self._prefill(out, PREFILL_CHUNK_TOKENS if decoding else PREFILL_BATCH_TOKENS)
        return out

    def _decode(self, out: StepOutput) -> bool:
        """One token for every decoding row; False when the forward failed (the newest then fails)."""
        decoding = sorted(slot for slot, seq in self._seqs.items() if seq.decoding)
        # A row with no column left fails alone (its budget should have stopped it first);
        # left in, it would fail the step, and with it the newest row, step after step.
        full = [slot for slot in decoding if self._seqs[slot].length >= self.cache.max_positions]
        for slot in full:
            out.failed[slot] = "decode failed: the context is full"
        if full:
            return False
        rows = decoding[-1] + 1
        if self._static:
            rows = row_bucket(rows, self._capacity)
        present = [self._seqs.get(row) for row in range(rows)]
        # A row that does not decode writes at its own next position (free: 0), where its next
        # token's KV will overwrite it, and attends to column 0 only: finite, and never read.
        writes = [seq.length if seq is not None else 0 for seq in present]
        attends = [seq.length if seq is not None and seq.decoding else 0 for seq in present]
        tokens = [[seq.next_token if seq is not None and seq.decoding else 0] for seq in present]
        width = width_bucket(max(attends) + 1, self.cache.max_positions) if self._static else 0
        try:
            mask = self.cache.plan_decode(writes, attends, self._device, width)
            inputs = torch.tensor(tokens, device=self._device)
            positions = torch.tensor(writes, device=self._device).unsqueeze(1)
            replayed = self.graphs.forward(inputs, positions, mask) if self.graphs is not None else None
            if replayed is None:
                widths = [upto + 1 for upto in attends]
                apart = {"slot_widths": widths} if self._rows_apart and rows_apart(widths) else {}
                replayed = self._model(
                    input_ids=inputs,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **apart,
                ).logits
        except (RuntimeError, ValueError) as exc:  # out of memory: the newest fails
            log.warning("batched decode of %d sequences failed: %s", len(decoding), exc)
            newest = max(decoding, key=lambda slot: self._seqs[slot].admitted)
            out.failed[newest] = f"decode failed: {exc}"
            return False  # nothing to undo: the columns written lie past every row's length
        self._check_cache_taken()
        logits = replayed[:, -1, :]
        # Every row's choice at once (model/batch_sampling.py): a few device ops and transfers for
        # the batch, not a device round trip per row.
        # A row whose own grammar or penalties raise fails alone (out.failed), as a forward would.
        picked = pick_rows({slot: self._seqs[slot] for slot in decoding}, logits, out.failed)
        for slot in decoding:
            if slot not in picked:
                continue
            seq = self._seqs[slot]
            seq.next_token, logprobs = picked[slot]
            seq.length += 1
            out.tokens[slot] = seq.next_token
            if logprobs is not None:
                out.logprobs[slot] = logprobs
        return True

    def _check_cache_taken(self) -> None:
        """After the first forward: the model wrote into the store (a transformers that takes the
        cache under another argument name would build its own and answer from that, silently)."""
        if self._cache_checked:
            return
        if not self.cache.written():
            raise RuntimeError("the model did not use the slot cache: transformers too old for this runner")
        self._cache_checked = True

    def _prefill(self, out: StepOutput, budget: int) -> None:
        waiting = sorted(
            ((slot, seq) for slot, seq in self._seqs.items() if seq.pending and seq.source is None),
            key=lambda p: p[1].admitted,
        )
        for slot, seq in waiting:
            if budget <= 0:
                return
            if seq.failed:
                continue
            chunk = seq.pending[:budget]
            try:
                mask = self.cache.plan_prefill(slot, seq.length, len(chunk), self._device)
                self._model(
                    input_ids=torch.tensor([chunk], device=self._device),
                    attention_mask=mask,
                    position_ids=torch.arange(seq.length, seq.length + len(chunk), device=self._device)[None],
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,  # none are needed; a 128k vocabulary's for every token are large
                )
            except (RuntimeError, ValueError) as exc:  # ValueError: past the context (SlotCache.reserve)
                log.warning("prefill of %d tokens failed: %s", len(chunk), exc)
                out.failed[slot] = f"prefill failed: {exc}"
                seq.failed = True
                continue
            budget -= len(chunk)
            seq.pending = seq.pending[len(chunk) :]
            seq.length += len(chunk)

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
        for slot, seq in self._seqs.items():
            if seq.source is not None and not self._seqs[seq.source].pending:
                self._take(slot, seq, seq.source)

    def _hand_over(self, slot: int) -> None:
        """A sequence ends: the oldest sibling waiting for its prompt takes what it holds of it
        and prefills the rest; the others wait for that one."""
        waiting = sorted(
            ((s, seq) for s, seq in self._seqs.items() if seq.source == slot), key=lambda p: p[1].admitted
        )
        if not waiting:
            return
        heir, seq = waiting[0]
        self._take(heir, seq, slot)
        for _, other in waiting[1:]:
            other.source = heir

    def _take(self, slot: int, seq: _Seq, source: int) -> None:
        """Give `seq` (waiting, with nothing of its own) a copy of the KV `source` holds of its prompt."""
        seq.source = None
        n = min(len(seq.pending), self._seqs[source].length)
        if n == 0:
            return  # nothing to take: it prefills on its own
        self.cache.copy_row(source, slot, n)
        seq.length, seq.pending = n, seq.pending[n:]
        self.shared_prefill_tokens += n
