"""`python -m bench.run`: start every system, measure them interleaved, write and print the report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

from bench import report, workload
from bench.inprocess import InProcessEngine
from bench.machine import describe, load_average
from bench.metrics import BatchResult
from bench.servers import llama_server_unavailable, start_llama_server, start_seed_like
from bench.service import ServiceStack
from tasks.settings import get_settings

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
# The peer: `llama-server --parallel 4 --cont-batching` (continuous batching is its default).
LLAMA_SERVER_SLOTS = 4


class System(Protocol):
    name: str

    def run_batch(self, concurrency: int, requests: int, round_no: int) -> BatchResult: ...


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every system (default 2)")
    p.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated (default 1,4,8)")
    p.add_argument(
        "--single-requests",
        type=int,
        default=2,
        help="requests per round at 1 client, back to back (default 2)",
    )
    p.add_argument(
        "--workers",
        default="1,2,4",
        help="service stacks to run, by worker count (default 1,2,4); several workers on one machine "
        "split its cores (COMPUTE_THREADS = cores // workers, at least 1)",
    )
    p.add_argument("--quick", action="store_true", help="1 round at 1 and 4 clients: a smoke run")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.clients, args.single_requests = 1, "1,4", 1
    args.clients = sorted({int(c) for c in args.clients.split(",")})
    args.workers = sorted({int(w) for w in args.workers.split(",")})
    if args.rounds < 1 or min(args.clients, default=0) < 1 or min(args.workers, default=0) < 1:
        p.error("--rounds, --clients and --workers must be positive")
    return args


def requests_for(clients: int, single: int) -> int:
    """One request per client at once; at one client, a few back to back for a steadier TTFT."""
    return single if clients == 1 else clients


def start_systems(
    stack: ExitStack, args: argparse.Namespace, log_dir: Path, run: dict[str, Any]
) -> list[System]:
    settings = get_settings()
    engine = InProcessEngine(settings)  # first: converts the GGUF once, so workers start warm
    run["machine"] = describe(engine.loaded)
    run["prompt_tokens"] = engine.prompt_tokens
    systems: list[System] = [engine]
    for workers in args.workers:
        svc = ServiceStack(workers, log_dir)
        stack.callback(svc.stop)
        systems.append(svc)
        run["worker_startup_s"] += svc.startup_s
        run["worker_load_s"] += svc.load_s
    seed = start_seed_like(log_dir)
    stack.callback(seed.stop)
    systems.append(seed)
    if reason := llama_server_unavailable(settings.model_id):
        log.info("llama.cpp server skipped: %s", reason)
        run["skipped"].append(f"llama.cpp server: {reason}")
    else:
        llama = start_llama_server(
            settings.model_id, log_dir, slots=LLAMA_SERVER_SLOTS, threads=os.cpu_count() or 1
        )
        stack.callback(llama.stop)
        systems.append(llama)
    return systems


def measure(systems: list[System], args: argparse.Namespace) -> list[BatchResult]:
    """Round-robin: within each round and client count every system runs once, starting from a
    different system each round so that none always goes first."""
    for system in systems[1:]:  # one unrecorded request each: connection set-up, lazy init
        system.run_batch(1, 1, 0)
    batches: list[BatchResult] = []
    for round_no in range(1, args.rounds + 1):
        for clients in args.clients:
            turn = systems[round_no % len(systems) :] + systems[: round_no % len(systems)]
            for system in turn:
                if isinstance(system, InProcessEngine) and clients != 1:
                    continue
                started = time.perf_counter()
                batch = system.run_batch(clients, requests_for(clients, args.single_requests), round_no)
                batches.append(batch)
                log.info(
                    "round %d, %d client(s), %s: %.1f tok/s aggregate in %.1fs",
                    round_no,
                    clients,
                    system.name,
                    batch.aggregate_tps,
                    time.perf_counter() - started,
                )
    return batches


def memory(systems: list[System]) -> dict[str, float]:
    rss: dict[str, float] = {}
    for system in systems:
        if isinstance(system, ServiceStack):
            tag = f"{len(system.workers)}w"
            rss |= {f"{part} ({tag})": mib for part, mib in system.rss_mib().items()}
        elif hasattr(system, "rss_mib"):
            rss[system.name] = system.rss_mib()
    return rss


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request and health poll
    args = parse_args(argv)
    log_dir = args.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    run: dict[str, Any] = {
        "command": "make bench"
        + (f" BENCH_ARGS='{' '.join(argv or sys.argv[1:])}'" if (argv or sys.argv[1:]) else ""),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": args.rounds,
        "clients": args.clients,
        "new_tokens": workload.NEW_TOKENS,
        "prompt": workload.PROMPT,
        "workers": args.workers,
        "worker_startup_s": [],
        "worker_load_s": [],
        "skipped": [],
        "load_average": {"start": load_average()},
    }
    started = time.perf_counter()
    with ExitStack() as stack:
        systems = start_systems(stack, args, log_dir, run)
        batches = measure(systems, args)
        run["rss_mib"] = memory(systems)
    run["duration_s"] = round(time.perf_counter() - started, 1)
    run["load_average"]["end"] = load_average()
    text = report.write(args.out, run, batches)
    print(text)  # the one thing for a person to read; everything else is in the log
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
