"""The raw engine in this process, loaded with the worker's own settings: the baseline."""

from __future__ import annotations

import logging
import time

from bench import workload
from bench.metrics import BatchResult, RequestSample
from model.types import ChatMessage, Completion, TextDelta
from tasks.settings import Settings
from tasks.worker import load_engine

log = logging.getLogger(__name__)


class InProcessEngine:
    """One stream at a time through `Engine.stream`, timed like a client would time it."""

    name = "engine in-process"
    clients = (1,)  # one stream at a time

    def __init__(self, settings: Settings) -> None:
        # The workers' own loader, so engine, dtype and weights match theirs.
        self.engine = load_engine(settings)
        self.loaded = self.engine.loaded
        self.prompt_tokens = len(self.engine.prepare(workload.messages()).token_ids)
        log.info(
            "%s engine loaded in %.1fs on %s/%s; prompt is %d tokens",
            self.loaded.backend,
            self.loaded.load_seconds,
            self.loaded.device,
            self.loaded.dtype,
            self.prompt_tokens,
        )

    def prompt_tokens_of(self, text: str) -> int:
        """The rendered prompt's length for one user message, chat template included."""
        return len(self.engine.prepare([ChatMessage("user", text)]).token_ids)

    def one(self) -> RequestSample:
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        prompt = self.engine.prepare(workload.messages())  # inside the clock, as in the worker
        for item in self.engine.stream(prompt, workload.sampling()):
            if isinstance(item, TextDelta) and first is None:
                first = time.perf_counter() - started
            elif isinstance(item, Completion):
                tokens = item.completion_tokens
        total = time.perf_counter() - started
        return RequestSample(
            ttft_s=first if first is not None else total, total_s=total, completion_tokens=tokens
        )

    def run_batch(self, concurrency: int, requests: int, round_no: int) -> BatchResult:
        """In-process there is one stream at a time; `requests` of them back to back."""
        if concurrency != 1:
            raise ValueError("the in-process engine is measured at one stream")
        started = time.perf_counter()
        samples = [self.one() for _ in range(requests)]
        return BatchResult(self.name, 1, round_no, time.perf_counter() - started, samples)
