"""`python -m bench.long_streams`: issue 23's CPU target through the service, as a user tries it.

4 streams decoding together after ~1,800-token prompts against after ~50-token prompts: the
per-stream decode speed (tokens after the first over the time after the first) and its
long/short ratio, for each engine on the embedded model, each behind its own Redis, API and one
4-slot worker (bench/service.py). Two ways in:

- `n=4`: one request for 4 choices; they share one prefill and decode together from the same
  step, so this is exactly the 4 streams' decode speed at that context;
- `4 clients`: 4 requests sent at once, each its own prompt (no engine can share a prefill):
  what 4 users see, including the steps where the first streams decode beside the others'
  prefill chunks.

Short and long rounds alternate, so load from elsewhere on the machine falls on both; medians
over every stream of every round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench import workload
from bench.clients import REQUEST_TIMEOUT_S, stream_one
from bench.machine import load_average
from bench.metrics import RequestSample
from bench.service import ServiceStack

log = logging.getLogger("bench.long_streams")

RESULTS = Path(__file__).resolve().parent / "results"
STREAMS = 4
NEW_TOKENS = 64
SHORT = "Write a short poem about a quiet harbour at dawn."


def long_prompt(variant: int, notes: int) -> str:
    """A user message of about 15 tokens a note: a log to summarize, different per variant so no
    prefix is shared between the 4 clients' prompts."""
    lines = [
        f"Entry {variant}-{i}: worker {i % 7} took job {i * 37 + variant} from queue {i % 3} and "
        f"finished it in {(i * 13) % 97} ms."
        for i in range(notes)
    ]
    return f"Summarize this log ({variant}):\n" + "\n".join(lines)


def body(content: str, n: int) -> dict[str, Any]:
    """The bench's streamed greedy request (bench/workload.py, EOS ignored) of `content`, `n` choices."""
    return workload.request_body() | {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": NEW_TOKENS,
        "n": n,
    }


def prompt_tokens(url: str, content: str) -> int:
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": 1},
        timeout=300,
    )
    reply.raise_for_status()
    return int(reply.json()["usage"]["prompt_tokens"])


def per_stream_speeds(url: str, contents: list[str], n: int) -> list[float]:
    """Each stream's decode tok/s for requests of `contents` sent at once, `n` choices each."""
    speeds = []
    for sample in asyncio.run(_at_once(f"{url}/v1/chat/completions", [body(c, n) for c in contents])):
        log.debug(
            "stream: ttft %.2f s, total %.2f s, %d tokens",
            sample.ttft_s,
            sample.total_s,
            sample.completion_tokens,
        )
        if sample.error or sample.decode_tps is None:
            raise RuntimeError(f"a stream failed: {sample.error}")
        speeds.append(sample.decode_tps / n)  # n choices of one request: its tokens count them all
    return speeds


async def _at_once(url: str, bodies: list[dict[str, Any]]) -> list[RequestSample]:
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=8)) as client:
        return list(await asyncio.gather(*(stream_one(client, url, b) for b in bodies)))


def measure(engine: str, rounds: int, notes: int, log_dir: Path) -> dict[str, Any]:
    stack = ServiceStack(1, log_dir, slots=STREAMS, engine=engine)
    try:
        # Every prompt of the run differs (llama.cpp reuses a slot's prompt prefix), so every
        # long request prefills all of its prompt.
        variants = iter(range(10_000))
        tokens = {
            "short": prompt_tokens(stack.url, SHORT),
            "long": prompt_tokens(stack.url, long_prompt(-1, notes)),
        }
        speeds: dict[str, list[float]] = {
            f"{way}@{n}": [] for way in ("n=4", "4 clients") for n in ("short", "long")
        }
        # Untimed: the worker's first steps at each length (thread tuning, allocations, caches).
        per_stream_speeds(stack.url, [SHORT], STREAMS)
        per_stream_speeds(stack.url, [long_prompt(next(variants), notes)], STREAMS)
        for _ in range(rounds):
            speeds["n=4@short"] += per_stream_speeds(stack.url, [f"{SHORT} ({next(variants)})"], STREAMS)
            speeds["n=4@long"] += per_stream_speeds(stack.url, [long_prompt(next(variants), notes)], STREAMS)
            shorts = [f"{SHORT} ({next(variants)})" for _ in range(STREAMS)]
            speeds["4 clients@short"] += per_stream_speeds(stack.url, shorts, 1)
            longs = [long_prompt(next(variants), notes) for _ in range(STREAMS)]
            speeds["4 clients@long"] += per_stream_speeds(stack.url, longs, 1)
        medians = {key: statistics.median(v) for key, v in speeds.items()}
        return {
            "engine": engine,
            "prompt_tokens": tokens,
            "per_stream_tok_s": {key: round(v, 2) for key, v in medians.items()},
            "long_over_short": {
                way: round(medians[f"{way}@long"] / medians[f"{way}@short"], 2)
                for way in ("n=4", "4 clients")
            },
            "streams_measured": {key: len(v) for key, v in speeds.items()},
        }
    finally:
        stack.stop()


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | prompt tokens short / long | way in | per-stream tok/s short | long | long/short |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        t = r["prompt_tokens"]
        for way in ("n=4", "4 clients"):
            s = r["per_stream_tok_s"]
            lines.append(
                f"| {r['engine']} | {t['short']} / {t['long']} | {way} | {s[f'{way}@short']} | "
                f"{s[f'{way}@long']} | {r['long_over_short'][way]}x |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.long_streams", description=__doc__)
    p.add_argument("--engines", default="transformers,llama.cpp", help="engines, in order")
    p.add_argument("--rounds", type=int, default=3, help="short/long rounds per way in (default 3)")
    p.add_argument("--notes", type=int, default=60, help="log lines in the long prompt (~1,800 tokens at 60)")
    args = p.parse_args(argv)
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(engine, args.rounds, args.notes, Path(tmp)) for engine in args.engines.split(",")]
    report = {"load_average": {"before": before, "after": load_average()}, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_streams.json").write_text(json.dumps(report, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
