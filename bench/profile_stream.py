"""Where one stream's time goes (issue 19): the service beside the engine in-process, one client.

One worker (WORKER_SLOTS=1, default settings) serves one streaming client sending the bench's
128-token request back to back, alternating with the same request on the engine in this process.
Over the service's turns it counts CPU seconds of the API, the worker (per thread), redis-server
and this client, and Redis commands and bytes; in-process it times each scheduler step beside
its llama_decode. Then one request under MONITOR, a py-spy profile of the worker (when py-spy is
installed), the same alternation with STREAM_COALESCE_SECONDS=0, and last the engine driven from
a second thread (as the worker's decode loop drives the engine its main thread warmed up) beside
one loaded and driven in a single thread of a fresh process.

    python -m bench.profile_stream --seconds 40
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import psutil
import redis

from bench import workload
from bench.inprocess import InProcessEngine
from bench.metrics import RequestSample
from bench.service import ServiceStack
from tasks.settings import get_settings

log = logging.getLogger(__name__)

ROUND_REQUESTS = 3  # requests per turn before the other system's turn
PROFILE_RATE_HZ = 100


@dataclass
class Stream:
    ttft_s: float
    total_s: float
    tokens: int
    chunks: int
    gap_s: float  # median time between content chunks

    @property
    def decode_tps(self) -> float:
        """As bench/metrics.py: tokens after the first over the time after the first."""
        return (self.tokens - 1) / (self.total_s - self.ttft_s)


def stream_once(client: httpx.Client, url: str) -> Stream:
    """One streamed request as bench/clients.py sends it, counting content chunks."""
    started = time.perf_counter()
    first: float | None = None
    tokens = chunks = 0
    arrivals: list[float] = []
    with client.stream("POST", url, json=workload.request_body()) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    arrivals.append(time.perf_counter())
                    first = first if first is not None else time.perf_counter() - started
            if usage := chunk.get("usage"):
                tokens = int(usage["completion_tokens"])
    if first is None:
        raise RuntimeError("no content streamed")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return Stream(first, time.perf_counter() - started, tokens, chunks, statistics.median(gaps or [0.0]))


class StepClock:
    """Wall time of every scheduler step, runner step and llama_decode of the in-process engine,
    by wrapping them (nothing in model/ changes)."""

    def __init__(self, engine: InProcessEngine) -> None:
        self.step: list[float] = []
        self.runner: list[float] = []
        self.decode: list[float] = []
        self.recording = False
        llama_cpp.llama_decode = self._timed(llama_cpp.llama_decode, self.decode)
        scheduler = engine.engine.scheduler
        scheduler.step = self._timed(scheduler.step, self.step)  # type: ignore[method-assign]
        runner = engine.loaded.runner
        runner.step = self._timed(runner.step, self.runner)  # type: ignore[method-assign]

    def _timed(self, fn: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if self.recording:
                    into.append(time.perf_counter() - started)

        return timed


@dataclass
class Usage:
    """Counters summed over the service's turns only."""

    wall_s: float = 0.0
    tokens: int = 0
    chunks: int = 0
    cpu_s: Counter[str] = field(default_factory=Counter)
    threads: Counter[tuple[str, int]] = field(default_factory=Counter)
    redis_calls: Counter[str] = field(default_factory=Counter)
    redis_in: int = 0
    redis_out: int = 0
    machine_busy_s: float = 0.0


class Probe:
    """The processes of one stack and what they have used so far."""

    def __init__(self, stack: ServiceStack) -> None:
        redis_pid = stack.services[0].proc.pid
        self.procs = {
            "api": psutil.Process(stack.api.proc.pid),
            "worker": psutil.Process(stack.workers[0].proc.pid),
            "redis-server": psutil.Process(redis_pid),
            "client (this process)": psutil.Process(),
        }
        self.redis = redis.Redis.from_url(stack.redis_url)

    def snapshot(self) -> dict[str, Any]:
        stats = self.redis.info("stats")
        machine = psutil.cpu_times()
        return {
            "t": time.perf_counter(),
            "cpu": {name: sum(p.cpu_times()[:2]) for name, p in self.procs.items()},
            "threads": {
                (who, t.id): t.user_time + t.system_time
                for who in ("worker", "client (this process)")
                for t in self.procs[who].threads()
            },
            "calls": {
                k.removeprefix("cmdstat_"): v["calls"] for k, v in self.redis.info("commandstats").items()
            },
            "in": stats["total_net_input_bytes"],
            "out": stats["total_net_output_bytes"],
            "busy": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
        }

    def add(self, usage: Usage, a: dict[str, Any], b: dict[str, Any]) -> None:
        usage.wall_s += b["t"] - a["t"]
        usage.cpu_s.update({k: b["cpu"][k] - a["cpu"][k] for k in a["cpu"]})
        usage.threads.update({k: v - a["threads"].get(k, 0.0) for k, v in b["threads"].items()})
        usage.redis_calls.update({k: v - a["calls"].get(k, 0) for k, v in b["calls"].items()})
        usage.redis_in += b["in"] - a["in"]
        usage.redis_out += b["out"] - a["out"]
        usage.machine_busy_s += b["busy"] - a["busy"]


@dataclass
class Alternation:
    coalesce: str
    service: list[Stream] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)  # decode tok/s
    usage: Usage = field(default_factory=Usage)  # over the service's turns
    engine_usage: Usage = field(default_factory=Usage)  # over the in-process engine's turns
    worker_threads: int = 0


def alternate(
    stack: ServiceStack, engine: InProcessEngine, clock: StepClock, seconds: float, coalesce: str
) -> Alternation:
    url = f"{stack.url}/v1/chat/completions"
    probe = Probe(stack)
    result = Alternation(coalesce)
    with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        stream_once(client, url)  # unrecorded: the worker's first request runs the tuner's probe
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            before = probe.snapshot()
            streams = [stream_once(client, url) for _ in range(ROUND_REQUESTS)]
            probe.add(result.usage, before, probe.snapshot())
            result.service += streams
            result.usage.tokens += sum(s.tokens for s in streams)
            result.usage.chunks += sum(s.chunks for s in streams)
            clock.recording = True
            before = probe.snapshot()
            samples = [engine.one() for _ in range(ROUND_REQUESTS)]
            probe.add(result.engine_usage, before, probe.snapshot())
            clock.recording = False
            result.engine += [tps for sample in samples if (tps := sample.decode_tps) is not None]
            result.engine_usage.tokens += sum(sample.completion_tokens for sample in samples)
    result.worker_threads = probe.procs["worker"].num_threads()
    log.info(
        "coalesce %s: service %.1f, engine %.1f tok/s (medians)",
        coalesce,
        statistics.median(s.decode_tps for s in result.service),
        statistics.median(result.engine),
    )
    return result


def monitor_one(stack: ServiceStack) -> tuple[Counter[str], int]:
    """Redis MONITOR over one streamed request: commands by name, and the request's tokens."""
    port = stack.redis_url.rsplit(":", 1)[1].split("/")[0]
    with tempfile.TemporaryFile() as out:
        mon = subprocess.Popen(["redis-cli", "-p", port, "monitor"], stdout=out, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            with httpx.Client(timeout=300.0) as client:
                stream = stream_once(client, f"{stack.url}/v1/chat/completions")
            time.sleep(0.2)
        finally:
            mon.terminate()
            mon.wait(5)
        out.seek(0)
        text = out.read().decode(errors="replace")
    names = Counter(m.group(1).upper() for m in re.finditer(r'^\S+ \[[^\]]*\] "([^"]+)"', text, re.M))
    return names, stream.tokens


@contextmanager
def streaming_in_background(stack: ServiceStack) -> Iterator[list[Stream]]:
    """Requests back to back from a thread while the caller profiles."""
    streams: list[Stream] = []
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(timeout=300.0) as client:
            while not stop.is_set():
                streams.append(stream_once(client, f"{stack.url}/v1/chat/completions"))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield streams
    finally:
        stop.set()
        thread.join(60)


def py_spy() -> str | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return spy if Path(spy).exists() else None


def record(spy: str, pid: int, seconds: float, raw: Path) -> subprocess.Popen[bytes]:
    """py-spy record --native --idle: raw (collapsed) stacks per thread, so a thread's samples
    cover the whole wall time, waits included."""
    argv = [spy, "record", "--native", "--threads", "--idle", "--rate", str(PROFILE_RATE_HZ)]
    argv += ["--duration", str(int(seconds)), "--format", "raw", "-o", str(raw), "--pid", str(pid)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Profile:
    raw: Path
    tokens: int
    tps: float  # median decode tok/s while profiled (py-spy pauses the process to sample)
    loop_samples: int
    buckets: Counter[str]
    top_self: list[tuple[str, int]]


def profile_worker(spy: str, stack: ServiceStack, seconds: float, out_dir: Path) -> Profile:
    raw = out_dir / "worker.pyspy.txt"
    with streaming_in_background(stack) as streams:
        time.sleep(1.0)
        record(spy, stack.workers[0].proc.pid, seconds, raw).wait()
    tps = _med([s.decode_tps for s in streams])
    return summarise_profile(raw, "decode-loop", sum(s.tokens for s in streams), tps)


def profile_engine(spy: str, engine: InProcessEngine, seconds: float, out_dir: Path) -> Profile:
    raw = out_dir / "engine.pyspy.txt"
    samples: list[RequestSample] = []
    proc = record(spy, os.getpid(), seconds, raw)
    while proc.poll() is None:
        samples.append(engine.one())
    tps = _med([t for s in samples if (t := s.decode_tps) is not None])
    return summarise_profile(raw, "MainThread", sum(s.completion_tokens for s in samples), tps)


# A sample goes to the first bucket whose markers any of its frames contain (leaf: the last frame).
BUCKETS = [
    ("waiting for the next request", ("Condition.wait",), ""),
    ("waiting for the GIL", ("take_gil",), ""),
    ("llama_decode: libgomp (OpenMP barrier wait)", ("llama_decode",), "libgomp"),
    ("llama_decode: compute (ggml)", ("llama_decode",), ""),
    ("llama_sampler_sample", ("llama_sampler_sample",), ""),
    ("Redis pipeline / calls", ("redis/", "tasks/redis.py", "tasks/jobs.py", "tasks/events.py"), ""),
    ("Generation.feed (detokenize, stops)", ("model/generation.py", "model/stopping.py"), ""),
    ("runner.step, rest (batch, plan)", ("llamacpp_backend.py",), ""),
    ("Scheduler.step, rest", ("model/scheduler.py",), ""),
    ("DeltaBuffer", ("DeltaBuffer",), ""),
    ("decode loop, rest (tasks/slots.py)", ("tasks/slots.py",), ""),
]


def _bucket(frames: list[str]) -> str:
    for name, marks, leaf in BUCKETS:
        if any(m in f for f in frames for m in marks) and leaf in frames[-1]:
            return name
    return "other"


def summarise_profile(raw: Path, thread: str, tokens: int, tps: float) -> Profile:
    """The loop thread's samples by bucket, and its top leaf (self) frames."""
    buckets: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or not frames[0].endswith(f": {thread}"):
            continue
        buckets[_bucket(frames)] += int(count)
        leaves[re.sub(r"0x[0-9a-f]+ ", "", frames[-1])] += int(count)
    return Profile(raw, tokens, tps, sum(buckets.values()), buckets, leaves.most_common(6))


def other_thread_tps(engine: InProcessEngine, requests: int) -> float:
    """The engine driven from a second thread, as the worker's decode loop drives the engine its
    main thread loaded and warmed up. Last: afterwards both threads have used OpenMP."""
    samples: list[RequestSample] = []
    thread = threading.Thread(target=lambda: samples.extend(engine.one() for _ in range(requests)))
    thread.start()
    thread.join()
    return _med([t for s in samples if (t := s.decode_tps) is not None])


# The control for other_thread_tps, in a fresh process: load, warm up and decode all in one
# thread that is not the main one, as the worker would if its loop thread loaded the engine.
ONE_THREAD = """
import statistics, threading
from bench.inprocess import InProcessEngine
from tasks.settings import get_settings
out = []
def run():
    engine = InProcessEngine(get_settings())
    out.extend(engine.one().decode_tps for _ in range(REQUESTS))
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(statistics.median(out))
"""


def one_thread_tps(requests: int) -> float:
    code = ONE_THREAD.replace("REQUESTS", str(requests))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def tuner_lines(stack: ServiceStack) -> list[str]:
    text = stack.workers[0].log_path.read_text(errors="replace")
    return [ln.split("INFO", 1)[-1].strip() for ln in text.splitlines() if "thread(s) from now on" in ln]


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _ms(values: list[float]) -> float:
    return 1000 * _med(values)


def _usage_rows(tag: str, u: Usage, per_chunk: bool) -> list[tuple[str, str]]:
    rows = []
    for name, cpu in u.cpu_s.items():
        chunk = f" / {1000 * cpu / u.chunks:.2f}" if per_chunk else ""
        rows.append(
            (
                f"{tag}: {name} CPU ms per token{' / per chunk' if per_chunk else ''}",
                f"{1000 * cpu / u.tokens:.2f}{chunk}",
            )
        )
    for who in ("worker", "client (this process)"):
        busiest = sorted((v for (w, _), v in u.threads.items() if w == who), reverse=True)[:3]
        rows.append(
            (
                f"{tag}: {who}'s 3 busiest threads, CPU ms per token",
                " / ".join(f"{1000 * v / u.tokens:.2f}" for v in busiest),
            )
        )
    rows.append(
        (
            f"{tag}: machine busy (cores of {psutil.cpu_count()}), ms wall per token",
            f"{u.machine_busy_s / u.wall_s:.2f}, {1000 * u.wall_s / u.tokens:.2f}",
        )
    )
    return rows


def report(
    runs: list[Alternation],
    clock: StepClock,
    engine: InProcessEngine,
    tuner: dict[str, list[str]],
    monitor: tuple[Counter[str], int],
    profiles: dict[str, Profile],
) -> str:
    rows: list[tuple[str, str]] = []
    for run in runs:
        tag, u = f"COALESCE={run.coalesce}", run.usage
        svc, eng = _med([s.decode_tps for s in run.service]), _med(run.engine)
        rows.append((f"{tag}: service / engine tok/s (median)", f"{svc:.1f} / {eng:.1f} = {svc / eng:.2f}x"))
        rows.append(
            (
                f"{tag}: service TTFT ms, gap between chunks ms (medians)",
                f"{_ms([s.ttft_s for s in run.service]):.1f}, {_ms([s.gap_s for s in run.service]):.2f}",
            )
        )
        rows.append((f"{tag}: requests, tokens per chunk", f"{len(run.service)}, {u.tokens / u.chunks:.2f}"))
        rows += _usage_rows(f"{tag} service turns", u, per_chunk=True)
        rows += _usage_rows(f"{tag} engine turns", run.engine_usage, per_chunk=False)
        calls = sorted(((k, v) for k, v in u.redis_calls.items() if v), key=lambda kv: -kv[1])
        mix = ", ".join(f"{k} {v / u.tokens:.2f}" for k, v in calls[:7])
        rows.append(
            (f"{tag}: Redis commands per token", f"{sum(v for _, v in calls) / u.tokens:.2f} ({mix})")
        )
        rows.append(
            (
                f"{tag}: Redis bytes in / out per token",
                f"{u.redis_in / u.tokens:.0f} / {u.redis_out / u.tokens:.0f}",
            )
        )
        rows.append((f"{tag}: worker OS threads", str(run.worker_threads)))
        rows.append(
            (
                f"{tag}: worker tuner switches",
                " | ".join(tuner.get(run.coalesce, [])) or "none (stays at the loaded count)",
            )
        )
    rows.append(
        (
            "engine in-process: Scheduler.step / runner.step / llama_decode ms (medians)",
            f"{_ms(clock.step):.3f} / {_ms(clock.runner):.3f} / {_ms(clock.decode):.3f}",
        )
    )
    best = getattr(getattr(engine.loaded.runner, "_tuner", None), "_best", None)
    rows.append(
        (
            "engine in-process: threads loaded; tuner's choice by batch bucket",
            f"{engine.loaded.threads}; {best or 'none'}",
        )
    )
    names, tokens = monitor
    mix = ", ".join(f"{k} {v}" for k, v in names.most_common(8))
    rows.append(
        (
            f"MONITOR over one {tokens}-token request (COALESCE default)",
            f"{sum(names.values())} commands: {mix}",
        )
    )
    for who, p in profiles.items():
        rows.append((f"py-spy {who}: tok/s while profiled, tokens", f"{p.tps:.1f}, {p.tokens}"))
        rows.append(
            (
                f"py-spy {who}: loop thread's samples, as ms wall per token",
                f"{1000 * p.loop_samples / PROFILE_RATE_HZ / p.tokens:.2f}",
            )
        )
        for name, count in p.buckets.most_common():
            ms = 1000 * count / PROFILE_RATE_HZ / p.tokens
            rows.append((f"py-spy {who}: {name}", f"{100 * count / p.loop_samples:.1f}% ({ms:.2f} ms/token)"))
        rows.append((f"py-spy {who}: top leaf frames", "; ".join(f"{k[:50]} {v}" for k, v in p.top_self)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile_stream", description=__doc__)
    p.add_argument("--seconds", type=float, default=40.0, help="alternation at the default coalescing")
    p.add_argument("--profile-seconds", type=float, default=12.0, help="each py-spy record")
    p.add_argument("--log-dir", type=Path, default=None, help="default: a new temporary directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="profile_stream-"))
    engine = InProcessEngine(get_settings())
    clock = StepClock(engine)
    runs: list[Alternation] = []
    tuner: dict[str, list[str]] = {}
    profiles: dict[str, Profile] = {}
    spy = py_spy()
    if spy is None:
        log.warning("py-spy is not installed (pip install py-spy): no profiles")
    default = str(get_settings().stream_coalesce_seconds)
    stack = ServiceStack(1, log_dir / "coalesce-default")
    try:
        runs.append(alternate(stack, engine, clock, args.seconds, default))
        monitor = monitor_one(stack)
        if spy is not None:
            profiles["worker"] = profile_worker(spy, stack, args.profile_seconds, log_dir)
            profiles["engine"] = profile_engine(spy, engine, args.profile_seconds, log_dir)
        tuner[default] = tuner_lines(stack)
    finally:
        stack.stop()
    stack = ServiceStack(1, log_dir / "coalesce-0", env={"STREAM_COALESCE_SECONDS": "0"})
    try:
        runs.append(alternate(stack, engine, clock, args.seconds / 2, "0"))
        tuner["0"] = tuner_lines(stack)
    finally:
        stack.stop()
    clock.recording = False
    main_tps = _med([t for s in (engine.one() for _ in range(6)) if (t := s.decode_tps) is not None])
    other_tps = other_thread_tps(engine, 6)
    fresh_tps = one_thread_tps(6)
    text = report(runs, clock, engine, tuner, monitor, profiles)
    text += (
        f"\nengine in-process from the thread that warmed it up / from a second thread, tok/s: "
        f"{main_tps:.1f} / {other_tps:.1f} = {other_tps / main_tps:.2f}x"
        f"\nengine loaded, warmed up and driven all in one non-main thread (fresh process), tok/s: "
        f"{fresh_tps:.1f}"
    )
    print(text)  # the one thing for a person to read
    log.info("logs and raw py-spy stacks in %s", log_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
