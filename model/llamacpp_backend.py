"""The llama.cpp backend (llama-cpp-python) for GGUF files: quantized kernels on CPU, Metal or CUDA."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import llama_cpp._internals as internals
import llama_cpp._logger as llama_logger
import numpy as np
import numpy.typing as npt
import psutil

from model.chat_tokenizer import ChatTokenizer
from model.grammar import FORBIDDEN, Constraint
from model.loading import LoadedModel, ModelNotAvailable, ModelSource, tokenizer_folder
from model.penalties import FloatArray, Penalties, penalties_for
from model.prefill import PrefillPace, PrefillPolicy
from model.scheduler import PREFILL_BATCH_TOKENS
from model.types import SampledLogprobs, SamplingParams, StepOutput

log = logging.getLogger(__name__)


def load(
    source: ModelSource,
    *,
    device: str,
    threads: int,
    slots: int,
    cache_dir: Path,
    prefill: PrefillPolicy | None = None,
) -> LoadedModel:
    """Memory-map the GGUF as it is (no conversion) and take the tokenizer from the same file."""
    started = time.perf_counter()
    gpu_layers, where = _placement(device)
    tuned = threads == 0 and gpu_layers == 0  # "auto" on a CPU: the loop picks by measurement
    threads = threads or _physical_cores()
    tokenizer = ChatTokenizer(tokenizer_folder(source, cache_dir))
    model, ctx = _open(source.gguf_path, threads=threads, gpu_layers=gpu_layers, slots=slots)
    weights = _weight_type(model.metadata())
    return LoadedModel(
        backend="llama.cpp",
        model=model,
        tokenizer=tokenizer,
        runner=LlamaCppBatch(
            ctx, slots, ThreadTuner(ctx, threads) if tuned and threads > 1 else None, prefill=prefill
        ),
        eos_token_ids=frozenset({model.token_eos()}),
        device=where,
        dtype=weights,
        quantization=None if weights in ("f32", "f16", "bf16") else f"gguf-{weights}",
        context_length=ctx.n_ctx(),
        threads=threads,
        load_seconds=time.perf_counter() - started,
    )


def _open(path: Path, *, threads: int, gpu_layers: int, slots: int) -> tuple[Any, Any]:
    """The model, and one context whose KV memory all slots share, with flash attention where
    llama.cpp supports it for this model and device.

    One unified KV pool of the model's trained context, as llama-server's `--kv-unified`, rather
    than a full context per slot: more slots cost the compute buffers of a larger batch, not
    another copy of the cache. Any one sequence can still use the whole context.

    Flash attention decoded 10% faster on the embedded model on a 2-core CPU (112 vs 102 tok/s),
    and llama-server turns it on by default; llama-cpp-python leaves it off. A model or backend
    that cannot run it fails to create its context, and then loads without it.
    """
    llama_logger.set_verbose(False)  # llama.cpp's own log lines: errors only, as Llama(verbose=False)
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = gpu_layers
    model = internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = model.n_ctx_train()
    params.n_batch = params.n_ubatch = min(PREFILL_BATCH_TOKENS, params.n_ctx)
    params.n_seq_max = slots
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    try:
        return model, internals.LlamaContext(model=model, params=params, verbose=False)
    except ValueError as exc:
        log.warning("llama.cpp could not use flash attention here (%s); loading without it", exc)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        return model, internals.LlamaContext(model=model, params=params, verbose=False)


def _placement(device: str) -> tuple[int, str]:
    """Layers to offload and where they run: all on the GPU when the build can, else the CPU."""
    if device == "cpu":
        return 0, "cpu"
    if llama_cpp.llama_supports_gpu_offload():
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        return -1, "metal" if apple else "gpu"
    if device != "auto":
        raise ModelNotAvailable(f"DEVICE={device}: this llama-cpp-python build cannot offload to a GPU")
    return 0, "cpu"


def _weight_type(metadata: dict[str, str]) -> str:
    """The GGUF's weight type, e.g. "q4_1" or "f16"."""
    try:
        name = gguf.LlamaFileType(int(metadata["general.file_type"])).name
    except (KeyError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def _physical_cores() -> int:
    """llama.cpp's threads spin on shared barriers: one per physical core, as llama-server picks,
    is faster than one per hyper-thread."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class ThreadTuner:
    """Decode threads chosen by measurement, again and again, because the machine is shared.

    llama.cpp's threads meet at a spinning barrier after every operation, so one thread that the
    OS puts aside (for the API, Redis, another worker, a backup job) stalls all of them: on 2
    cores with one kept busy by another process, 2 threads decoded 4 sequences at 59 tok/s and 1
    thread at 130, while on an idle machine 2 threads gave 204 and 1 gave 122. What is best also
    depends on the batch: one stream beside the API's own work did better on 1 thread, eight on
    2. So for each batch size (in powers of two) the loop tries each thread count for
    PROBE_STEPS steps, after FIRST_PROBE steps of that size and then every PROBE_EVERY, and keeps
    the fastest per batch token unless the one it has is within MARGIN of it. Only decode-only
    steps are tuned; a step carrying a prompt chunk uses every thread (use_default).
    COMPUTE_THREADS set to a number fixes the count instead.
    """

    PROBE_EVERY = 200
    PROBE_STEPS = 8
    FIRST_PROBE = 20  # soon after start, so a worker started on a busy machine adapts at once
    MARGIN = 0.08  # a switch must be this much faster: probes of a few steps are noisy

    def __init__(self, ctx: Any, threads: int) -> None:
        self._ctx = ctx
        self._default = threads
        self._choices = sorted({threads, max(1, threads // 2), 1}, reverse=True)
        self._best: dict[int, int] = {}  # by batch-size bucket
        self._steps: dict[int, int] = {}
        self._plans: dict[int, list[int]] = {}  # thread counts still to try, one per step
        self._timings: dict[int, dict[int, list[float]]] = {}
        self._applied = threads

    def before_step(self, tokens: int) -> None:
        bucket = tokens.bit_length()
        steps = self._steps[bucket] = self._steps.get(bucket, 0) + 1
        if bucket not in self._plans and steps % self.PROBE_EVERY == self.FIRST_PROBE:
            self._plans[bucket] = [n for n in self._choices for _ in range(self.PROBE_STEPS)]
            self._timings[bucket] = {}
        plan = self._plans.get(bucket)
        self._use(plan[0] if plan else self._best.get(bucket, self._default))

    def after_step(self, tokens: int, seconds: float) -> None:
        bucket = tokens.bit_length()
        plan = self._plans.get(bucket)
        if not plan:
            return
        timings = self._timings[bucket]
        timings.setdefault(plan.pop(0), []).append(seconds / tokens)
        if plan:
            return
        del self._plans[bucket]
        median = {n: statistics.median(t) for n, t in timings.items()}
        have = self._best.get(bucket, self._default)
        fastest = min(median, key=median.__getitem__)
        if median[fastest] < median[have] * (1 - self.MARGIN):
            log.info(
                "batches of %d-%d tokens: %d thread(s) from now on", 2 ** (bucket - 1), 2**bucket - 1, fastest
            )
            self._best[bucket] = fastest

    def use_default(self) -> None:
        """All threads, for a step that prefills (compute-bound; never probed)."""
        self._use(self._default)

    def _use(self, threads: int) -> None:
        if threads != self._applied:
            llama_cpp.llama_set_n_threads(self._ctx.ctx, threads, threads)
            self._applied = threads


@dataclass
class _Slot:
    """One sequence's place in the shared context (its llama.cpp seq_id is the slot's index)."""

    id: int
    cached: list[int] = field(default_factory=list)  # prompt tokens whose KV this seq holds, from 0
    busy: bool = False
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next_token: int | None = None  # the token to decode next: the prompt's last, then each sampled
    pos: int = 0  # the position of the next token fed: the KV cells the sequence holds
    chain: Any = None
    constraint: Constraint | None = None
    penalties: Penalties | None = None  # logit_bias and penalties, None when all are off
    top_logprobs: int | None = None  # alternatives to report per token; None: no logprobs asked
    logprob_temperature: float = 1.0  # the temperature logprobs are reported at (1 when greedy)
    admitted: int = 0  # admission order: prefill is first come, first served
    last_used: int = 0
    # A sibling whose prompt KV it waits to share; meanwhile its `pending` is not fed, but taken.
    source: _Slot | None = None
    # Which KV cells hold its positions, as (run, start, end): positions [start, end) are cells
    # that one write `run` filled. A sibling that shared a prompt holds the same runs, so counting
    # each run once counts each cell once.
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    writing: int | None = None  # the run its next tokens extend; None: they start a new one


class LlamaCppBatch:
    """Every running sequence in one llama_decode per step, each sampled by its own sampler chain.

    Per step: one token for each sequence that is decoding, then prompt tokens of sequences
    being prefilled: while anything decodes, a chunk when model/prefill.py's policy gives one
    (big chunks, spaced by decode-only steps); a whole prompt batch when nothing does. A
    prompt's last token is fed as the first decode step, never inside a prefill chunk.

    Prompt caching per slot: a finished sequence leaves its prompt's KV in its slot, and a new
    prompt goes to the free slot that shares the longest prefix with it, so only the rest is
    prefilled. Only prefilled positions are kept, never generated tokens or the prompt's last
    token: measured on the embedded model at one slot, that keeps the logits bit-identical to a
    fresh prefill (tests/unit/test_engine_cache.py). Idle slots' caches are evicted, least
    recently used first, when a new sequence needs their room in the pool.

    Siblings of one prompt (`share_from`) share its prefill: the new one waits until the
    sibling's prompt is in, then llama_memory_seq_cp adds its seq id to the sibling's cells for
    those positions (the unified pool keeps one copy, shared by both) and it decodes from there.
    Were the sibling to end first, the first one waiting takes what it had and prefills the rest,
    and the others wait for that one instead.
    """

    def __init__(
        self, ctx: Any, slots: int, tuner: ThreadTuner | None = None, prefill: PrefillPolicy | None = None
    ) -> None:
        self._ctx = ctx
        self._tuner = tuner
        self._pace = PrefillPace(prefill)
        self._mem = llama_cpp.llama_get_memory(ctx.ctx)
        self._pool = ctx.n_ctx()
        self._batch_cap = max(ctx.params.n_batch, slots)
        self._batch = llama_cpp.llama_batch_init(self._batch_cap, 0, 1)
        self._slots = [_Slot(i) for i in range(slots)]
        self._clock = 0
        self._n_vocab = int(ctx.model.n_vocab())  # the width of a row of logits
        self._runs = 0  # the last run id given out
        self.shared_prefill_tokens = 0

    def __del__(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    @property
    def capacity(self) -> int:
        return len(self._slots)

    def can_admit(self, positions: int) -> bool:
        # Idle slots' cached prompts do not count: they are evicted when the room is needed.
        return any(not s.busy for s in self._slots) and self._busy_cells() + positions <= self._pool

    def add(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        positions: int,
        constraint: Constraint | None = None,
        generated: int = 0,
        share_from: int | None = None,
    ) -> int:
        head, last = list(prompt[:-1]), int(prompt[-1])
        free = [s for s in self._slots if not s.busy]
        source = None if share_from is None else self._source(share_from, head)
        if source is None:
            slot = max(free, key=lambda s: (_shared_prefix(s.cached, head), -s.last_used))
            keep = _shared_prefix(slot.cached, head)
        else:
            # Its own cache goes (the sibling's cells replace it), so take the least useful one.
            slot, keep = min(free, key=lambda s: (len(s.cached) > 0, s.last_used)), 0
        self._forget(slot, keep)
        self._evict_idle(self._reserved() + positions, exclude=slot)
        self._clock += 1
        slot.chain = _sampler_chain(sampling)
        slot.constraint = constraint
        slot.penalties = penalties_for(sampling, prompt, generated, self._n_vocab)
        slot.top_logprobs = sampling.top_logprobs if sampling.logprobs else None
        slot.logprob_temperature = 1.0 if sampling.greedy else sampling.temperature
        slot.busy, slot.pending, slot.next_token = True, head[keep:], last
        slot.admitted, slot.source = self._clock, source
        return slot.id

    def drop(self, slot_id: int) -> None:
        slot = self._slots[slot_id]
        self._hand_over(slot)
        if slot.chain is not None:
            llama_cpp.llama_sampler_free(slot.chain)
        self._forget(slot, len(slot.cached))  # generated tokens go; the prefilled prompt stays
        self._clock += 1
        slot.busy, slot.pending, slot.next_token, slot.chain = False, [], None, None
        slot.constraint, slot.penalties, slot.top_logprobs, slot.source = None, None, None, None
        slot.last_used = self._clock

    def step(self) -> StepOutput:
        out = StepOutput()
        # Before the plan: a sibling whose prompt went in last step decodes beside it in this one.
        for slot in self._slots:
            if slot.busy and slot.source is not None and not slot.source.pending:
                self._take(slot, slot.source)
        decoding, fed = self._plan(out)
        batch = self._batch
        batch.n_tokens = 0
        for slot in decoding:
            assert slot.next_token is not None
            self._put(slot.next_token, slot.pos, slot.id, logits=True)
        for slot, chunk in fed:
            for j, token in enumerate(chunk):
                self._put(token, slot.pos + j, slot.id, logits=False)
        if batch.n_tokens == 0:
            return out
        tokens = batch.n_tokens
        # Only decode-only steps are tuned: a step with a prompt chunk is long and compute-bound,
        # and a probe of one thread there doubled it (a 1.3 s stall where 0.6 s was planned).
        tuned = self._tuner if not fed else None
        if tuned is not None:
            tuned.before_step(tokens)
        elif self._tuner is not None:
            self._tuner.use_default()
        started = time.perf_counter()
        rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
        seconds = time.perf_counter() - started
        if tuned is not None:
            tuned.after_step(tokens, seconds)
        if rc != 0:
            # The plan keeps the batch within the pool, so this is llama.cpp refusing it for
            # another reason; the newest sequence ends, so the others can go on.
            newest = max(
                (s for s in self._slots if s.busy and s.source is None and s.id not in out.preempted),
                key=lambda s: s.admitted,
            )
            out.failed[newest.id] = f"llama_decode returned {rc}"
            log.warning("llama_decode returned %d with %d tokens; failing one sequence", rc, batch.n_tokens)
            return out
        self._pace.observe(seconds, decoded=len(decoding), prefilled=tokens - len(decoding))
        for slot, chunk in fed:
            slot.cached += chunk
            slot.pending = slot.pending[len(chunk) :]
            self._wrote(slot, len(chunk))
        for i, slot in enumerate(decoding):
            token = self._sample(slot, i, out)
            self._wrote(slot, 1)
            slot.next_token = token
            out.tokens[slot.id] = token
        return out

    def _sample(self, slot: _Slot, i: int, out: StepOutput) -> int:
        """The slot's sample for batch row i, in vLLM's order: logit_bias and penalties, then the
        grammar, then the chain's temperature and truncation. All edits go into llama.cpp's own
        buffer of the row's logits, which every llama_sampler_sample reads afresh.

        The penalties are ours, not llama.cpp's penalties sampler: llama_sampler_sample accepts
        every token it draws into the chain, a draw the grammar then refuses included, which
        would count tokens that were never generated.
        """
        logits = self._row(i) if slot.penalties is not None or slot.top_logprobs is not None else None
        if slot.penalties is not None:
            assert logits is not None
            slot.penalties.apply_to_row(logits)
        constraint = slot.constraint
        if constraint is not None and logits is not None and slot.top_logprobs is not None:
            # The logprobs describe the masked distribution, so the mask is needed anyway:
            # applied first, one draw (the same distribution as a draw vetted afterwards).
            np.add(logits, constraint.bias(self._n_vocab), out=logits)
            token = int(llama_cpp.llama_sampler_sample(slot.chain, self._ctx.ctx, i))
            constraint.commit(token)
        else:
            token = int(llama_cpp.llama_sampler_sample(slot.chain, self._ctx.ctx, i))
            if constraint is not None and not constraint.accept(token):
                logits = self._row(i) if logits is None else logits
                token = _sample_among(slot.chain, constraint.allowed(self._n_vocab), logits)
                constraint.commit(token)
        if slot.penalties is not None:
            slot.penalties.accept(token)
        if slot.top_logprobs is not None:
            assert logits is not None
            out.logprobs[slot.id] = _logprobs(logits, slot.logprob_temperature, token, slot.top_logprobs)
        return token

    def _row(self, i: int) -> FloatArray:
        """Batch row i's logits: a view of llama.cpp's own buffer, edited in place."""
        row = llama_cpp.llama_get_logits_ith(self._ctx.ctx, i)
        buffer = (ctypes.c_float * self._n_vocab).from_address(ctypes.addressof(row.contents))
        # frombuffer: 2 us, where ctypeslib.as_array took 14.
        return np.frombuffer(buffer, dtype=np.float32)  # type: ignore[call-overload,no-any-return]

    def _plan(self, out: StepOutput) -> tuple[list[_Slot], list[tuple[_Slot, list[int]]]]:
        """This step's tokens: one for each decoding slot, then prompt chunks first come, first
        served, all within the KV pool. Idle caches make room first; if running sequences still
        outgrow the pool, the newest are preempted (in `out`) until the rest fit."""
        while True:
            busy = [s for s in self._slots if s.busy and s.id not in out.preempted]
            decoding = [s for s in busy if not s.pending]
            budget = self._batch_cap - len(decoding)
            if decoding:
                budget = min(budget, self._pace.chunk())
            fed: list[tuple[_Slot, list[int]]] = []
            prefilling = (s for s in busy if s.pending and s.source is None)
            for slot in sorted(prefilling, key=lambda s: s.admitted):
                if budget <= 0:
                    break
                fed.append((slot, slot.pending[:budget]))
                budget -= len(fed[-1][1])
            new_cells = len(decoding) + sum(len(c) for _, c in fed)
            if self._evict_idle(new_cells) or len(busy) <= 1:
                return decoding, fed
            # A sibling still waiting for its prompt's KV holds no cells: putting it out frees
            # nothing, so the newest of those that hold cells goes.
            holders = [s for s in busy if s.source is None] or busy
            newest = max(holders, key=lambda s: s.admitted)
            self._forget(newest, 0)  # its cells free now, for this very step
            out.preempted.add(newest.id)

    def _busy_cells(self) -> int:
        return _cells([s for s in self._slots if s.busy]) + self._reserved()

    def _reserved(self) -> int:
        """Cells the running sequences' prompts have still to fill (not a waiting sibling's: it
        takes the cells its sibling fills)."""
        return sum(len(s.pending) for s in self._slots if s.busy and s.source is None)

    def _source(self, share_from: int, head: list[int]) -> _Slot | None:
        """The slot whose prompt a new sequence of prompt `head` (all but its last token) will
        share: `share_from`, or the one that one waits for itself; None when there is nothing
        to share."""
        source = self._slots[share_from]
        while source.source is not None:
            source = source.source
        # What it has prefilled and what it will: its prompt must begin with this one's.
        if not source.busy or not head or _shared_prefix(source.cached + source.pending, head) < len(head):
            return None
        return source

    def _hand_over(self, slot: _Slot) -> None:
        """A sequence ends: the oldest sibling waiting for its prompt takes what it holds of it
        and prefills the rest; the others wait for that one."""
        waiting = sorted((s for s in self._slots if s.busy and s.source is slot), key=lambda s: s.admitted)
        if not waiting:
            return
        self._take(waiting[0], slot)
        for other in waiting[1:]:
            other.source = waiting[0]

    def _take(self, slot: _Slot, source: _Slot) -> None:
        """Give `slot` (waiting, holding nothing) the cells `source` holds of its prompt."""
        slot.source = None
        n = _shared_prefix(source.cached, slot.pending)
        if n == 0:
            return  # nothing to take: it prefills on its own
        llama_cpp.llama_memory_seq_cp(self._mem, source.id, slot.id, 0, n)
        slot.runs, slot.writing = _first(source.runs, n), None
        slot.cached, slot.pending, slot.pos = slot.pending[:n], slot.pending[n:], n
        self.shared_prefill_tokens += n

    def _wrote(self, slot: _Slot, count: int) -> None:
        """The slot's next `count` positions were filled, in new cells."""
        if slot.writing is not None and slot.runs and slot.runs[-1][0] == slot.writing:
            run, start, end = slot.runs[-1]
            slot.runs[-1] = (run, start, end + count)
        else:
            self._runs += 1
            slot.writing = self._runs
            slot.runs.append((self._runs, slot.pos, slot.pos + count))
        slot.pos += count

    def _put(self, token: int, pos: int, seq: int, *, logits: bool) -> None:
        batch, k = self._batch, self._batch.n_tokens
        batch.token[k] = token
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = seq
        batch.logits[k] = logits
        batch.n_tokens = k + 1

    def _forget(self, slot: _Slot, keep: int) -> None:
        """Drop the slot's KV from position `keep` on."""
        llama_cpp.llama_memory_seq_rm(self._mem, slot.id, keep, -1)
        del slot.cached[keep:]
        slot.pos = keep
        slot.runs, slot.writing = _first(slot.runs, keep), None

    def _evict_idle(self, new_cells: int, exclude: _Slot | None = None) -> bool:
        """Evict idle caches (not `exclude`'s), least recently used first, until `new_cells`
        fit beside the cells every slot holds; whether they do."""
        idle = sorted((s for s in self._slots if not s.busy and s is not exclude), key=lambda s: s.last_used)
        busy = [s for s in self._slots if s.busy and s is not exclude]
        # An idle cache may share its cells with others (a prompt it shared), so what an
        # eviction frees is counted afresh each time rather than taken to be its length.
        while idle and _cells(busy + idle) + new_cells > self._pool:
            self._forget(idle.pop(0), 0)
        return _cells(busy + idle) + new_cells <= self._pool


def _first(runs: list[tuple[int, int, int]], n: int) -> list[tuple[int, int, int]]:
    """The runs of a sequence's first `n` positions."""
    return [(run, start, min(end, n)) for run, start, end in runs if start < n]


def _cells(slots: Sequence[_Slot]) -> int:
    """KV cells the slots hold, each once however many share it. Every holder of a run holds it
    from the same start (a prompt's KV is shared from position 0), so a run counts as far as
    its longest holder reaches."""
    reach: dict[int, tuple[int, int]] = {}
    for slot in slots:
        for run, start, end in slot.runs:
            if run not in reach or end > reach[run][1]:
                reach[run] = (start, end)
    return sum(end - start for start, end in reach.values())


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _logprobs(logits: FloatArray, temperature: float, token: int, top: int) -> SampledLogprobs:
    """The token's log probability and the `top` best, under softmax(logits / temperature)."""
    scaled = logits / np.float32(temperature)
    peak = scaled.max()
    normalizer = peak + np.log(np.exp(scaled - peak).sum(dtype=np.float64))
    chosen = float(scaled[token] - normalizer)
    if top == 0:
        return chosen, ()
    best = np.argpartition(scaled, -top)[-top:]
    best = best[np.argsort(-scaled[best], kind="stable")]
    # A token the grammar forbids could never be drawn: not an alternative worth listing.
    return chosen, tuple((int(t), float(scaled[t] - normalizer)) for t in best if logits[t] > FORBIDDEN / 2)


# llama_token_data as numpy lays it out: {int32 id; float logit; float p}, 12 bytes, no padding.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _sample_among(chain: Any, ids: npt.NDArray[np.int32], logits: FloatArray) -> int:
    """The chain's draw from only the tokens `ids` (what a grammar allows), as llama_sampler_sample
    draws from all of them: the same temperature, truncation and seeded draw over those
    candidates, so the same distribution as masking the rest to -inf, without building and
    sorting a 128k-entry candidate array again (1.5 ms a refusal on the Llama-3 vocabulary,
    where a grammar allows a few hundred tokens)."""
    if ids.size == 0:  # a grammar with nothing left (it cannot, while it is not complete)
        raise RuntimeError("the grammar allows no token here")
    candidates = np.empty(ids.size, dtype=_TOKEN_DATA)
    candidates["id"] = ids
    candidates["logit"] = logits[ids]
    candidates["p"] = 0.0
    data = candidates.ctypes.data_as(llama_cpp.llama_token_data_p)
    array = llama_cpp.llama_token_data_array(data=data, size=ids.size, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
    # Samplers may point `data` elsewhere; `selected` indexes whatever it points to now.
    token = int(array.data[array.selected].id)
    llama_cpp.llama_sampler_accept(chain, token)  # as llama_sampler_sample ends
    return token


def _sampler_chain(sampling: SamplingParams) -> Any:
    """Greedy, or temperature, top-k, top-p, min-p, then a seeded draw: the transformers
    backend's order. logit_bias and the penalties are not in the chain: `_sample` applies them."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    if sampling.greedy:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
    if sampling.top_k > 0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
    if sampling.min_p > 0.0:
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
    seed = llama_cpp.LLAMA_DEFAULT_SEED  # llama.cpp draws a random seed for this value
    if sampling.seed is not None:
        # llama.cpp seeds are 32-bit; keep a user's seed from meaning "random".
        seed = min(sampling.seed & 0xFFFFFFFF, llama_cpp.LLAMA_DEFAULT_SEED - 1)
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain
