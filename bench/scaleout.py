"""Scale-out, measured (issue 20): does a second worker on its own core double the throughput, for
one model and for two; what one token costs Redis and the API; and does one API process hold
500 concurrent SSE streams.

    python -m bench.scaleout                  # about 6 minutes on 2 cores
    python -m bench.scaleout --streams 500 --rounds 3

Parts, each on its own redis-server, API and workers (tests/processes.py, as `make bench`):

1. Pinned workers: one worker pinned to core 0 (`taskset`, COMPUTE_THREADS=1) against two pinned to
   cores 0 and 1, with the same clients (4, each with a 128-token request at a time), interleaved
   over rounds; the aggregate's ratio (target >= 1.8x). The API, Redis and the clients float.
2. Two models on their own cores: the embedded GGUF served under two names, one worker each,
   pinned to cores 0 and 1, two clients per model, against one model's single pinned worker.
3. Cost per token, over the two-worker runs: Redis commands and bytes (INFO commandstats and
   stats), redis-server CPU, API CPU, per generated token; from these, how many tokens a second
   one Redis core and one API process can carry, so how many workers of a given rate they serve.
4. Load held: `--streams` concurrent SSE streams (short generations, queued behind a 4-slot
   worker) through one API process: errors, the API's peak RSS and CPU, and the latency the
   service adds to each (the client's wall time less the job's own span in its record).

Writes bench/results/scaleout.{json,md}. Performance is measured here, never by timed tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis

from bench import workload
from bench.clients import run_clients
from bench.metrics import percentile
from tasks import keys
from tasks.settings import EMBEDDED_MODEL_ID
from tests.processes import Service, start_api, start_redis, start_worker, wait_healthy

log = logging.getLogger("bench.scaleout")

RESULTS = Path(__file__).parent / "results"
CLIENTS = 4
REQUESTS_PER_CLIENT = 3
SHORT_TOKENS = 16  # the load part's generations: the streams' count is the point, not their length


@dataclass
class Usage:
    """What the processes of a stack used over some requests."""

    tokens: int = 0
    wall_s: float = 0.0
    redis_commands: int = 0
    redis_in: int = 0
    redis_out: int = 0
    redis_cpu_s: float = 0.0
    api_cpu_s: float = 0.0

    def per_token(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {
            "redis_commands": self.redis_commands / n,
            "redis_bytes_in": self.redis_in / n,
            "redis_bytes_out": self.redis_out / n,
            "redis_cpu_ms": 1000 * self.redis_cpu_s / n,
            "api_cpu_ms": 1000 * self.api_cpu_s / n,
        }


class Stack:
    """redis-server, one API and workers, each worker `(served name, cpu or None)`."""

    def __init__(self, log_dir: Path, workers: Sequence[tuple[str, int | None]], env: dict[str, str]) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.services: list[Service] = []
        redis_svc, self.redis_url = start_redis(log_dir, locked=False)  # its clients read INFO
        self.services.append(redis_svc)
        self.env = {"REDIS_URL": self.redis_url, "STREAM_PING_SECONDS": "15", **env}
        try:
            self.api, self.url = start_api(self.env, log_dir)
            self.services.append(self.api)
            for i, (name, cpu) in enumerate(workers):
                pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
                threads = {"COMPUTE_THREADS": "1"} if cpu is not None else {}
                worker_env = {**self.env, "SERVED_MODEL_NAME": name, **threads}
                self.services.append(start_worker(worker_env, log_dir, name=f"worker{i + 1}", prefix=pin))
            wait_healthy(self.api, self.url, timeout=300)
            want = {name for name, _ in workers}
            self.api.wait_until(lambda: self._ready() >= len(workers) and want <= self._models(), 300)
        except BaseException:
            self.stop()
            raise
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        self._redis_proc = psutil.Process(redis_svc.proc.pid)
        self._api_proc = psutil.Process(self.api.proc.pid)

    def _health(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/health", timeout=5)
        return r.json() if r.status_code == 200 else {}

    def _ready(self) -> int:
        return len(self._health().get("workers", []))

    def _models(self) -> set[str]:
        return {m for m, state in self._health().get("models", {}).items() if state["ready"]}

    def sample(self) -> dict[str, float]:
        stats = self.redis.info("stats")
        return {
            "t": time.perf_counter(),
            "commands": stats["total_commands_processed"],
            "in": stats["total_net_input_bytes"],
            "out": stats["total_net_output_bytes"],
            "redis_cpu": sum(self._redis_proc.cpu_times()[:2]),
            "api_cpu": sum(self._api_proc.cpu_times()[:2]),
        }

    def stop(self) -> None:
        for svc in reversed(self.services):
            svc.stop()


def _accumulate(usage: Usage, a: dict[str, float], b: dict[str, float], tokens: int) -> None:
    usage.tokens += tokens
    usage.wall_s += b["t"] - a["t"]
    usage.redis_commands += int(b["commands"] - a["commands"])
    usage.redis_in += int(b["in"] - a["in"])
    usage.redis_out += int(b["out"] - a["out"])
    usage.redis_cpu_s += b["redis_cpu"] - a["redis_cpu"]
    usage.api_cpu_s += b["api_cpu"] - a["api_cpu"]


def aggregate(stack: Stack, models: list[str], usage: Usage | None = None) -> tuple[float, int]:
    """CLIENTS clients (spread over `models`) stream REQUESTS_PER_CLIENT requests each, all at
    once; aggregate tokens a second, and the count of failed requests."""
    per_model = CLIENTS // len(models)

    async def run() -> tuple[float, list[Any]]:
        async def one(model: str) -> tuple[float, list[Any]]:
            body = workload.request_body(model)
            return await asyncio.to_thread(
                run_clients,
                f"{stack.url}/v1/chat/completions",
                body,
                per_model,
                per_model * REQUESTS_PER_CLIENT,
            )

        started = time.perf_counter()
        parts = await asyncio.gather(*(one(m) for m in models))
        return time.perf_counter() - started, [s for _, samples in parts for s in samples]

    before = stack.sample()
    wall, samples = asyncio.run(run())
    after = stack.sample()
    tokens = sum(s.completion_tokens for s in samples if not s.error)
    if usage is not None:
        _accumulate(usage, before, after, tokens)
    return tokens / wall, sum(1 for s in samples if s.error)


@dataclass
class LoadResult:
    streams: int
    errors: int
    wall_s: float
    api_cpu_s: float
    api_rss_mib_before: float
    api_rss_mib_peak: float
    added_ms: list[float] = field(default_factory=list)
    before_ms: list[float] = field(default_factory=list)  # sent -> admitted (created_at)
    after_ms: list[float] = field(default_factory=list)  # ended (finished_at) -> [DONE] read

    def summary(self) -> dict[str, Any]:
        added = self.added_ms or [float("nan")]
        before = self.before_ms or [float("nan")]
        after = self.after_ms or [float("nan")]
        return {
            "streams": self.streams,
            "errors": self.errors,
            "wall_s": round(self.wall_s, 1),
            "api_cpu_s": round(self.api_cpu_s, 1),
            "api_cpu_ms_per_stream": round(1000 * self.api_cpu_s / max(self.streams, 1), 2),
            "api_rss_mib_before": round(self.api_rss_mib_before, 1),
            "api_rss_mib_peak": round(self.api_rss_mib_peak, 1),
            "added_ms_p50": round(statistics.median(added), 1),
            "added_ms_p99": round(percentile(added, 99), 1),
            "admission_ms_p50": round(statistics.median(before), 1),
            "admission_ms_p99": round(percentile(before, 99), 1),
            "delivery_ms_p50": round(statistics.median(after), 1),
            "delivery_ms_p99": round(percentile(after, 99), 1),
        }


def hold_streams(stack: Stack, streams: int) -> LoadResult:
    """`streams` streamed requests at once; each one's added latency from its job record."""
    api = psutil.Process(stack.api.proc.pid)
    rss_before = api.memory_info().rss / 2**20
    peak = rss_before
    body = {**workload.request_body(EMBEDDED_MODEL_ID), "max_tokens": SHORT_TOKENS}

    Outcome = tuple[float, float, str | None, str | None]  # sent (wall clock), seconds, job, error

    async def one(client: httpx.AsyncClient) -> Outcome:
        sent, started = time.time(), time.perf_counter()
        job_id: str | None = None
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return sent, 0.0, None, f"HTTP {response.status_code}"
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and job_id is None:
                        job_id = json.loads(line[6:]).get("id")
                    if line == "data: [DONE]":
                        return sent, time.perf_counter() - started, job_id, None
        except httpx.HTTPError as exc:
            return sent, 0.0, job_id, repr(exc)
        return sent, 0.0, job_id, "no [DONE]"

    async def run() -> list[Outcome]:
        nonlocal peak
        limits = httpx.Limits(max_connections=streams + 10)
        timeout = httpx.Timeout(600.0, connect=30.0)
        async with httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=timeout) as client:
            tasks = [asyncio.create_task(one(client)) for _ in range(streams)]
            while not all(t.done() for t in tasks):
                peak = max(peak, api.memory_info().rss / 2**20)
                await asyncio.sleep(0.2)
            return [t.result() for t in tasks]

    cpu_before = sum(api.cpu_times()[:2])
    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    cpu = sum(api.cpu_times()[:2]) - cpu_before
    load = LoadResult(streams, 0, wall, cpu, rss_before, peak)
    for sent, seconds, job_id, error in results:
        if error or job_id is None:
            continue
        created, finished = stack.redis.hmget(keys.job(job_id), ["created_at", "finished_at"])
        if created and finished:
            # The job's own span is Redis's clock; the split uses this machine's wall clock, which
            # is Redis's too here (one host).
            load.added_ms.append(1000 * (seconds - (float(finished) - float(created))))
            load.before_ms.append(1000 * (float(created) - sent))
            load.after_ms.append(1000 * (sent + seconds - float(finished)))
    errors = [error for _, _, _, error in results if error]
    load.errors = len(errors)
    if errors:
        log.warning("%d streams failed, e.g. %s", len(errors), errors[0])
    return load


def capacity(per_token: dict[str, float]) -> dict[str, float]:
    """Tokens a second one core of redis-server, and one API process, can carry at this cost."""
    return {
        "redis_tokens_per_s": 1000 / per_token["redis_cpu_ms"] if per_token["redis_cpu_ms"] else float("inf"),
        "api_tokens_per_s": 1000 / per_token["api_cpu_ms"] if per_token["api_cpu_ms"] else float("inf"),
    }


def markdown(out: dict[str, Any]) -> str:
    lines: list[str] = []
    if out["one_pinned"]:
        lines += _scaling_rows(out)
    if out.get("load"):
        lines += [
            "",
            "| load held | value |",
            "|---|---:|",
            *(f"| {k} | {v} |" for k, v in out["load"].items()),
        ]
    return "\n".join(lines) + "\n"


def _scaling_rows(out: dict[str, Any]) -> list[str]:
    lines = ["| scenario | aggregate tok/s per round | median | ratio |", "|---|---|---:|---:|"]
    base = statistics.median(out["one_pinned"])
    for name, key in (
        ("1 worker, core 0", "one_pinned"),
        ("2 workers, cores 0 and 1", "two_pinned"),
        ("2 models, a worker each, cores 0 and 1", "two_models"),
    ):
        values = out[key]
        med = statistics.median(values)
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {med:.1f} | {med / base:.2f}x |")
    per = out["per_token"]
    lines += [
        "",
        "| per generated token (2 pinned workers, streamed, coalesced) | value |",
        "|---|---:|",
        *(f"| {k} | {v:.3f} |" for k, v in per.items()),
        *(f"| {k} | {v:.0f} |" for k, v in out["capacity"].items()),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--streams", type=int, default=500, help="concurrent SSE streams in the load part (0: skip)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: every stack stops
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cores = os.cpu_count() or 1
    if cores < 2:
        raise SystemExit("needs 2 cores to pin two workers apart")
    log_root = Path(tempfile.mkdtemp(prefix="scaleout-"))
    name = EMBEDDED_MODEL_ID
    out: dict[str, Any] = {"cores": cores, "one_pinned": [], "two_pinned": [], "two_models": []}
    usage = Usage()
    for round_no in range(args.rounds):  # --rounds 0: the load part alone
        order = ("one", "two", "models") if round_no % 2 == 0 else ("models", "two", "one")
        for kind in order:
            workers = {
                "one": [(name, 0)],
                "two": [(name, 0), (name, 1)],
                "models": [("model-a", 0), ("model-b", 1)],
            }[kind]
            stack = Stack(log_root / f"{kind}-{round_no}", workers, {"WORKER_SLOTS": "1"})
            try:
                served = ["model-a", "model-b"] if kind == "models" else [name]
                aggregate(stack, served)  # warm: the first requests load caches
                tps, errors = aggregate(stack, served, usage if kind == "two" else None)
            finally:
                stack.stop()
            key = {"one": "one_pinned", "two": "two_pinned", "models": "two_models"}[kind]
            out[key].append(tps)
            log.info("round %d, %s: %.1f tok/s aggregate (%d errors)", round_no + 1, key, tps, errors)
    if usage.tokens:
        out["per_token"] = usage.per_token()
        out["capacity"] = capacity(out["per_token"])
    if args.streams:
        env = {"WORKER_SLOTS": "4", "MAX_QUEUED": str(args.streams * 2), "STREAM_PING_SECONDS": "5"}
        stack = Stack(log_root / "load", [(name, None)], env)
        try:
            out["load"] = hold_streams(stack, args.streams).summary()
        finally:
            stack.stop()
        log.info("load: %s", out["load"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout.json").write_text(json.dumps(out, indent=2, default=str))
    (args.out / "scaleout.md").write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
