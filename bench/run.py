"""`python -m bench.run`: start every system, measure them interleaved, write and print the report."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

from bench import batch, contention, interference, report, workload
from bench.inprocess import InProcessEngine
from bench.machine import describe, load_average
from bench.metrics import BatchResult
from bench.report import llama_server_name, service_name
from bench.servers import (
    LLAMA_SERVER_CTX,
    HttpServer,
    llama_server_unavailable,
    start_llama_server,
    start_seed_like,
)
from bench.service import ServiceStack
from tasks.settings import get_settings

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
# The peer: `llama-server --parallel 4 --cont-batching` (continuous batching is its default).
LLAMA_SERVER_SLOTS = 4
# The slot count the scenarios and the 4-client targets are about.
SCENARIO_SLOTS = 4
SCENARIO_CLIENTS = 4
SCENARIOS = ("interference", "contention", "batch")


class System(Protocol):
    name: str

    def run_batch(self, concurrency: int, requests: int, round_no: int) -> BatchResult: ...


class Served(System, Protocol):
    url: str


def _ints(text: str) -> list[int]:
    return sorted({int(c) for c in text.split(",") if c.strip()})


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
        help="service stacks to run, by worker count, one slot each (default 1,2,4); several workers "
        "on one machine split its cores (COMPUTE_THREADS = cores // workers, at least 1)",
    )
    p.add_argument(
        "--slots",
        default="4,8",
        help="one-worker service stacks by WORKER_SLOTS (default 4,8; '' for none), each beside "
        "llama.cpp's server with as many slots; the smallest is measured at every client count, "
        "the others at their own slot count only",
    )
    p.add_argument(
        "--torch-slots",
        default="1,4",
        help="one-worker stacks with ENGINE=transformers by WORKER_SLOTS, measured at 4 clients "
        "(default 1,4; '' for none)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="after the rounds, with the 4-slot worker and llama.cpp's server --parallel 4: "
        "'interference' (a 3,500-token prompt arrives while 3 streams decode), 'contention' "
        "(4 clients while another process keeps one core busy), 'batch' (a 64-line batch against 4 "
        "interactive clients, and interactive queue waits while a batch runs); default all, '' for none",
    )
    p.add_argument("--quick", action="store_true", help="1 round at 1 and 4 clients: a smoke run")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.clients, args.single_requests = 1, "1,4", 1
    args.clients = _ints(args.clients)
    args.workers = _ints(args.workers)
    args.slots = _ints(args.slots)
    args.torch_slots = _ints(args.torch_slots)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    numbers = [*args.clients, *args.workers, *args.slots, *args.torch_slots]
    if args.rounds < 1 or not args.clients or min(numbers) < 1:
        p.error("--rounds, --clients, --workers and the slot counts must be positive")
    return args


def requests_for(clients: int, single: int) -> int:
    """One request per client at once; at one client, a few back to back for a steadier TTFT."""
    return single if clients == 1 else clients


def _slot_clients(slots: int, args: argparse.Namespace) -> tuple[int, ...] | None:
    """The smallest slot stack runs at every client count, the others at their own slot count."""
    return None if slots == min(args.slots) else (slots,)


def _add_service(
    stack: ExitStack, systems: list[System], run: dict[str, Any], svc: ServiceStack
) -> ServiceStack:
    stack.callback(svc.stop)
    systems.append(svc)
    run["worker_startup_s"] += svc.startup_s
    run["worker_load_s"] += svc.load_s
    return svc


def start_systems(
    stack: ExitStack, args: argparse.Namespace, log_dir: Path, run: dict[str, Any]
) -> tuple[list[System], InProcessEngine]:
    settings = get_settings()
    engine = InProcessEngine(settings)  # first: converts the GGUF once, so workers start warm
    run["machine"] = describe(engine.loaded)
    run["prompt_tokens"] = engine.prompt_tokens
    systems: list[System] = [engine]
    for workers in args.workers:
        _add_service(stack, systems, run, ServiceStack(workers, log_dir))
    for slots in args.slots:
        if (clients := _slot_clients(slots, args)) is None or set(clients) & set(args.clients):
            _add_service(stack, systems, run, ServiceStack(1, log_dir, slots=slots, clients=clients))
    if SCENARIO_CLIENTS in args.clients:
        for slots in args.torch_slots:
            svc = ServiceStack(1, log_dir, slots=slots, engine="transformers", clients=(SCENARIO_CLIENTS,))
            _add_service(stack, systems, run, svc)
    seed = start_seed_like(log_dir)
    stack.callback(seed.stop)
    systems.append(seed)
    if reason := llama_server_unavailable(settings.model_id):
        log.info("llama.cpp server skipped: %s", reason)
        run["skipped"].append(f"llama.cpp server: {reason}")
        return systems, engine
    for slots in sorted({LLAMA_SERVER_SLOTS, *args.slots}):
        clients = None if slots == LLAMA_SERVER_SLOTS else (slots,)
        if clients is not None and not set(clients) & set(args.clients):
            continue
        threads = os.cpu_count() or 1
        llama = start_llama_server(settings.model_id, log_dir, slots=slots, threads=threads, clients=clients)
        stack.callback(llama.stop)
        systems.append(llama)
    return systems, engine


def _runs_at(system: System, clients: int) -> bool:
    only = getattr(system, "clients", None)
    return only is None or clients in only


def _rotated(systems: list[Any], round_no: int) -> list[Any]:
    """Each round starts from a different system, so that none always goes first."""
    return systems[round_no % len(systems) :] + systems[: round_no % len(systems)]


def measure(systems: list[System], args: argparse.Namespace) -> list[BatchResult]:
    """Round-robin: within each round and client count every system runs once."""
    for system in systems[1:]:  # one unrecorded request each: connection set-up, lazy init
        system.run_batch(1, 1, 0)
    batches: list[BatchResult] = []
    for round_no in range(1, args.rounds + 1):
        for clients in args.clients:
            for system in _rotated(systems, round_no):
                if not _runs_at(system, clients):
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


def _scenario_pair(systems: list[System]) -> list[Served]:
    """The 4-slot worker and llama.cpp's server --parallel 4, those present."""
    names = {service_name(1, SCENARIO_SLOTS), llama_server_name(LLAMA_SERVER_SLOTS)}
    return [s for s in systems if s.name in names and isinstance(s, ServiceStack | HttpServer)]


def scenarios(
    systems: list[System], engine: InProcessEngine, args: argparse.Namespace, run: dict[str, Any]
) -> list[BatchResult]:
    """The issue's two scenarios, after the rounds (the busy core would skew anything after it)."""
    pair = _scenario_pair(systems)
    if not pair:
        run["skipped"].append(f"scenarios: no 1-worker x {SCENARIO_SLOTS}-slot stack nor llama.cpp server")
        return []
    if "interference" in args.scenarios:
        text = interference.long_text(engine.prompt_tokens_of)
        tokens = engine.prompt_tokens_of(text.replace("{nonce}", "0000"))
        log.info("interference: a %d-token prompt while %d streams decode", tokens, interference.STREAMS)
        for round_no in range(1, args.rounds + 1):
            for system in _rotated(pair, round_no):
                url = f"{system.url}/v1/chat/completions"
                model = getattr(system, "model", None)
                result = interference.run(system.name, url, text, tokens, round_no, model)
                run["interference"].append(result.to_json())
                log.info(
                    "round %d, interference, %s: largest gap %.0f ms, median %.0f ms, long TTFT %.1f s",
                    round_no,
                    system.name,
                    result.max_gap_s * 1000,
                    result.median_gap_s * 1000,
                    result.long_ttft_s,
                )
    if "batch" in args.scenarios:
        stacks = [s for s in pair if isinstance(s, ServiceStack)]
        for round_no in range(1, args.rounds + 1):
            for stack in stacks:  # the Batch API is ours alone: no peer serves /v1/batches
                run["batch"].append(batch.run(stack, round_no).to_json())
    # Last: the busy core would skew anything measured after it.
    if "contention" in args.scenarios and SCENARIO_CLIENTS in args.clients:
        return contention.measure(pair, SCENARIO_CLIENTS, args.rounds)
    return []


def memory(systems: list[System]) -> dict[str, Any]:
    """RSS MiB after the runs: each service stack by part (api, worker1, ...), other servers whole."""
    rss: dict[str, Any] = {}
    for system in systems:
        if isinstance(system, ServiceStack | HttpServer):
            rss[system.name] = system.rss_mib()
    return rss


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a `kill`, a CI timeout) unwinds like Ctrl-C, so every server the run started stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
        "slots": args.slots,
        "torch_slots": args.torch_slots,
        "scenarios": args.scenarios,
        "interference": [],
        "batch": [],
        "notes": [
            f"llama.cpp server: `--parallel N --cont-batching --ctx-size {LLAMA_SERVER_CTX} --kv-unified "
            f"--threads {os.cpu_count()}` (one KV pool shared by its slots, as a worker's). Service "
            "stacks of one worker keep COMPUTE_THREADS=0 (threads chosen by measurement); several "
            "workers split the cores. \"+ 1 busy core\": measured while `python -c 'while True: pass'` "
            "runs, after 2 unrecorded warm-up batches.",
        ],
        "worker_startup_s": [],
        "worker_load_s": [],
        "skipped": [],
        "load_average": {"start": load_average()},
    }
    started = time.perf_counter()
    with ExitStack() as stack:
        systems, engine = start_systems(stack, args, log_dir, run)
        batches = measure(systems, args)
        batches += scenarios(systems, engine, args, run)
        run["rss_mib"] = memory(systems)
    run["duration_s"] = round(time.perf_counter() - started, 1)
    run["load_average"]["end"] = load_average()
    text = report.write(args.out, run, batches)
    print(text)  # the one thing for a person to read; everything else is in the log
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
