"""Redis failover under load: how long until the service serves again after its master dies, and
what the requests in flight come to, with and without WAIT (REDIS_WAIT_REPLICAS).

One stack per mode: a master, one replica and three sentinels (tests/processes.py, down-after
DOWN_AFTER_MS), one worker with the embedded model and the API, following them by a sentinel://
REDIS_URL. Each run: CLIENTS clients send short chat completions back to back; the master is
killed (SIGKILL); a probe sends a streamed request every PROBE_GAP_S until one is taken (200:
admitted and enqueued), which is the time to serve again; the clients go on for SETTLE_S, then
stop; every request is counted by how it ended (finished, or the error code), and every job
record by its terminal state; the old master is restarted as a replica before the next run.

    python -m bench.failover [--runs 5] [--out bench/results/failover.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tasks import keys
from tests.processes import (
    DOWN_AFTER_MS,
    ReplicatedRedis,
    Service,
    start_api,
    start_replicated_redis,
    start_worker,
    wait_healthy,
)

log = logging.getLogger(__name__)

MODEL = "SmolLM2-135M-Instruct"
CLIENTS = 4
MAX_TOKENS = 8
PROBE_GAP_S = 0.1
SETTLE_S = 10.0
REQUEST_TIMEOUT_S = 60.0
MASTER_ARGS = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": MAX_TOKENS}


class Load:
    """CLIENTS threads sending chat completions back to back, counting how each ended."""

    def __init__(self, api_url: str) -> None:
        self._url = f"{api_url}/v1/chat/completions"
        self._stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            while not self._stop.is_set():
                try:
                    r = http.post(self._url, json=BODY)
                    outcome = "finished" if r.status_code == 200 else r.json()["error"]["code"]
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    outcome = type(exc).__name__
                with self._lock:
                    self.outcomes[outcome] += 1

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 5)


def serve_again(api_url: str, since: float) -> float:
    body = {**BODY, "max_tokens": 2, "stream": True}
    while True:
        try:
            with httpx.stream("POST", f"{api_url}/v1/chat/completions", json=body, timeout=30) as r:
                if r.status_code == 200:
                    return time.monotonic() - since
        except httpx.HTTPError:
            pass
        time.sleep(PROBE_GAP_S)


def job_states(ha: ReplicatedRedis) -> Counter[str]:
    db = ha.node(ha.master_port(), decode_responses=True)
    prefix = keys.job("")
    states: Counter[str] = Counter()
    for key in db.scan_iter(f"{prefix}*"):
        if ":" not in key.removeprefix(prefix):
            record = db.hmget(key, "status", "error_code")
            states[record[0] if record[0] != "failed" else f"failed:{record[1]}"] += 1
    return states


def one_mode(runs: int, wait_replicas: int, log_dir: Path) -> dict[str, Any]:
    ha = start_replicated_redis(log_dir, master_args=MASTER_ARGS)
    env = {**ha.env(), "LOG_LEVEL": "WARNING", "WORKER_SLOTS": "4"}
    if wait_replicas:
        env.update(REDIS_WAIT_REPLICAS=str(wait_replicas), REDIS_WAIT_TIMEOUT_MS="200")
    services: list[Service] = []
    result: dict[str, Any] = {"wait_replicas": wait_replicas, "runs": []}
    try:
        services.append(start_worker(env, log_dir))
        api, api_url = start_api(env, log_dir)
        services.append(api)
        wait_healthy(services[0], api_url, timeout=300)
        for run in range(runs):
            with Load(api_url) as load:
                time.sleep(2)  # traffic flowing
                master = ha.master_port()
                ha.nodes[master].stop(signal.SIGKILL)
                killed = time.monotonic()
                seconds = serve_again(api_url, killed)
                time.sleep(SETTLE_S)
            ha.start_node(master, ha.master_port())
            ha.wait_replicated(ha.master_port())
            entry = {"serve_again_s": round(seconds, 2), "requests": dict(load.outcomes)}
            log.warning("wait=%s run %s: %s", wait_replicas, run, entry)
            result["runs"].append(entry)
        result["jobs"] = dict(job_states(ha))
    finally:
        for svc in reversed(services):
            svc.stop()
        ha.stop()
    times = [r["serve_again_s"] for r in result["runs"]]
    result["serve_again_median_s"] = statistics.median(times)
    result["serve_again_max_s"] = max(times)
    requests: Counter[str] = Counter()
    for r in result["runs"]:
        requests.update(r["requests"])
    result["requests"] = dict(requests)
    return result


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/failover.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    results = {"down_after_ms": DOWN_AFTER_MS, "clients": CLIENTS, "modes": []}
    for wait_replicas in (0, 1):
        with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
            results["modes"].append(one_mode(args.runs, wait_replicas, Path(tmp)))  # type: ignore[attr-defined]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
