"""The contention scenario: another process keeps one core busy while a system serves 4 clients.

On a shared machine something else often holds a core; llama.cpp's threads meet at spinning
barriers, so one descheduled thread stalls them all. The worker's thread tuner
(model/llamacpp_backend.py, COMPUTE_THREADS=0) re-measures its thread count 20 decode steps
after start and then every 200, so each system first serves unrecorded warm-up batches under
contention, long enough for at least one probe.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from bench.metrics import BatchResult
from bench.report import BUSY

log = logging.getLogger(__name__)

# One Python process spinning: it wants a whole core and never sleeps.
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]
# 2 batches of 4 x 128 tokens: over 256 decode steps, so the tuner's every-200-steps probe runs.
WARMUP_BATCHES = 2


class Measured(Protocol):
    name: str

    def run_batch(self, concurrency: int, requests: int, round_no: int) -> BatchResult: ...


@contextmanager
def busy_core() -> Iterator[subprocess.Popen[bytes]]:
    """The busy process, killed on the way out whatever happens."""
    proc = subprocess.Popen(BUSY_LOOP, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log.info("one core kept busy by pid %d", proc.pid)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def measure(systems: Sequence[Measured], clients: int, rounds: int) -> list[BatchResult]:
    """Every system at `clients` clients while one core is busy, interleaved over `rounds`;
    each batch is named after its system plus " + 1 busy core"."""
    batches: list[BatchResult] = []
    with busy_core():
        for system in systems:
            for _ in range(WARMUP_BATCHES):
                system.run_batch(clients, clients, 0)
        for round_no in range(1, rounds + 1):
            turn = list(systems[round_no % len(systems) :]) + list(systems[: round_no % len(systems)])
            for system in turn:
                batch = system.run_batch(clients, clients, round_no)
                batch.system = system.name + BUSY
                batches.append(batch)
                log.info(
                    "round %d, %d clients, %s: %.1f tok/s aggregate",
                    round_no,
                    clients,
                    batch.system,
                    batch.aggregate_tps,
                )
    return batches
