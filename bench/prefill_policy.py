"""The prefill policy in-process (model/prefill.py): a 3,503-token prompt joins 3 decoding
streams on a 4-slot engine, with no API or Redis in the way; its time to first token against the
same prompt alone, and the steps that carried its chunks.

    python -m bench.prefill_policy                       # the settings' defaults
    python -m bench.prefill_policy --share 0.95 --stall 0.85

Every forward pass runs on one thread that also loaded the engine, as the worker's decode loop
does (see tasks/slots.py, SlotLoop.start).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from bench import workload
from bench.interference import long_text
from model.engine import Engine
from model.types import ChatMessage, SamplingParams
from tasks.settings import Settings
from tasks.worker import load_engine

STREAMS = 3
WARM_STEPS = 30


def _first_token(engine: Engine, text: str) -> float:
    long = engine.generation(engine.prepare([ChatMessage("user", text)]), SamplingParams(max_tokens=2))
    engine.scheduler.submit("long", long)
    started = time.perf_counter()
    while long.generated == 0:
        engine.scheduler.step()
    return time.perf_counter() - started


def alone(text: str) -> float:
    return _first_token(load_engine(Settings(worker_slots=4)), text)


def beside_streams(share: float, stall: float, text: str) -> dict[str, Any]:
    engine = load_engine(Settings(worker_slots=4, prefill_share=share, prefill_stall_seconds=stall))
    pace = engine.loaded.runner._pace  # type: ignore[attr-defined]  # llama.cpp's: the policy's input
    steps: list[tuple[int, float]] = []
    observe: Callable[..., None] = pace.observe

    def watched(seconds: float, *, decoded: int, prefilled: int) -> None:
        steps.append((prefilled, seconds))
        observe(seconds, decoded=decoded, prefilled=prefilled)

    pace.observe = watched  # type: ignore[method-assign]
    streaming = SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True)
    for i in range(STREAMS):
        engine.scheduler.submit(
            ("stream", i), engine.generation(engine.prepare(workload.messages()), streaming)
        )
    for _ in range(WARM_STEPS):
        engine.scheduler.step()
    steps.clear()
    ttft = _first_token(engine, text)
    chunks = [(n, s) for n, s in steps if n]
    decode = [s for n, s in steps if not n]
    return {
        "ttft_s": ttft,
        "prefill_steps": len(chunks),
        "prefill_s": sum(s for _, s in chunks),
        "longest_step_s": max(s for _, s in chunks),
        "chunk_tokens": [n for n, _ in chunks],
        "decode_only_steps": len(decode),
        "decode_step_median_ms": 1000 * statistics.median(decode) if decode else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python -m bench.prefill_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--share", type=float, default=defaults.prefill_share)
    p.add_argument("--stall", type=float, default=defaults.prefill_stall_seconds)
    args = p.parse_args(argv)
    out: dict[str, Any] = {}

    def run() -> None:  # one thread loads and runs every forward pass, as the worker's loop
        probe = load_engine(Settings(worker_slots=4))
        text = long_text(lambda t: len(probe.prepare([ChatMessage("user", t)]).token_ids))
        out["alone"] = alone(text.replace("{nonce}", "0001"))
        out.update(beside_streams(args.share, args.stall, text.replace("{nonce}", "0002")))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    print(
        f"share {args.share}, steps {args.stall} s: first token {out['ttft_s']:.1f} s beside {STREAMS} "
        f"streams, {out['alone']:.1f} s alone ({out['ttft_s'] / out['alone']:.2f}x); "
        f"{out['prefill_steps']} prefill steps, {out['prefill_s']:.1f} s, the longest "
        f"{out['longest_step_s']:.2f} s; chunks {out['chunk_tokens'][:6]}...{out['chunk_tokens'][-3:]}; "
        f"{out['decode_only_steps']} decode-only steps, median {out['decode_step_median_ms']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
