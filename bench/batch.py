"""The Batch API scenario: a 64-line batch on one worker with 4 slots, against 4 interactive
clients on the same worker, and interactive requests' queue wait while a batch keeps it busy.

Each round, on the same stack and one after another:
1. 4 interactive clients send INTERACTIVE_REQUESTS of the workload (streamed): aggregate tok/s.
2. A BATCH_LINES-line batch of the same request (not streamed), uploaded through /v1/files:
   completion tokens over the time from upload to the batch polled `completed`, so validation,
   enqueueing and finalizing count against it.
3. The same batch again, and while its lines run, PROBES interactive requests one after another
   (PROBE_MAX_TOKENS each): each one's queue wait (its job's claim minus its creation), against
   the mean generation time of one batch line of that batch.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx
import redis

from bench import workload
from bench.metrics import BatchResult
from tasks import keys

log = logging.getLogger(__name__)

BATCH_LINES = 64
CLIENTS = 4
INTERACTIVE_REQUESTS = 32
PROBES = 8
PROBE_MAX_TOKENS = 16
PROBE_GAP_S = 0.5
POLL_S = 0.5  # as a client would poll; more often only loads the two cores the worker uses
TIMEOUT_S = 900.0


@dataclass
class BatchRun:
    system: str
    round: int
    lines: int
    batch_wall_s: float
    batch_tokens: int
    batch_tps: float
    interactive_tps: float
    line_generation_mean_s: float
    probe_waits_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Measured(Protocol):
    """What the scenario needs of a stack: its name, URL, Redis, and interactive batches."""

    name: str
    url: str
    redis_url: str

    def run_batch(self, concurrency: int, requests: int, round_no: int) -> BatchResult: ...


def _line_body() -> dict[str, Any]:
    body = workload.request_body()
    body.pop("stream")
    body.pop("stream_options")
    return body


def _input_file(lines: int) -> bytes:
    body = _line_body()
    return "".join(
        json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        + "\n"
        for i in range(lines)
    ).encode()


def _submit(http: httpx.Client, lines: int) -> str:
    uploaded = http.post(
        "/v1/files", files={"file": ("bench.jsonl", _input_file(lines))}, data={"purpose": "batch"}
    )
    uploaded.raise_for_status()
    created = http.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    created.raise_for_status()
    return str(created.json()["id"])


def _wait(http: httpx.Client, batch_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        batch: dict[str, Any] = http.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(POLL_S)
    raise TimeoutError(f"batch {batch_id} did not end in {TIMEOUT_S:.0f} s")


def _outputs(http: httpx.Client, batch: dict[str, Any]) -> list[dict[str, Any]]:
    if not batch.get("output_file_id"):
        return []
    text = http.get(f"/v1/files/{batch['output_file_id']}/content").text
    return [json.loads(line) for line in text.splitlines()]


def _line_generation_s(db: redis.Redis, outputs: list[dict[str, Any]]) -> float:
    spans = []
    for line in outputs:
        started, finished = db.hmget(keys.job(line["response"]["request_id"]), ["started_at", "finished_at"])
        if started and finished:
            spans.append(float(finished) - float(started))  # type: ignore[arg-type]
    return statistics.mean(spans) if spans else 0.0


def _probe_wait(http: httpx.Client, db: redis.Redis) -> float | None:
    body = {"messages": [{"role": "user", "content": workload.PROMPT}], "max_tokens": PROBE_MAX_TOKENS}
    r = http.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        return None
    created, started = db.hmget(keys.job(r.headers["x-request-id"]), ["created_at", "started_at"])
    if not created or not started:
        return None
    return float(started) - float(created)  # type: ignore[arg-type]


def run(stack: Measured, round_no: int) -> BatchRun:
    db = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    errors: list[str] = []
    interactive = stack.run_batch(CLIENTS, INTERACTIVE_REQUESTS, round_no)
    with httpx.Client(base_url=stack.url, timeout=TIMEOUT_S) as http:
        started = time.perf_counter()
        batch = _wait(http, _submit(http, BATCH_LINES))
        wall = time.perf_counter() - started
        outputs = _outputs(http, batch)
        tokens = sum(x["response"]["body"]["usage"]["completion_tokens"] for x in outputs)
        if batch["status"] != "completed" or len(outputs) != BATCH_LINES:
            errors.append(f"batch {batch['status']}, {len(outputs)} of {BATCH_LINES} lines answered")

        probed_id = _submit(http, BATCH_LINES)
        deadline = time.monotonic() + TIMEOUT_S
        while db.scard(keys.BATCH_RUNNING) < 1 and time.monotonic() < deadline:
            time.sleep(POLL_S)  # the probes start once batch lines hold the slots
        waits: list[float] = []
        for _ in range(PROBES):
            if (wait := _probe_wait(http, db)) is not None:
                waits.append(wait)
            time.sleep(PROBE_GAP_S)
        probed = _wait(http, probed_id)
        line_s = _line_generation_s(db, _outputs(http, probed))
    result = BatchRun(
        system=stack.name,
        round=round_no,
        lines=BATCH_LINES,
        batch_wall_s=wall,
        batch_tokens=tokens,
        batch_tps=tokens / wall if wall else 0.0,
        interactive_tps=interactive.aggregate_tps,
        line_generation_mean_s=line_s,
        probe_waits_s=waits,
        errors=errors,
    )
    log.info(
        "round %d, batch API, %s: batch %.1f tok/s vs %d clients %.1f tok/s; probe wait p50 %.2f s, "
        "line generation mean %.2f s",
        round_no,
        stack.name,
        result.batch_tps,
        CLIENTS,
        result.interactive_tps,
        statistics.median(waits) if waits else float("nan"),
        line_s,
    )
    return result
