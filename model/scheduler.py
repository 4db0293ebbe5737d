"""Continuous batching: sequences join a running batch at the next step after a slot frees up.

Pure logic over a BatchRunner: no Redis, no threads, no clock. Whoever drives it (the worker's
slot loop in tasks/slots.py, or Engine.stream for one sequence) submits generations under keys of
its own, calls `step()` and routes what comes out by key.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from model.generation import Generation, Output
from model.types import BatchRunner, FinishReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A sequence that could not go on (its backend refused or lost it); only it ends."""

    message: str


Event = Output | Failure

# Prompt tokens the transformers backend feeds per step while other sequences decode, so running
# streams wait at most one such chunk between two of their tokens (llama.cpp sizes its chunks by
# the prefill policy, model/prefill.py). When nothing else decodes, a whole prompt goes at once,
# up to llama.cpp's default batch.
PREFILL_CHUNK_TOKENS = 256
PREFILL_BATCH_TOKENS = 2048

# KV room a sequence must find free, beyond its tokens so far, to be admitted: enough to decode
# a while before it could be put out again. Admission does not reserve a whole budget (a
# max_tokens of thousands would hold most of the pool for tokens that may never come); when
# running sequences do fill the memory, the newest is preempted and resumes later.
GROWTH_POSITIONS = 256


class Scheduler:
    """Admits waiting generations into free slots in arrival order, steps them together, and
    reports each one's text deltas and its single ending (a Completion or a Failure)."""

    def __init__(self, runner: BatchRunner) -> None:
        self._runner = runner
        self._waiting: deque[tuple[Hashable, Generation]] = deque()
        self._running: dict[int, tuple[Hashable, Generation]] = {}  # by slot
        self.last_batch_size = 0  # sequences in the most recent step (for the metrics)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        return not self._running and not self._waiting

    def submit(self, key: Hashable, generation: Generation) -> None:
        self._waiting.append((key, generation))

    def stop(self, key: Hashable, reason: FinishReason = "cancelled") -> list[tuple[Hashable, Event]]:
        """End one generation now, waiting or running; its last text and Completion."""
        for i, (k, gen) in enumerate(self._waiting):
            if k == key:
                del self._waiting[i]
                return [(key, out) for out in gen.finish(reason)]
        for slot, (k, gen) in list(self._running.items()):
            if k == key:
                self._release(slot)
                return [(key, out) for out in gen.finish(reason)]
        return []

    def step(self) -> list[tuple[Hashable, Event]]:
        """Admit what fits, run one forward pass, and return every sequence's output of it."""
        events = self._admit()
        if not self._running:
            self.last_batch_size = 0
            return events
        self.last_batch_size = len(self._running)
        result = self._runner.step()
        for slot in sorted(result.preempted, reverse=True):
            key, gen = self._running[slot]
            self._release(slot)
            self._waiting.appendleft((key, gen))  # first in line to resume
            log.info("preempted a sequence after %d tokens to free KV memory", gen.generated)
        for slot, message in result.failed.items():
            key, _ = self._running[slot]
            self._release(slot)
            events.append((key, Failure(message)))
        for slot, token in result.tokens.items():
            key, gen = self._running[slot]
            try:
                outputs = gen.feed(token, result.logprobs.get(slot))
            except Exception:  # a sequence that breaks (detokenizing, say) ends alone
                log.exception("a sequence failed while decoding its token")
                self._release(slot)
                events.append((key, Failure("The generation failed.")))
                continue
            events += [(key, out) for out in outputs]
            if gen.done:
                self._release(slot)
        return events

    def _admit(self) -> list[tuple[Hashable, Event]]:
        # First come, first served: a large request at the head is not overtaken by smaller ones,
        # so nothing waits forever; it gets its room as soon as running ones finish.
        events: list[tuple[Hashable, Event]] = []
        while self._waiting and len(self._running) < self._runner.capacity:
            key, gen = self._waiting[0]
            positions = len(gen.token_ids) + min(gen.remaining, GROWTH_POSITIONS)
            sibling = self._sibling(gen)
            if sibling is not None:
                positions -= len(gen.prompt.token_ids) - 1  # the prompt's KV is the sibling's
            if not self._runner.can_admit(positions):
                break
            self._waiting.popleft()
            try:
                # A preempted one resumes from its prompt and tokens: its counts for the penalties
                # come back from those (the last `generated` of them).
                if sibling is None:
                    slot = self._runner.add(
                        gen.token_ids, gen.sampling, positions, gen.constraint, generated=gen.generated
                    )
                else:  # a fresh one (nothing generated); only a sibling's admission names share_from
                    slot = self._runner.add(
                        gen.token_ids, gen.sampling, positions, gen.constraint, share_from=sibling
                    )
            except Exception as exc:  # refused by the backend: only this sequence fails
                log.warning("could not start a sequence: %s", exc)
                events.append((key, Failure("The generation could not be started.")))
                continue
            self._running[slot] = (key, gen)
        return events

    def _sibling(self, gen: Generation) -> int | None:
        """The slot of a running sequence of the same prompt, whose prefill `gen` can share.

        Only for a fresh one: a resumed sequence's own tokens follow its prompt, and a one-token
        prompt has no KV before its first decode. Choices of one request carry the same Prompt
        object; an identical prompt of another request shares just as well.
        """
        ids = gen.prompt.token_ids
        if gen.generated or len(ids) < 2:
            return None
        for slot, (_, other) in self._running.items():
            theirs = other.prompt.token_ids
            if theirs is ids or (len(theirs) == len(ids) and theirs == ids):
                return slot
        return None

    def _release(self, slot: int) -> None:
        del self._running[slot]
        self._runner.drop(slot)
