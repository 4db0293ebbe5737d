"""The prefill-interference scenario: while 3 streams decode, a 3,500-token prompt arrives; how
long do the running streams stall?

Each running stream is timed chunk by chunk as its client sees it: the gaps are between SSE
chunks that carry text. The service coalesces text that comes within STREAM_COALESCE_SECONDS
(30 ms) of its last event into one chunk, so its gaps are never much under 30 ms; llama.cpp's
server sends one chunk per token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench import workload
from bench.metrics import percentile

log = logging.getLogger(__name__)

LONG_PROMPT_TOKENS = 3500  # the whole rendered prompt, chat template included
STREAMS = 3
# The running streams' budget: enough to outlast any prefill of the long prompt here; they are
# closed (and so cancelled) a second after the long request ends. 3 x (34 + 1000) + 3,500 +
# LONG_NEW_TOKENS fits SmolLM2's 8,192-token context in one shared pool.
STREAM_MAX_TOKENS = 1000
LONG_NEW_TOKENS = 16
STREAM_WARM_CHUNKS = 5  # each stream has decoded a little before the long prompt is sent
AFTER_LONG_S = 1.0  # the streams run on this long after the long request ends
SETTLE_S = 2.0  # for the server to notice the closed streams and free their slots
TIMEOUT_S = 300.0

_WORDS = (
    "river", "lantern", "copper", "meadow", "orbit", "pepper", "violin", "glacier", "harbor",
    "thistle", "canyon", "marble", "falcon", "quartz", "willow", "ember", "saddle", "nectar",
)  # fmt: skip


def _filler(units: int) -> str:
    return " ".join(
        f"Line {i}: the {_WORDS[i % len(_WORDS)]} and the {_WORDS[(i * 7) % len(_WORDS)]}."
        for i in range(units)
    )


def long_text(count_tokens: Callable[[str], int], tokens: int = LONG_PROMPT_TOKENS) -> str:
    """A user message whose rendered prompt is about `tokens` long, by the engine's own tokenizer.
    Starts with a "{nonce}" placeholder that each request fills differently, so that no server's
    prompt cache holds it from an earlier round."""
    head = "Note {nonce}. Summarize these lines in one sentence. "
    units = 100
    for _ in range(6):  # the count is nearly linear in units: a few secant steps land on it
        got = count_tokens(head.format(nonce="0000") + _filler(units))
        if abs(got - tokens) <= 2:
            break
        per_unit = got / units
        units = max(1, units + round((tokens - got) / per_unit))
    return head + _filler(units)


def _body(content: str, max_tokens: int, model: str | None) -> dict[str, Any]:
    body = workload.request_body(model)
    body["messages"] = [{"role": "user", "content": content}]
    body["max_tokens"] = max_tokens
    return body


@dataclass
class _Stream:
    """One streamed request: the arrival time of each text chunk (perf_counter seconds)."""

    chunks: list[float] = field(default_factory=list)
    ended: bool = False  # it ran to its own end, rather than being closed by the scenario
    error: str | None = None


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], out: _Stream, stop: asyncio.Event | None
) -> None:
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                out.error = f"{response.status_code} {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if stop is not None and stop.is_set():
                    return  # leaving the block closes the connection: the server cancels it
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.ended = True
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = str(chunk["error"])
                    return
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    out.chunks.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.error = repr(exc)


@dataclass
class InterferenceResult:
    """One run of the scenario on one system; seconds."""

    system: str
    round: int
    prompt_tokens: int
    max_gap_s: float  # the largest gap between two text chunks of any running stream
    median_gap_s: float  # over all gaps of the running streams
    p99_gap_s: float
    max_gap_during_prefill_s: float  # gaps that overlap the long request's wait for its first token
    median_gap_before_s: float  # gaps that ended before the long request was sent
    median_gap_during_prefill_s: float  # gaps that overlap its wait for its first token
    long_ttft_s: float  # the long request's time to first token
    stream_chunks: list[int]  # text chunks each running stream received
    outlasted: bool  # every running stream was still decoding when the long one got its first token
    errors: list[str]
    gaps: int = 0
    gaps_over_5x_median: int = 0
    # The 5 largest gaps as [seconds after the long prompt was sent that the gap ended, gap seconds].
    largest_gaps: list[list[float]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.max_gap_s / self.median_gap_s if self.median_gap_s > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


async def _scenario(url: str, text: str, model: str | None) -> tuple[list[_Stream], _Stream, float]:
    limits = httpx.Limits(max_connections=STREAMS + 2)
    timeout = httpx.Timeout(TIMEOUT_S, connect=10.0)
    stop = asyncio.Event()
    streams = [_Stream() for _ in range(STREAMS)]
    long = _Stream()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        body = _body(workload.PROMPT, STREAM_MAX_TOKENS, model)
        tasks = [asyncio.create_task(_stream(client, url, body, s, stop)) for s in streams]
        deadline = time.perf_counter() + TIMEOUT_S
        while any(len(s.chunks) < STREAM_WARM_CHUNKS and not s.error for s in streams):
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.02)
        sent = time.perf_counter()
        await asyncio.wait_for(
            _stream(client, url, _body(text, LONG_NEW_TOKENS, model), long, None), TIMEOUT_S
        )
        await asyncio.sleep(AFTER_LONG_S)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)
    return streams, long, sent


def run(
    system: str, url: str, text: str, prompt_tokens: int, round_no: int, model: str | None = None
) -> InterferenceResult:
    """The scenario once against one server's chat-completions `url`."""
    nonce = f"{round_no:04d}"  # servers keep prompt caches: a new prefix for each round
    streams, long, sent = asyncio.run(_scenario(url, text.replace("{nonce}", nonce), model))
    time.sleep(SETTLE_S)
    errors = [e for s in [*streams, long] if (e := s.error)]
    first = long.chunks[0] if long.chunks else float("inf")
    gaps: list[float] = []
    prefill_gaps: list[float] = []
    before: list[float] = []
    timed: list[list[float]] = []
    for s in streams:
        for a, b in zip(s.chunks, s.chunks[1:], strict=False):
            gaps.append(b - a)
            timed.append([round(b - sent, 3), round(b - a, 4)])
            if b > sent and a < first:
                prefill_gaps.append(b - a)
            elif b <= sent:
                before.append(b - a)
    if errors:
        log.warning("interference on %s: %s", system, errors)
    return InterferenceResult(
        system=system,
        round=round_no,
        prompt_tokens=prompt_tokens,
        max_gap_s=max(gaps, default=0.0),
        median_gap_s=statistics.median(gaps) if gaps else 0.0,
        p99_gap_s=percentile(gaps, 99) if gaps else 0.0,
        max_gap_during_prefill_s=max(prefill_gaps, default=0.0),
        median_gap_before_s=statistics.median(before) if before else 0.0,
        median_gap_during_prefill_s=statistics.median(prefill_gaps) if prefill_gaps else 0.0,
        long_ttft_s=first - sent,
        stream_chunks=[len(s.chunks) for s in streams],
        outlasted=all(not s.ended and s.chunks and s.chunks[-1] > first for s in streams),
        errors=errors,
        gaps=len(gaps),
        gaps_over_5x_median=sum(g > 5 * statistics.median(gaps) for g in gaps) if gaps else 0,
        largest_gaps=sorted(timed, key=lambda t: -t[1])[:5],
    )
