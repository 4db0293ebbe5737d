"""Fair shares between keys, measured: key A queues A_JOBS short jobs alone, then again while key B
sends one request every B_GAP_S seconds, on one stack (one worker, WORKER_SLOTS slots).

    python -m bench.fairness                 # about 2 minutes on 2 cores
    python -m bench.fairness --rounds 2 --slots 1

Per round, on the same stack and one after another:
1. A alone: A_JOBS background Responses (SHORT_TOKENS tokens each, ignore_eos), all sent at once;
   A's throughput is its jobs over the span from the first's admission to the last's end.
2. A with B: the same A_JOBS, and B's requests while A's queue lasts; A's throughput the same way
   (its ratio to step 1 shows what B's share cost A), and each of B's requests' queue wait in
   seconds and in generations (jobs that started between its admission and its start), beside
   the wait first-in-first-out would have given it (A's jobs still waiting when it arrived).

Every time is read from the job records (Redis's clock). Writes bench/results/fairness.{json,md}.
Performance is measured here, never by timed tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.scaleout import Stack
from tasks import keys
from tasks.settings import EMBEDDED_MODEL_ID

log = logging.getLogger("bench.fairness")

RESULTS = Path(__file__).parent / "results"
KEY_A, KEY_B = "bench-key-a", "bench-key-b"
A_JOBS = 50
SHORT_TOKENS = 16
B_GAP_S = 2.0
POLL_S = 0.5
TIMEOUT_S = 900.0
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


@dataclass
class Round:
    round: int
    a_alone_jobs_per_s: float
    a_with_b_jobs_per_s: float
    b_waits_s: list[float] = field(default_factory=list)
    b_waits_generations: list[int] = field(default_factory=list)
    b_fifo_generations: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def a_ratio(self) -> float:
        return self.a_with_b_jobs_per_s / self.a_alone_jobs_per_s if self.a_alone_jobs_per_s else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "a_ratio": self.a_ratio}


def _send(http: httpx.Client, key: str) -> str:
    body = {
        "input": "Say hello.",
        "max_output_tokens": SHORT_TOKENS,
        "temperature": 0,
        "background": True,
        "ignore_eos": True,
    }
    r = http.post("/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return str(r.json()["id"])


def _records(stack: Stack, ids: list[str]) -> list[dict[str, str]]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        records: list[dict[str, str]] = [stack.redis.hgetall(keys.job(i)) for i in ids]  # type: ignore[misc]
        if all(r.get("status") in TERMINAL for r in records):
            return records
        time.sleep(POLL_S)
    raise TimeoutError(f"jobs did not end in {TIMEOUT_S:.0f} s")


def _jobs_per_s(records: list[dict[str, str]]) -> float:
    span = max(float(r["finished_at"]) for r in records) - min(float(r["created_at"]) for r in records)
    return len(records) / span if span > 0 else 0.0


def _a_alone(stack: Stack, http: httpx.Client) -> float:
    return _jobs_per_s(_records(stack, [_send(http, KEY_A) for _ in range(A_JOBS)]))


def _a_with_b(stack: Stack, http: httpx.Client, result: Round) -> float:
    a_ids = [_send(http, KEY_A) for _ in range(A_JOBS)]
    b_ids: list[str] = []
    done = threading.Event()

    def b_client() -> None:
        with httpx.Client(base_url=stack.url, timeout=60) as b_http:
            while not done.wait(B_GAP_S):
                b_ids.append(_send(b_http, KEY_B))

    sender = threading.Thread(target=b_client)
    sender.start()
    try:
        # B sends while A's queue lasts: until A's last job has been claimed.
        while any(stack.redis.hget(keys.job(i), "status") == "queued" for i in a_ids):
            time.sleep(POLL_S)
    finally:
        done.set()
        sender.join()
    a_records = _records(stack, a_ids)
    b_records = _records(stack, b_ids)
    everyone = a_records + b_records
    for b in b_records:
        if b.get("status") not in ("completed", "incomplete"):
            result.errors.append(f"B's job ended {b.get('status')}")
            continue
        admitted, started = float(b["created_at"]), float(b["started_at"])
        result.b_waits_s.append(started - admitted)
        result.b_waits_generations.append(
            sum(admitted < float(r["started_at"]) < started for r in everyone if r.get("started_at"))
        )
        result.b_fifo_generations.append(
            sum(float(r["created_at"]) < admitted < float(r.get("started_at") or "inf") for r in a_records)
        )
    return _jobs_per_s(a_records)


def run_round(stack: Stack, round_no: int) -> Round:
    result = Round(round_no, 0.0, 0.0)
    with httpx.Client(base_url=stack.url, timeout=60) as http:
        _records(stack, [_send(http, KEY_A) for _ in range(4)])  # warm: the first requests load caches
        result.a_alone_jobs_per_s = _a_alone(stack, http)
        result.a_with_b_jobs_per_s = _a_with_b(stack, http, result)
    log.info(
        "round %d: A alone %.2f jobs/s, with B %.2f jobs/s (%.2fx); B waited %s generations (FIFO: %s)",
        round_no,
        result.a_alone_jobs_per_s,
        result.a_with_b_jobs_per_s,
        result.a_ratio,
        result.b_waits_generations,
        result.b_fifo_generations,
    )
    return result


def markdown(rounds: list[Round], slots: int) -> str:
    def median(values: list[float] | list[int]) -> float:
        return statistics.median(values) if values else float("nan")

    lines = [
        f"A: {A_JOBS} jobs of {SHORT_TOKENS} tokens at once; B: one every {B_GAP_S:g} s while A's queue "
        f"lasts; one worker, {slots} slot(s), {EMBEDDED_MODEL_ID}.",
        "",
        "| round | A alone jobs/s | A with B jobs/s | ratio | B requests | B wait p50 s "
        "| B wait p50 generations | FIFO would have been (p50) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        lines.append(
            f"| {r.round} | {r.a_alone_jobs_per_s:.2f} | {r.a_with_b_jobs_per_s:.2f} | {r.a_ratio:.2f}x "
            f"| {len(r.b_waits_s)} | {median(r.b_waits_s):.2f} | {median(r.b_waits_generations):.0f} "
            f"| {median(r.b_fifo_generations):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the stack stops
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = {"API_KEYS": f"{KEY_A},{KEY_B}", "WORKER_SLOTS": str(args.slots), "MAX_QUEUED": str(4 * A_JOBS)}
    stack = Stack(Path(tempfile.mkdtemp(prefix="fairness-")), [(EMBEDDED_MODEL_ID, None)], env)
    try:
        rounds = [run_round(stack, i + 1) for i in range(args.rounds)]
    finally:
        stack.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"slots": args.slots, "rounds": [r.to_json() for r in rounds]}
    (args.out / "fairness.json").write_text(json.dumps(out, indent=2))
    (args.out / "fairness.md").write_text(markdown(rounds, args.slots))
    print(markdown(rounds, args.slots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
